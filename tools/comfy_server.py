"""The real ComfyUI server (its unmodified main.py) with this pack linked into a base directory,
on a free loopback port: for the server and browser tests and for the screenshot tour."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from tools.comfy_headless import COMFY_DIR, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url, payload, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def serve(base, startup_s: float = 120):
    """ComfyUI's main.py with ``base`` (a pathlib.Path) as its base directory and the pack linked
    into ``base/custom_nodes``; yields the URL, stops the server afterwards. Raises RuntimeError
    with the end of the server's log when it exits or does not answer within ``startup_s``."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    if not (base / "custom_nodes" / "erasekit").exists():
        os.symlink(REPO, base / "custom_nodes" / "erasekit")
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(COMFY_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--base-directory", str(base),
         "--database-url", f"sqlite:///{base}/comfyui.db"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(base),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_s
        while proc.poll() is None:
            try:
                get_json(url + "/system_stats", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer within {startup_s:.0f} s") from None
                time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError("ComfyUI exited: " + (base / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
