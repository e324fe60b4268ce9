"""The real ComfyUI server (main.py) with the pack installed: /object_info, /prompt, /history."""

import contextlib
import json
import os
import time
import urllib.request

import pytest

from tools.comfy_headless import from_pack
from tools.comfy_server import get_json, serve
from tools.graphs import attention_graph

pytestmark = pytest.mark.server


_get = get_json


@contextlib.contextmanager
def start_server(base):
    """:func:`tools.comfy_server.serve`; a server that does not start fails the test with its log."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(serve(base))
        except RuntimeError as err:
            pytest.fail(str(err))
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd1_tokenizer):
    from erasekit.tiny import save_sd1_folder

    base = tmp_path_factory.mktemp("comfy-server")
    save_sd1_folder(str(base / "models" / "diffusers" / "tiny-sd1"), sd1_tokenizer)
    with start_server(base) as url:
        yield url, base


def test_object_info_lists_every_node_with_its_inputs(server):
    url, _ = server
    info = _get(url + "/object_info")
    for spec in from_pack("nodes.registry", "all_specs")():
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
