"""NudeNet Detect / NudeNet Censor in real ComfyUI graphs (executor and HTTP server): scikit-image's
astronaut photo (NudeNet finds her face, FACE_FEMALE 0.72) batched with synthetic negatives."""

import json
import os
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is in requirements-dev.txt")
pytest.importorskip("nudenet", reason="nudenet is in requirements-dev.txt")

FACE = (173, 82, 102, 98)  # NudeNet 3.4's box of the astronaut's face, [x, y, w, h]


def _put_inputs(input_dir):
    os.makedirs(input_dir, exist_ok=True)
    Image.fromarray(skimage_data.astronaut()).save(os.path.join(input_dir, "astronaut.png"))
    rng = np.random.default_rng(0)  # a negative with texture: noise has no body parts
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(os.path.join(input_dir, "noise.png"))


def _graph(classes="FACE_FEMALE", threshold=0.6, method="pixelate", feather=8):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 0x808080}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "noise.png"}},
        "12": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["11", 0]}},
        "4": {"class_type": "ErasekitNudeNetDetect", "inputs": {"image": ["12", 0], "classes": classes,
                                                                "threshold": threshold, "feather": feather, "device": "cpu"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "mask"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "overlay"}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
        "9": {"class_type": "ErasekitNudeNetCensor", "inputs": {"image": ["12", 0], "classes": classes, "threshold": threshold,
                                                                "method": method, "strength": 1.0, "device": "cpu"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "censored"}},
    }


def _images(outputs, node, folder):
    return [np.asarray(Image.open(os.path.join(folder, i.get("subfolder", ""), i["filename"])).convert("RGB")).astype(int)
            for i in outputs[node]["images"]]


def _check(outputs, output_dir):
    astronaut = skimage_data.astronaut().astype(int)
    dets = json.loads(outputs["8"]["text"][0])
    assert len(dets) == 3 and dets[1] == [] and dets[2] == []  # the grey and the noise image: nothing
    (face,) = dets[0]
    assert face["class"] == "FACE_FEMALE" and face["score"] >= 0.6
    x, y, w, h = face["box"]
    assert abs(x - FACE[0]) <= 4 and abs(y - FACE[1]) <= 4 and abs(w - FACE[2]) <= 4 and abs(h - FACE[3]) <= 4

    masks = _images(outputs, "6", output_dir)
    assert masks[0][y + h // 2, x + w // 2, 0] == 255 and masks[0][5, 5, 0] == 0
    edge = masks[0][y + h // 2, x + w + 4, 0]  # 4 px outside the box, feather 8: half covered
    assert 80 < edge < 180, edge
    assert masks[1].max() == 0 and masks[2].max() == 0

    overlays = _images(outputs, "7", output_dir)
    assert np.abs(overlays[0][y + h // 2, x] - astronaut[y + h // 2, x]).max() > 50  # the box's frame is drawn
    assert np.abs(overlays[0][400:, 400:] - astronaut[400:, 400:]).max() <= 1  # elsewhere the photo itself
    assert np.abs(overlays[1] - 128).max() <= 1

    censored = _images(outputs, "10", output_dir)
    inside = censored[0][y:y + h, x:x + w]
    assert np.abs(inside - astronaut[y:y + h, x:x + w]).mean() > 5  # the face is gone ...
    block = max(2, round(min(w, h) / 4))
    assert (inside[:block, :block] == inside[0, 0]).all()  # ... into blocks
    outside = np.ones(astronaut.shape[:2], bool)
    outside[y:y + h, x:x + w] = False
    assert np.abs(censored[0][outside] - astronaut[outside]).max() <= 1
    assert np.abs(censored[1] - 128).max() <= 1


def test_detect_and_censor_in_the_executor(comfy):
    _put_inputs(os.path.join(comfy.work_dir, "input"))
    outputs = comfy.run(_graph())
    _check(outputs, os.path.join(comfy.work_dir, "output"))


def test_unsafe_classes_leave_a_clothed_photo_alone(comfy):
    """The papers' five classes find nothing in the astronaut: empty masks, censor is the identity."""
    _put_inputs(os.path.join(comfy.work_dir, "input"))
    outputs = comfy.run(_graph(classes="unsafe", method="cover"))
    assert json.loads(outputs["8"]["text"][0]) == [[], [], []]
    out = os.path.join(comfy.work_dir, "output")
    assert all(m.max() == 0 for m in _images(outputs, "6", out))
    assert np.abs(_images(outputs, "10", out)[0] - skimage_data.astronaut().astype(int)).max() <= 1


def test_an_unknown_class_is_named(comfy):
    _put_inputs(os.path.join(comfy.work_dir, "input"))
    with pytest.raises(RuntimeError, match="'FACE' is not a NudeNet class"):
        comfy.run(_graph(classes="FACE"))


def test_v1_nodes_run_the_same_graph(tmp_path):
    """A ComfyUI without comfy_api gets the V1 classes of the same specs; the same graph gives the same results."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _put_inputs(str(tmp_path / "input"))
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(_graph()))
    code = ("import sys, json; sys.path.insert(0, %r); from tools.comfy_headless import HeadlessComfy;"
            "c = HeadlessComfy(%r, api='v1'); n = c.pack_nodes()['ErasekitNudeNetDetect'];"
            "assert hasattr(n, 'INPUT_TYPES') and not hasattr(n, 'GET_SCHEMA'), 'not V1';"
            "print(json.dumps(c.run(json.load(open(%r)))))" % (repo, str(tmp_path), str(graph)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(proc.stdout.strip().splitlines()[-1]), str(tmp_path / "output"))


@pytest.mark.server
def test_detect_and_censor_over_http(tmp_path):
    from tools.comfy_server import get_json, serve

    _put_inputs(str(tmp_path / "input"))
    with serve(tmp_path) as url:
        body = json.dumps({"prompt": _graph(method="blur"), "client_id": "erasekit-test"}).encode()
        req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            prompt_id = json.loads(r.read())["prompt_id"]
        for _ in range(600):
            hist = get_json(f"{url}/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the prompt did not finish in 300 s")
    outputs = hist[prompt_id]["outputs"]
    dets = json.loads(outputs["8"]["text"][0])
    assert [d["class"] for d in dets[0]] == ["FACE_FEMALE"] and dets[1] == [] and dets[2] == []
    censored = _images(outputs, "10", str(tmp_path / "output"))
    x, y, w, h = dets[0][0]["box"]
    astronaut = skimage_data.astronaut().astype(int)
    assert np.abs(censored[0][y:y + h, x:x + w] - astronaut[y:y + h, x:x + w]).mean() > 5  # blurred
    noise = np.asarray(Image.open(tmp_path / "input" / "noise.png")).astype(int)
    assert len(censored) == 3 and np.abs(censored[2] - noise).max() <= 1  # nothing found: unchanged
