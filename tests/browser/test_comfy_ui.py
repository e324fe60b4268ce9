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


def _page(browser, url):
    browser.get(url)
    deadline = time.time() + 90
    while time.time() < deadline and not browser.execute_script("return !!(window.app && window.app.graph)"):
        time.sleep(1)
    assert browser.execute_script("return !!(window.app && window.app.graph)"), "ComfyUI's page did not load"


def _until(fn, timeout, what):
    from tools.browser import until

    return until(fn, timeout, what)


def test_templates_explain_themselves(browser, ui_server):
    """The Templates dialog lists the pack's templates with their own thumbnails; the LoRA template opens
    with a Note saying what to do first and Load Erasure LoRA's info shown; with no LoRA yet the list
    says where they come from, and queueing it shows the pack's sentence in a toast."""
    from tools.workflows import NOTES

    url = ui_server
    listed = json.loads(urllib.request.urlopen(url + "/workflow_templates").read())
    assert set(listed["erasekit"]) == set(NOTES)  # the pack's folder name is the templates' group
    _page(browser, url)
    if not browser.execute_script("return !!document.querySelector('[data-testid=template-workflows-content]')"):
        browser.execute_script("return window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    nav = _until(lambda: browser.execute_script(
        "return [...document.querySelectorAll('[role=dialog] *')].find(e => !e.children.length && "
        "e.textContent.trim() === 'erasekit')"), 60, "the pack in the Templates dialog")
    browser.execute_script("arguments[0].click()", nav)
    for name in NOTES:  # each card shows the template's own picture (512 px), not ComfyUI's 224 px stand-in
        _until(lambda name=name: browser.execute_script(
            "const c = document.querySelector(`[data-testid='template-workflow-${arguments[0]}']`);"
            "const i = c && c.querySelector('img'); return i && i.complete && i.naturalWidth === 512", name),
            60, f"the thumbnail of {name}")
    os.makedirs(SCREENSHOTS, exist_ok=True)
    browser.save_screenshot(os.path.join(SCREENSHOTS, "comfyui-templates.png"))

    card = browser.find_element("css selector", "[data-testid='template-workflow-erasure_lora_before_after']")
    browser.execute_script("arguments[0].click()", card)
    note = _until(lambda: browser.execute_script(
        "const n = window.app.graph.nodes.find(n => n.type === 'Note'); return n && n.widgets[0].value"),
        60, "the template's Note")
    assert note == NOTES["erasure_lora_before_after"] and "What to do first" in note
    shown = browser.execute_script(
        "const g = window.app.graph; const p = g.nodes.find(n => n.type === 'PreviewAny');"
        "const link = p && g.links[p.inputs[0].link]; const src = link && g.getNodeById(link.origin_id);"
        "return src ? [src.type, link.origin_slot] : null")
    assert shown == ["ErasekitLoadErasureLoRA", 2]  # Preview as Text reads the loader's info output
    info = json.loads(urllib.request.urlopen(url + "/object_info/ErasekitLoadErasureLoRA").read())
    choices = info["ErasekitLoadErasureLoRA"]["input"]["required"]["lora_name"]
    choices = choices[1]["options"] if choices[0] == "COMBO" else choices[0]
    assert len(choices) == 1 and "Erasekit trainer" in choices[0]  # no LoRA here yet: where they come from

    # a user with no LoRA picks the only entry and queues: the pack's sentence, as a toast
    browser.execute_script(
        "for (const n of window.app.graph.nodes) {"
        "  if (n.type === 'ErasekitLoadErasureLoRA') n.widgets.find(w => w.name === 'lora_name').value = arguments[0];"
        "  if (n.type === 'ErasekitLoadDiffusersModel') n.widgets[0].value = 'toy-ui';"
        "  if (n.type === 'KSampler') n.widgets.find(w => w.name === 'steps').value = 2; }"
        "return window.app.queuePrompt(0, 1)", choices[0])
    toast = _until(lambda: browser.execute_script(
        "const t = [...document.querySelectorAll('.p-toast-message')].map(e => e.textContent).join(' ');"
        "return t.includes('No LoRA in ComfyUI') ? t : null"), 120, "the pack's sentence in a toast")
    assert "Make an erasure LoRA with the Erasekit trainer" in toast and "press R" in toast
    browser.save_screenshot(os.path.join(SCREENSHOTS, "comfyui-no-lora-toast.png"))
