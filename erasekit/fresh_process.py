"""Measurements that must run in a fresh Python process (ComfyUI's imports, a clean memory
baseline): run one, read the JSON object it prints last."""

from __future__ import annotations


def json_from(args: list, what: str, timeout: float = 3600, cwd: str | None = None) -> dict:
    """Run ``python *args`` and return its last stdout line as JSON; a non-zero exit raises
    ``RuntimeError`` naming ``what`` with the tail of its stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
