"""The real ComfyUI server (main.py) with the pack installed: /object_info, /prompt, /history."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from comfy_nodes.registry import all_specs
from tools.comfy_headless import COMFY_DIR, REPO
from tools.graphs import attention_graph

pytestmark = pytest.mark.server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def start_server(base):
    """ComfyUI's main.py on a free loopback port, with ``base`` as its base directory and the
    pack linked into ``base/custom_nodes``; yields the URL, stops the server afterwards."""
    (base / "custom_nodes").mkdir(exist_ok=True)
    if not (base / "custom_nodes" / "erasekit").exists():
        os.symlink(REPO, base / "custom_nodes" / "erasekit")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(COMFY_DIR, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--base-directory", str(base),
         "--database-url", f"sqlite:///{base}/comfyui.db"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(base),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                _get(url + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not answer within 120 s")
        if proc.poll() is not None:
            pytest.fail("ComfyUI exited: " + (base / "server.log").read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd1_tokenizer):
    from conftest import save_tiny_sd1

    base = tmp_path_factory.mktemp("comfy-server")
    save_tiny_sd1(str(base / "models" / "diffusers" / "tiny-sd1"), sd1_tokenizer)
    with start_server(base) as url:
        yield url, base


def test_object_info_lists_every_node_with_its_inputs(server):
    url, _ = server
    info = _get(url + "/object_info")
    for spec in all_specs():
        node = info[spec.node_id]
        assert node["display_name"] == spec.display_name and node["category"] == spec.category
        listed = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert set(listed) == {i.name for i in spec.inputs}
    assert "tiny-sd1" in json.dumps(info["ErasekitLoadDiffusersModel"]["input"]["required"]["model_name"])


def test_prompt_over_http_produces_images(server):
    url, base = server
    body = json.dumps({"prompt": attention_graph("tiny-sd1", "a red cat", "cat"), "client_id": "erasekit-test"}).encode()
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    for _ in range(600):
        hist = _get(f"{url}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed"):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the prompt did not finish in 300 s")
    outputs = hist[prompt_id]["outputs"]
    for node in ("9", "10"):
        name = outputs[node]["images"][0]["filename"]
        assert os.path.getsize(base / "output" / name) > 100
