"""Dependency installer run by ComfyUI-Manager and by Automatic1111 / Forge.

In A1111 / Forge (their ``launch`` module is importable) it installs nothing that their pins own:
the A1111 face needs only torch, numpy, scipy, safetensors and Pillow, which they ship, so it only
checks for them (installing requirements.txt's ranges there would upgrade transformers and pydantic
and break the web UI). The trainer's own needs are the trainer's (``pip install -r requirements-dev.txt``
in its own environment). Under ComfyUI-Manager (plain Python) the pack's missing requirements are
installed. torch is never touched: the host application owns the torch build.
"""

import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
WEBUI_NEEDS = ("numpy", "scipy", "safetensors", "pillow")  # what the A1111 / Forge face imports besides torch
MODULES = {"pillow": "PIL", "tqdm": "tqdm", "tomli-w": "tomli_w"}


def _requirements():
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _missing(requirements):
    import re

    for req in requirements:
        spec, _, marker = req.partition(";")
        if marker.strip() and "python_version" in marker and sys.version_info >= (3, 11) and "<" in marker:
            continue  # e.g. tomli on Python < 3.11 only
        name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0]
        if importlib.util.find_spec(MODULES.get(name.lower(), name.replace("-", "_"))) is None:
            yield req


def main():
    try:
        import launch  # A1111 / Forge
    except ImportError:  # ComfyUI-Manager or by hand
        missing = list(_missing(_requirements()))
        if missing:
            subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])
        return
    for req in _missing(WEBUI_NEEDS):
        launch.run_pip(f'install "{req}"', f"Erasekit requirement: {req}")


if __name__ == "__main__" or "launch" in sys.modules:
    main()
