"""The pack loaded by real ComfyUI, as ComfyUI loads custom nodes; graphs through its executor."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tools.comfy_headless import REPO, from_pack
from tools.graphs import attention_graph


def node_ids() -> set:
    """The pack's node ids, from its registry (the pack must be loaded: the ``comfy`` fixture)."""
    return {s.node_id for s in from_pack("nodes.registry", "all_specs")()}


def test_v3_entrypoint_registers_every_node(comfy):
    from comfy_api.latest import io

    nodes = comfy.pack_nodes()
    assert node_ids() <= set(nodes)
    for node_id in node_ids():
        cls = nodes[node_id]
        assert issubclass(cls, io.ComfyNode), node_id  # came through comfy_entrypoint
        schema = cls.GET_SCHEMA()
        assert schema.category == "Erasekit" and schema.description
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name


def test_attention_graph_draws_a_heatmap(comfy, tiny_sd1_in_comfy):
    out = comfy.run(attention_graph(tiny_sd1_in_comfy, "a photo of a red cat", "red cat"))
    image = np.asarray(Image.open(comfy.output_path(out["9"]["images"][0])))
    overlay = np.asarray(Image.open(comfy.output_path(out["10"]["images"][0])))
    assert image.shape == overlay.shape == (64, 64, 3)
    assert np.abs(image.astype(int) - overlay.astype(int)).mean() > 5  # the heatmap is drawn over it


def test_heatmap_errors_are_one_actionable_sentence(comfy, tiny_sd1_in_comfy):
    import pytest

    graph = attention_graph(tiny_sd1_in_comfy, "a photo of a red cat", "dog")
    with pytest.raises(RuntimeError, match="None of the words 'dog' occurs in the prompt"):
        comfy.run(graph)
    graph = attention_graph(tiny_sd1_in_comfy, "a red cat", "cat")
    graph["8"]["inputs"]["model"] = ["1", 0]  # the un-captured model
    with pytest.raises(RuntimeError, match="connect the MODEL output of 'Capture Cross-Attention'"):
        comfy.run(graph)


