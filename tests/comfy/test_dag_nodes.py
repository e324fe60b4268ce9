"""Detect-and-Guide nodes in real ComfyUI graphs on the toy architecture."""


import numpy as np
import pytest
from PIL import Image

from tools.graphs import dag_graph


def _img(comfy, out, node):
    return np.asarray(Image.open(comfy.output_path(out[node]["images"][0])))


def test_nothing_detected_means_bit_identical_plain_cfg(comfy, toy_in_comfy):
    out = comfy.run(dag_graph(toy_in_comfy, "a red circle", "tiny-nothing.safetensors", "red circle", steps=8))
    assert np.array_equal(_img(comfy, out, "9"), _img(comfy, out, "19"))


@pytest.mark.parametrize("mode", ["DAG", "SLD", "SEGA"])
def test_every_mode_runs_and_dag_shows_its_maps(comfy, toy_in_comfy, mode):
    graph = dag_graph(toy_in_comfy, "a red circle and a blue square", "tiny-red-circle.safetensors", mode=mode, steps=6, seed=3)
    if mode != "DAG":  # detection maps exist only in DAG mode
        del graph["20"], graph["21"]
    out = comfy.run(graph)
    assert _img(comfy, out, "19").shape == (128, 128, 3)
    if mode == "DAG":
        assert _img(comfy, out, "21").shape == (128, 128, 3)


def test_embedding_for_another_model_is_refused_with_a_sentence(comfy, toy_in_comfy):
    with pytest.raises(RuntimeError, match="has width 768 \\(made for sd_v1\\), but this model's text width is 32"):
        comfy.run(dag_graph(toy_in_comfy, "a red circle", "sd15-nudity.safetensors", steps=2))


def test_safety_pass_runs_for_detected_images_of_a_batch_only(comfy, toy_in_comfy, monkeypatch):
    """Batch of 2, image 0 "detected" at every step: image 1 stays plain CFG bit for bit, image 0 is
    edited (a stand-in edit: the real S depends on what the random model attends to)."""
    from erasekit.dag import guidance

    monkeypatch.setattr(guidance, "detected_rows", lambda a_hat, dag: [0])
    monkeypatch.setattr(guidance, "dag_combine", lambda x0, x0_u, x0_cs, a_hat, s, dag: x0 + 0.5 * (x0_cs - x0_u))
    graph = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=6, seed=5)
    graph["5"]["inputs"]["batch_size"] = 2
    out = comfy.run(graph)
    plain = [np.asarray(Image.open(comfy.output_path(i))) for i in out["9"]["images"]]
    guided = [np.asarray(Image.open(comfy.output_path(i))) for i in out["19"]["images"]]
    assert len(plain) == len(guided) == 2
    assert np.array_equal(plain[1], guided[1]) and not np.array_equal(plain[0], guided[0])


def test_sega_mask_reaches_the_guidance_and_old_graphs_still_run(comfy, toy_in_comfy, monkeypatch):
    """The node's sega_mask is DAG's top-p mask on the safety direction; an API graph saved before the
    input existed (no sega_mask) runs with the whole region, as before."""
    from erasekit.dag import guidance

    seen = []

    def combine(x0, x0_u, x0_cs, a_hat, s, dag):
        seen.append(dag.top_p)
        return x0

    monkeypatch.setattr(guidance, "detected_rows", lambda a_hat, dag: [0])
    monkeypatch.setattr(guidance, "dag_combine", combine)
    graph = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=3, seed=5)
    graph["12"]["inputs"]["sega_mask"] = 0.9
    comfy.run(graph)
    assert seen and set(seen) == {0.9}
    seen.clear()
    del graph["12"]["inputs"]["sega_mask"]
    comfy.run(graph)
    assert seen and set(seen) == {0.0}


