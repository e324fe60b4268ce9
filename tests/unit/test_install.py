"""install.py installs nothing that A1111 / Forge pin (transformers, pydantic, ...) when run by them."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(tmp_path, fake_launch: bool):
    """install.py in a fresh process whose every requirement looks missing; pip and A1111's run_pip record."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util, json, os, subprocess, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name not in ('launch',) else real(name, *a)\n"
        "subprocess.check_call = lambda cmd, *a, **k: open(os.environ['LOG'], 'a').write(json.dumps(cmd) + '\\n')\n")
    if fake_launch:
        (tmp_path / "launch.py").write_text(
            "import json, os\n"
            "def run_pip(command, desc=None):\n"
            "    open(os.environ['LOG'], 'a').write(json.dumps(command) + '\\n')\n")
    log = tmp_path / "pip.log"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LOG=str(log))
    # A1111 runs install.py with its launch module imported; ComfyUI-Manager runs it as a script
    run_name = "install" if fake_launch else "__main__"
    code = f"import runpy; {'import launch; ' if fake_launch else ''}" \
           f"runpy.run_path({os.path.join(REPO, 'install.py')!r}, run_name={run_name!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    return log.read_text() if log.exists() else ""


def test_in_a1111_only_the_webui_face_needs_are_checked(tmp_path):
    calls = _run(tmp_path, fake_launch=True)
    assert "scipy" in calls and "safetensors" in calls
    for pinned in ("transformers", "diffusers", "peft", "accelerate", "tokenizers", "gradio", "pydantic"):
        assert pinned not in calls


def test_under_comfyui_manager_the_packs_requirements_are_installed(tmp_path):
    calls = _run(tmp_path, fake_launch=False)
    assert "diffusers" in calls and "peft" in calls and "torch" not in calls.replace("torchvision", "")
