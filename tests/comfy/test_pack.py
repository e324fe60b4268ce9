"""The pack loaded by real ComfyUI, as ComfyUI loads custom nodes; graphs through its executor."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from comfy_nodes.registry import all_specs
from tools.comfy_headless import REPO
from tools.graphs import attention_graph

NODE_IDS = {s.node_id for s in all_specs()}


def test_v3_entrypoint_registers_every_node(comfy):
    from comfy_api.latest import io

    nodes = comfy.pack_nodes()
    assert NODE_IDS <= set(nodes)
    for node_id in NODE_IDS:
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


def test_v1_fallback_runs_the_same_graph(tmp_path, sd1_tokenizer):
    """A ComfyUI without comfy_api gets NODE_CLASS_MAPPINGS; the same graph runs through it."""
    from erasekit.tiny import save_sd1_folder

    save_sd1_folder(str(tmp_path / "models" / "diffusers" / "tiny-sd1"), sd1_tokenizer)
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(attention_graph("tiny-sd1", "a red cat", "cat")))
    code = (
        "import sys, json; sys.path.insert(0, %r); from tools.comfy_headless import HeadlessComfy;"
        "c = HeadlessComfy(%r, api='v1'); nodes = c.pack_nodes();"
        "assert all(hasattr(nodes[k], 'INPUT_TYPES') and not hasattr(nodes[k], 'GET_SCHEMA') for k in %r), 'not V1';"
        "print(json.dumps(c.run(json.load(open(%r)))))" % (REPO, str(tmp_path), sorted(NODE_IDS), str(graph))
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