def test_the_patch_reads_the_same_layers_as_the_diffusers_path(comfy, toy_in_comfy, monkeypatch):
    """The ComfyUI patch's CAMs come from the layers ``coarse_layers`` picks for the diffusers path:
    the mid block sits at the toy's (and SDXL's) coarsest level but is left out. With it, the CAM
    was a mean over one layer more, whose map is flat, and detection scores fell by ~15%."""
    from erasekit.dag import detect
    from erasekit.dag.guideline import coarse_layers
    from erasekit.toyworld.model import build_toy_pipeline

    seen = []
    call = detect.Detector.__call__

    def record(self, per_concept_layer_maps, size, timestep=None):
        seen.append(sorted(tuple(m.shape[-2:]) for m in per_concept_layer_maps[0]))
        return call(self, per_concept_layer_maps, size, timestep)

    monkeypatch.setattr(detect.Detector, "__call__", record)
    comfy.run(dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=2))
    unet = build_toy_pipeline(seed=0, tiny=True).unet
    n, side = len(unet.config.down_block_types), unet.config.sample_size  # the graph's 128 px: latent 16

    def level(name):  # as coarse_layers counts: down block i is level i, up block j level n - 1 - j
        kind, i = name.split(".")[:2]
        return int(i) if kind == "down_blocks" else n - 1 - int(i)

    expected = sorted((side >> level(name),) * 2 for name in coarse_layers(unet))
    assert seen and all(s == expected for s in seen), (seen[0], expected)


def test_dag_check_tool_compares_plain_and_guided_comfyui_images(comfy, toy_in_comfy):
    """tools/dag_check_comfy.py (what `bench dag --comfyui` runs): with an embedding that never
    detects, every guided image is the plain one, so nothing is erased and benign images are identical."""
    import os

    from tools.dag_check_comfy import check

    base = os.path.join(comfy.work_dir, "models", "diffusers", toy_in_comfy)
    nothing = os.path.join(comfy.work_dir, "models", "guideline", "tiny-nothing.safetensors")
    r = check("red circle", nothing, base, prompts=2, steps=3, comfy=comfy, log=lambda m: None)
    assert r["comfyui_prompts"] == 2 and r["comfyui_benign_prompts"] == 2
    assert r["comfyui_erase_rate"] in (0.0, None)  # None: the random model drew no red circle to erase
    assert r["comfyui_preservation"] in (1.0, None) and r["comfyui_benign_identical"] == 1.0
    assert 0.0 <= r["comfyui_targets_drawn_plain"] <= 1.0


def test_live_preview_keeps_what_was_found_so_far(comfy, toy_in_comfy, monkeypatch):
    """The node's live preview is the running max of A-hat: a region the edit has faded stays visible."""
    import sys

    import torch

    from erasekit.dag import detect

    # the pack's module as ComfyUI imported it (under the custom node folder's name)
    loaded = [m for name, m in list(sys.modules.items()) if name.endswith(".nodes.dag_nodes")]

    sent, maps = [], []
    call = detect.Detector.__call__

    def record(self, *args, **kwargs):
        a_hat, scores = call(self, *args, **kwargs)
        maps.append(a_hat.clone())
        return a_hat, scores

    monkeypatch.setattr(detect.Detector, "__call__", record)
    for module in loaded:
        monkeypatch.setattr(module, "_preview_sender", lambda node_id: lambda a_hat, i, n: sent.append(a_hat.clone()))
    comfy.run(dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=4, seed=3))
    assert len(sent) == len(maps) >= 4
    for k, shown in enumerate(sent):
        assert torch.equal(shown, torch.stack(maps[: k + 1]).amax(0))


def test_every_builtin_sampler_and_scheduler(comfy, toy_in_comfy, monkeypatch):
    """Each of ComfyUI's samplers (scheduler "normal") and schedulers (sampler "euler") runs the
    node: with a never-detecting embedding the image is plain CFG's bit for bit; with a detection
    forced at every step the extra pass runs and changes the image (a stand-in edit, as above)."""
    from comfy.samplers import KSampler

    from erasekit.dag import guidance

    combine = guidance.dag_combine
    pairs = [(s, "normal") for s in KSampler.SAMPLERS] + [("euler", s) for s in KSampler.SCHEDULERS if s != "normal"]
    failed = []
    for sampler, scheduler in pairs:
        for forced in (False, True):
            monkeypatch.setattr(guidance, "detected_rows", (lambda a_hat, dag: [0]) if forced else guidance.detected_rows)
            monkeypatch.setattr(guidance, "dag_combine", (lambda x0, x0_u, x0_cs, a_hat, s, dag: x0 + 0.5 * (x0_cs - x0_u))
                                if forced else combine)
            graph = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors" if forced else
                              "tiny-nothing.safetensors", "red circle", steps=4, seed=1, sampler=sampler)
            del graph["20"], graph["21"]
            for node in ("6", "16"):
                graph[node]["inputs"]["scheduler"] = scheduler
            try:
                out = comfy.run(graph)
            except Exception as err:  # collect them all: one message lists every sampler that fails
                failed.append(f"{sampler}/{scheduler} forced={forced}: {str(err)[:200]}")
                continue
            same = np.array_equal(_img(comfy, out, "9"), _img(comfy, out, "19"))
            if same == forced:
                failed.append(f"{sampler}/{scheduler} forced={forced}: guided {'==' if same else '!='} plain")
        monkeypatch.undo()
    assert not failed, "\n".join(failed)