def test_v1_fallback_runs_the_same_graph(tmp_path, sd1_tokenizer, comfy):
    """A ComfyUI without comfy_api gets NODE_CLASS_MAPPINGS; the same graph runs through it."""
    from erasekit.tiny import save_sd1_folder

    save_sd1_folder(str(tmp_path / "models" / "diffusers" / "tiny-sd1"), sd1_tokenizer)
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(attention_graph("tiny-sd1", "a red cat", "cat")))
    code = (
        "import sys, json; sys.path.insert(0, %r); from tools.comfy_headless import HeadlessComfy;"
        "c = HeadlessComfy(%r, api='v1'); nodes = c.pack_nodes();"
        "assert all(hasattr(nodes[k], 'INPUT_TYPES') and not hasattr(nodes[k], 'GET_SCHEMA') for k in %r), 'not V1';"
        "print(json.dumps(c.run(json.load(open(%r)))))" % (REPO, str(tmp_path), sorted(node_ids()), str(graph))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert os.path.isfile(tmp_path / "output" / outputs["10"]["images"][0]["filename"])


def test_loading_the_pack_imports_nothing_heavy(tmp_path):
    """ComfyUI start-up with the pack must not pull in diffusers, peft, gradio or nudenet."""
    code = (
        "import sys; sys.path.insert(0, %r); from tools.comfy_headless import HeadlessComfy;"
        "c = HeadlessComfy(%r); c.pack_nodes();"
        "print([m for m in ('diffusers', 'peft', 'gradio', 'nudenet', 'accelerate') if m in sys.modules])"
        % (REPO, str(tmp_path))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_toy_architecture_runs_in_comfyui(comfy):
    """The toy model's own parts (12-channel pixel latent, gated word-level CLIP) through the
    loader node and ComfyUI's stock EmptyLatentImage / KSampler / VAEDecode."""
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), os.path.join(comfy.work_dir, "models", "diffusers", "toy-tiny"))
    out = comfy.run(attention_graph("toy-tiny", "a red circle and a blue square", "red circle", size=128,
                                    sampler="euler_ancestral"))
    image = np.asarray(Image.open(comfy.output_path(out["9"]["images"][0])))
    assert image.shape == (128, 128, 3)
    # the toy VAE decodes a 32x32 scene shown at 4x: every 4x4 block is one colour
    blocks = image.reshape(32, 4, 32, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_heatmap_words_with_comfyuis_own_tokenizer(comfy):
    """ComfyUI's SD1 tokenizer numbers weighted segments, not words: "a photo of a red cat" is one
    segment. The heatmap finds the word's tokens, also inside a weighted "(red cat:1.2)"."""
    from types import SimpleNamespace

    from comfy.sd1_clip import SD1Tokenizer

    word_token_positions = from_pack("nodes.attention_nodes", 'word_token_positions')

    tok = SD1Tokenizer()
    clip = SimpleNamespace(tokenize=lambda text, return_word_ids=False: tok.tokenize_with_weights(text, return_word_ids))
    # position 0 is the start token: a=1 photo=2 of=3 a=4 red=5 cat=6
    assert word_token_positions(clip, "a photo of a red cat", "cat") == [6]
    assert word_token_positions(clip, "a photo of a red cat", "red, cat") == [5, 6]
    assert word_token_positions(clip, "a photo of a red cat", "a") == [1, 4]  # the word, not the whole segment
    assert word_token_positions(clip, "a photo of a (red cat:1.2)", "cat") == [6]


def test_heatmap_at_an_uneven_size_and_for_more_images_than_maps(comfy, tiny_sd1_in_comfy):
    """72 x 104 px (a 9 x 13 latent: its grids round up at each level) with two images sampled and
    four shown (Repeat Image Batch): a map per image, the batch's maps in turn."""
    graph = attention_graph(tiny_sd1_in_comfy, "a photo of a red cat", "cat")
    graph["5"]["inputs"].update(width=72, height=104, batch_size=2)
    graph["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["7", 0], "amount": 2}}
    graph["8"]["inputs"]["image"] = ["11", 0]
    out = comfy.run(graph)
    assert len(out["10"]["images"]) == 4
    maps = [np.asarray(Image.open(comfy.output_path(i))) for i in out["10"]["images"]]
    assert maps[0].shape == (104, 72, 3) and np.array_equal(maps[0], maps[2]) and np.array_equal(maps[1], maps[3])


def test_tiled_vae_nodes_with_the_packs_vae(comfy):
    """VAE Decode (Tiled) / VAE Encode (Tiled) on a model of Load Diffusers Model (they raised
    AttributeError): ComfyUI's tiling over the diffusers VAE. The toy VAE maps each latent pixel to a
    4x4 block, so tiles give exactly the plain decode."""
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    folder = os.path.join(comfy.work_dir, "models", "diffusers", "toy-tiled")
    save_toy_pipeline(build_toy_pipeline(seed=0, tiny=True), folder)
    tiles = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    graph = attention_graph("toy-tiled", "a red circle", "circle", steps=2)  # "7" decodes, "9" saves it
    graph["5"]["inputs"].update(width=256, height=128)
    graph["20"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["6", 0], "vae": ["1", 2], **tiles}}
    graph["21"] = {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["7", 0], "vae": ["1", 2], **tiles}}
    graph["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["1", 2]}}
    for i, src in (("23", "20"), ("24", "22")):
        graph[i] = {"class_type": "SaveImage", "inputs": {"images": [src, 0], "filename_prefix": f"tiled{i}"}}
    out = comfy.run(graph)
    plain, tiled, again = (np.asarray(Image.open(comfy.output_path(out[i]["images"][0]))).astype(int)
                           for i in ("9", "23", "24"))
    assert plain.shape == tiled.shape == again.shape == (128, 256, 3)
    assert np.abs(plain - tiled).max() <= 1 and np.abs(plain - again).max() <= 2


def test_the_pack_leaves_sys_path_and_comfyuis_nodes_module_alone(tmp_path, comfy):
    """Loaded from a folder that is not on sys.path, the pack puts nothing there: ComfyUI's ``nodes``
    stays ComfyUI's (the pack's ``nodes/`` is reached relatively) and the core is registered as
    ``erasekit`` from the pack's own folder; a graph then runs."""
    code = (
        "import sys, os, json; sys.path.insert(0, %r); from tools.comfy_headless import HeadlessComfy, COMFY_DIR;"
        "sys.path.remove(%r); before = [p for p in sys.path];"
        "c = HeadlessComfy(%r); names = sorted(c.pack_nodes());"
        "print(json.dumps({'added': [p for p in sys.path if p not in before], 'nodes': sys.modules['nodes'].__file__,"
        "'comfy': COMFY_DIR, 'core': sys.modules['erasekit'].__file__, 'pack_nodes': len(names)}))"
        % (REPO, REPO, str(tmp_path))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["added"] in ([], [seen["comfy"]])  # only ComfyUI's own folder, by the headless runner
    assert seen["nodes"] == os.path.join(seen["comfy"], "nodes.py")
    assert seen["core"] == os.path.join(REPO, "erasekit", "__init__.py")
    assert seen["pack_nodes"] == len(node_ids())
