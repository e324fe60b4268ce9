"""Dependency installer run by ComfyUI-Manager and by Automatic1111 / Forge.

A1111 and Forge run this file with their own ``launch`` module importable and use its
helpers (they install into the web UI's venv and log properly); ComfyUI-Manager runs it with
plain Python. Either way only what is missing is installed, and torch is never touched:
the host application owns the torch build.
"""

import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements.txt")


def _requirements():
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _missing():
    import re

    for req in _requirements():
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0]
        module = {"pillow": "PIL", "tqdm": "tqdm"}.get(name.lower(), name.replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            yield req


def main():
    missing = list(_missing())
    if not missing:
        return
    try:
        import launch  # A1111 / Forge

        for req in missing:
            launch.run_pip(f'install "{req}"', f"Erasekit requirement: {req}")
    except ImportError:  # ComfyUI-Manager or by hand
        subprocess.check_call([sys.executable, "-m", "pip", "install", *missing])


if __name__ == "__main__" or "launch" in sys.modules:
    main()