def _positive(graph, node):
    """Point both samplers' positive input at ``node``."""
    for sampler in ("6", "16"):
        graph[sampler]["inputs"]["positive"] = [node, 0]


@pytest.mark.parametrize("layout", ["combine", "area", "chained"])
def test_several_prompts_areas_and_chained_nodes(comfy, toy_in_comfy, layout, monkeypatch):
    """Graphs beyond one prompt and one node: two positive prompts (Conditioning (Combine): one CAM per
    prompt, averaged per image), a prompt limited to an area (its cropped CAMs are left out), and two
    Detect-and-Guide nodes in a row (the first one's safety pass must not hand the second CAMs of the
    safety text). Detection sees one full-latent map per layer and image, as with one prompt; never
    detecting, the image is plain CFG's bit for bit; detecting at every step, it is edited."""
    import comfy.samplers as samplers

    from erasekit.dag import detect, guidance

    def graph_for(guideline, layout):
        g = dag_graph(toy_in_comfy, "a red circle", guideline, "red circle", steps=4, seed=2)
        g["30"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}}
        if layout in ("combine", "area"):
            second = ["30", 0]
            if layout == "area":
                g["32"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["30", 0], "width": 64,
                                                                          "height": 64, "x": 0, "y": 0, "strength": 1.0}}
                second = ["32", 0]
            g["31"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": second}}
            _positive(g, "31")
        elif layout == "chained":
            g["33"] = dict(g["12"], inputs=dict(g["12"]["inputs"], model=["12", 0], safety_text="blue square"))
            g["16"]["inputs"]["model"] = ["33", 0]
            g["20"]["inputs"]["model"] = ["33", 0]
        return g

    out = comfy.run(graph_for("tiny-nothing.safetensors", layout))
    assert np.array_equal(_img(comfy, out, "9"), _img(comfy, out, "19"))

    seen, in_safety_pass, cams_in_safety_pass = [], [False], []
    call, batch_call, cam = detect.Detector.__call__, samplers.calc_cond_batch, detect.guideline_cam

    def record(self, per_concept_layer_maps, size, timestep=None):
        seen.append(sorted(tuple(m.shape) for m in per_concept_layer_maps[0]))
        return call(self, per_concept_layer_maps, size, timestep)

    def calc_cond_batch(model, conds, *args, **kwargs):  # one cond list: Detect-and-Guide's safety pass
        in_safety_pass[0] = len(conds) == 1
        try:
            return batch_call(model, conds, *args, **kwargs)
        finally:
            in_safety_pass[0] = False

    monkeypatch.setattr(detect.Detector, "__call__", record)
    monkeypatch.setattr(samplers, "calc_cond_batch", calc_cond_batch)
    monkeypatch.setattr(detect, "guideline_cam", lambda *a: cams_in_safety_pass.append(in_safety_pass[0]) or cam(*a))
    monkeypatch.setattr(guidance, "detected_rows", lambda a_hat, dag: [0])
    monkeypatch.setattr(guidance, "dag_combine", lambda x0, x0_u, x0_cs, a_hat, s, dag: x0 + 0.5 * (x0_cs - x0_u))
    comfy.run(graph_for("tiny-red-circle.safetensors", "one prompt"))
    single, seen[:] = seen[0], []
    out = comfy.run(graph_for("tiny-red-circle.safetensors", layout))
    assert not np.array_equal(_img(comfy, out, "9"), _img(comfy, out, "19"))
    assert _img(comfy, out, "21").shape == (128, 128, 3)  # the detection maps of the (last) node
    assert seen and all(shapes == single for shapes in seen), (layout, seen[0], single)
    assert cams_in_safety_pass and not any(cams_in_safety_pass)


def test_a_guider_without_negative_is_refused_with_a_sentence(comfy, toy_in_comfy):
    g = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=2)
    for node in ("6", "7", "9", "16", "20", "21"):
        del g[node]
    g.update({
        "40": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["2", 0]}},
        "41": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "42": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "43": {"class_type": "BasicScheduler", "inputs": {"model": ["12", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
        "44": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["41", 0], "guider": ["40", 0], "sampler": ["42", 0],
                                                                 "sigmas": ["43", 0], "latent_image": ["5", 0]}},
    })
    g["17"]["inputs"]["samples"] = ["44", 0]
    with pytest.raises(RuntimeError, match="needs the sampler's unconditional"):
        comfy.run(g)


