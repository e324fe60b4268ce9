"""The pack where users meet it: ComfyUI's real web UI in a real browser, with a live
Detect-and-Guide detection map drawn on the node while the sampler runs."""

import json
import os
import time
import urllib.request

import pytest

from tools.comfy_headless import REPO
from tools.comfy_server import serve
from tools.graphs import dag_graph
from tools.workflows import api_to_ui

SCREENSHOTS = os.path.join(REPO, "out", "screenshots")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """ComfyUI main.py with the pack, a tiny toy model and a guideline embedding."""
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    base = tmp_path_factory.mktemp("comfy-ui")
    pipe = build_toy_pipeline(seed=0, tiny=True)
    save_toy_pipeline(pipe, base / "models" / "diffusers" / "toy-ui")
    (base / "models" / "guideline").mkdir(parents=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    GuidelineEmbedding(tokens * 3, sink, "red circle", "toy").save(str(base / "models" / "guideline" / "g.safetensors"))
    with serve(base) as url:
        yield url


def test_live_detection_map_on_the_node(browser, ui_server):
    url = ui_server
    browser.get(url)
    deadline = time.time() + 90
    while time.time() < deadline and not browser.execute_script("return !!(window.app && window.app.graph)"):
        time.sleep(1)
    assert browser.execute_script("return !!(window.app && window.app.graph)"), "ComfyUI's page did not load"
    extensions = browser.execute_script("return (window.app.extensions || []).map(e => e.name)")
    assert "erasekit.detectionPreview" in extensions
    info = json.loads(urllib.request.urlopen(url + "/object_info").read())
    graph = dag_graph("toy-ui", "a red circle and a blue square", "g.safetensors", steps=8, seed=1)
    node_classes = {name: _V1Shim(defn) for name, defn in info.items()}
    workflow = api_to_ui(graph, node_classes)
    from selenium.webdriver.common.keys import Keys

    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)  # the Templates dialog of a first visit
    browser.execute_script("return window.app.loadGraphData(arguments[0])", workflow)
    time.sleep(2)
    body = json.dumps({"prompt": graph, "client_id": browser.execute_script("return window.app.api?.clientId || null")})
    req = urllib.request.Request(url + "/prompt", data=body.encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        last = browser.execute_script("return window.erasekitLastDetection || null")
        if last and last["step"] + 1 >= last["steps"] - 1:
            break
        time.sleep(1)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    browser.save_screenshot(os.path.join(SCREENSHOTS, "comfyui-detect-and-guide.png"))
    assert last is not None and last["node"] == "12", last
    n_imgs = browser.execute_script("const n = window.app.graph.getNodeById(12); return n && n.imgs ? n.imgs.length : 0")
    assert n_imgs == 1


class _V1Shim:
    """Node definition from /object_info with the INPUT_TYPES/RETURN_TYPES interface of a class."""

    def __init__(self, defn):
        self.defn = defn
        self.RETURN_TYPES = tuple(defn["output"])

    def INPUT_TYPES(self):
        return self.defn["input"]