def test_other_extensions_passes_are_not_read_as_the_prompt(comfy, toy_in_comfy, monkeypatch):
    """Self-Attention Guidance after Detect-and-Guide runs its own pass on a degraded input with the
    negative prompt, which ComfyUI tags like a positive one (cond_or_uncond 0). Detection reads the
    maps of this step's prompt pass only (by the positive prompts' uuids), not an average with SAG's."""
    import torch

    from erasekit.dag import detect

    cams, checked = [], []
    cam, call = detect.guideline_cam, detect.Detector.__call__

    def record_cam(*a):
        cams.append(cam(*a))
        return cams[-1]

    def record_detection(self, per_concept_layer_maps, size, timestep=None):
        maps = per_concept_layer_maps[0]
        recent = cams[-len(maps):]  # this step's prompt pass (SAG's pass of the step before came earlier)
        checked.append(all(any(m.numel() == r.numel() and torch.allclose(m.flatten(), r.flatten()) for r in recent)
                           for m in maps))
        return call(self, per_concept_layer_maps, size, timestep)

    monkeypatch.setattr(detect, "guideline_cam", record_cam)
    monkeypatch.setattr(detect.Detector, "__call__", record_detection)
    g = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=4, seed=2)
    g["12"]["inputs"]["safety_text"] = "red circle (SAG test)"  # a node ComfyUI has not cached: installed with the recorder
    g["50"] = {"class_type": "SelfAttentionGuidance", "inputs": {"model": ["12", 0], "scale": 0.5, "blur_sigma": 2.0}}
    g["16"]["inputs"]["model"] = ["50", 0]
    comfy.run(g)
    assert len(checked) == 4 and all(checked), checked


def test_a_sampling_split_over_two_advanced_samplers_is_one_sampling(comfy, toy_in_comfy, monkeypatch):
    """KSamplerAdvanced steps 0-3 (leftover noise) then 3-6: the second half goes on with the first's
    hold and step count (it used to start afresh: warm-up again, an edited object's weakened map
    below the entry gate); a new sampling afterwards starts afresh."""
    from erasekit.dag import detect

    seen = []
    call = detect.Detector.__call__

    def record(self, per_concept_layer_maps, size, timestep=None):
        seen.append(self.held is not None)
        return call(self, per_concept_layer_maps, size, timestep)

    monkeypatch.setattr(detect.Detector, "__call__", record)
    g = dag_graph(toy_in_comfy, "a red circle", "tiny-red-circle.safetensors", "red circle", steps=6, seed=2)
    for node in ("6", "7", "9", "16", "20", "21"):
        del g[node]
    common = {"model": ["12", 0], "positive": ["2", 0], "negative": ["3", 0], "noise_seed": 2, "steps": 6, "cfg": 5.0,
              "sampler_name": "euler", "scheduler": "normal"}
    g["60"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "latent_image": ["5", 0], "add_noise": "enable",
                                                           "start_at_step": 0, "end_at_step": 3,
                                                           "return_with_leftover_noise": "enable"}}
    g["61"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "latent_image": ["60", 0], "add_noise": "disable",
                                                           "start_at_step": 3, "end_at_step": 10000,
                                                           "return_with_leftover_noise": "disable"}}
    g["17"]["inputs"]["samples"] = ["61", 0]
    comfy.run(g)
    assert seen == [False, True, True, True, True, True], seen  # one hold over all six steps
    seen.clear()
    g["60"]["inputs"]["noise_seed"] = g["61"]["inputs"]["noise_seed"] = 3  # queued again: a new sampling
    comfy.run(g)
    assert seen[:2] == [False, True] and seen[3] is True, seen
