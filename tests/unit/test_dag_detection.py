"""DAG detection: the gated min-max A-hat, token optimisation (Eq. 2-3) and the calibrated gate."""

import pytest
import torch

from erasekit.dag.detect import gated_normalise


def test_gated_normalise_min_max_above_the_gate_zero_below():
    a = torch.tensor([[[0.1, 0.3], [0.5, 0.9]],  # peak 0.9 >= gate: min-max
                      [[0.1, 0.2], [0.2, 0.3]]])  # peak 0.3 < gate: nothing detected
    out = gated_normalise(a, gate=0.6)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))
    # a calibrated floor zeroes the background; the rest keeps its min-max level
    floored = gated_normalise(a[:1], gate=0.6, floor=0.4)
    assert torch.allclose(floored[0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    # a flat map (here with rounding noise) says nothing about where: nothing detected
    flat = gated_normalise(torch.tensor([[[0.7, 0.7], [0.7, 0.7 + 1e-7]]]), gate=0.6)
    assert torch.equal(flat, torch.zeros(1, 2, 2))


def test_contrast_keys_take_attention_where_they_match(tmp_path):
    """A pixel that looks like a contrast concept gives its attention to it, not to the guideline
    token (against the sink alone it would split it); a pixel like the target keeps it. The
    contrast states survive a save/load round trip, and a file whose widths disagree is refused."""
    from safetensors.torch import load_file, save_file

    from erasekit.dag.detect import guideline_cam, guideline_keys
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.errors import ModelFileError

    to_k = torch.nn.Linear(4, 4, bias=False)
    to_k.weight.data = torch.eye(4)
    sink, token, other = torch.zeros(4), torch.tensor([[8.0, 0, 0, 0]]), torch.tensor([[0, 8.0, 0, 0]])
    q = torch.tensor([[[4.0, 0, 0, 0], [0, 4.0, 0, 0]]])  # pixel 0 like the target, pixel 1 like the other
    with torch.no_grad():
        plain = guideline_cam(q, guideline_keys(to_k, sink, token), 1, n_tokens=1)[0]
        contrast = guideline_cam(q, guideline_keys(to_k, sink, token, other), 1, n_tokens=1)[0]
    assert plain[1] == pytest.approx(0.5) and contrast[1] < 1e-6
    assert plain[0] > 0.99 and contrast[0] > 0.99

    emb = GuidelineEmbedding(token, sink, "red circle", "toy", gate=0.5, floor=0.1, contrast=other,
                             contrast_phrases=["a blue circle"])
    path = emb.save(str(tmp_path / "g.safetensors"))
    back = GuidelineEmbedding.load(path)
    assert torch.equal(back.contrast, other) and back.contrast_phrases == ["a blue circle"]
    with torch.no_grad():
        assert back.keys(to_k).shape == (3, 4) and back.n_tokens == 1
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors["guideline.contrast"] = torch.zeros(1, 6)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="different widths"):
        GuidelineEmbedding.load(str(tmp_path / "bad.safetensors"))


@pytest.fixture(scope="module")
def tiny_pipe():
    from erasekit.toyworld.model import build_toy_pipeline

    torch.set_num_threads(1)
    return build_toy_pipeline(seed=0, tiny=True)


def test_token_optimisation_learns_the_masks_and_calibrates_a_gate(tiny_pipe, tmp_path):
    """On rendered scenes with exact masks, BCE falls and the gate sits between the unsafe and
    safe peaks; the gate survives a save/load round trip."""
    import numpy as np
    import torch.nn.functional as F

    from erasekit.dag.conditioning import encode_last_states
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase, optimize_guideline
    from erasekit.toyworld.scenes import render_scene
    from erasekit.toyworld.train import scene_latents

    pipe = tiny_pipe
    latents, masks, prompts, unsafe = [], [], [], []
    for seed, (colour, want) in enumerate((("red", True), ("red", True), ("blue", False), ("green", False))):
        scene = render_scene(seed, objects=[(colour, "circle")])
        lat = scene_latents(scene.image[None])[0]
        m = torch.from_numpy(scene.objects[0].mask.astype(np.float32))[None, None]
        latents.append(lat), prompts.append(f"a {colour} circle"), unsafe.append(want)
        masks.append(F.interpolate(m, size=lat.shape[-2:], mode="area")[0, 0] * float(want))
    conds = encode_last_states(pipe.text_encoder, pipe.tokenizer, prompts)
    sink, init = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    fit = optimize_guideline(pipe.unet, pipe.scheduler, torch.stack(latents), conds, torch.stack(masks), unsafe,
                             sink=sink, init_tokens=init, steps=60, n_timesteps=4)
    assert fit.tokens.shape == init.shape and not torch.equal(fit.tokens, init)
    assert np.mean(fit.history[-10:]) < np.mean(fit.history[:5])
    st = fit.gate_stats
    # Youden's level: above the typical safe peak, not above every peak
    assert st["peak_safe_median"] <= fit.gate <= max(st["peak_unsafe_median"], st["peak_safe_max"])
    assert 0.0 <= fit.floor < fit.gate
    # the per-timestep gates: one per cached timestep
    assert [row[0] for row in fit.schedule] == sorted(row[0] for row in fit.schedule) and len(fit.schedule) == 4
    assert all(0.0 < g < 1.0 for _, g in fit.schedule)
    path = GuidelineEmbedding(fit.tokens, sink, "red circle", "toy", gate=fit.gate, floor=fit.floor,
                              schedule=fit.schedule).save(str(tmp_path / "g.safetensors"))
    back = GuidelineEmbedding.load(path)
    assert back.gate == pytest.approx(fit.gate, rel=1e-5) and back.floor == pytest.approx(fit.floor, rel=1e-5)
    assert sum(back.schedule, []) == pytest.approx(sum(fit.schedule, []), rel=1e-5)
    assert back.gate_floor(None) == (back.gate, back.floor)


def test_step_lr_stretches_to_the_run(tiny_pipe):
    """The paper's StepLR step of 20 has decayed the rate to ~1e-4 of its start by step 500, so a
    longer run (100 x many images) would learn nothing more; the default step is steps / 25 (the
    paper's 20 at its five images), and the second half of a long run still moves the tokens."""
    from erasekit.dag.conditioning import encode_last_states
    from erasekit.dag.guideline import encode_phrase, optimize_guideline

    pipe = tiny_pipe
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, pipe.unet.config.in_channels, 16, 16, generator=gen)
    masks = torch.zeros(2, 16, 16)
    masks[0, 4:9, 4:9] = 1.0
    conds = encode_last_states(pipe.text_encoder, pipe.tokenizer, ["a red circle", "a blue square"])
    sink, init = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")

    def tokens(steps, lr_step=None):
        return optimize_guideline(pipe.unet, pipe.scheduler, latents, conds, masks, [True, False], sink=sink,
                                  init_tokens=init, steps=steps, n_timesteps=2, lr_step=lr_step).tokens

    moved_paper = (tokens(1000, lr_step=20) - tokens(500, lr_step=20)).norm()
    moved_default = (tokens(1000) - tokens(500)).norm()
    assert moved_paper < 1e-3 * moved_default


def test_gate_schedule_interpolates_in_the_timestep():
    from erasekit.dag.guideline import GuidelineEmbedding

    emb = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.4,
                             schedule=[[100, 0.7], [500, 0.5], [900, 0.3]])
    assert emb.gate_floor(300) == pytest.approx((0.6, 0.4))  # interpolated, above the fixed gate
    assert emb.gate_floor(0) == pytest.approx((0.7, 0.4))
    assert emb.gate_floor(900) == (0.5, 0.4) and emb.gate_floor(None) == (0.5, 0.4)  # never below the fixed one
    raw = torch.full((1, 2, 2), 0.1)
    raw[0, 0, 0] = 0.65  # above the fixed gate, below the late one (0.7 at t=100)
    from erasekit.dag.detect import detect_concepts

    a_mid, score_mid = detect_concepts([[raw]], [emb], (2, 2), timestep=500)
    a_late, score_late = detect_concepts([[raw]], [emb], (2, 2), timestep=100)
    assert a_mid[0, 0, 0] == 1.0 and score_mid.item() == pytest.approx(1.3)
    assert torch.equal(a_late, torch.zeros(1, 2, 2)) and score_late.item() == pytest.approx(0.65 / 0.7)


def test_a_gate_outside_0_1_is_refused(tmp_path):
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.errors import ModelFileError

    path = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=1.5).save(str(tmp_path / "g.safetensors"))
    with pytest.raises(ModelFileError, match="detection gate"):
        GuidelineEmbedding.load(path)
    path = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.7).save(
        str(tmp_path / "f.safetensors"))
    with pytest.raises(ModelFileError, match="floor < gate"):
        GuidelineEmbedding.load(path)
    path = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.4,
                              schedule=[[100, 0.6], [900, 1.2]]).save(str(tmp_path / "s.safetensors"))
    with pytest.raises(ModelFileError, match="detect_schedule"):
        GuidelineEmbedding.load(path)


def test_a_detected_image_is_held_at_the_floor():
    """Hysteresis: a map between the floor and the gate is nothing in a fresh image, but an image
    detected at an earlier step stays detected (its gate is the floor) until the map sinks to it."""
    from erasekit.dag.detect import detect_concepts, update_held
    from erasekit.dag.guideline import GuidelineEmbedding

    emb = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.2)
    raw = torch.full((2, 2, 2), 0.1)
    raw[:, 0, 0] = 0.35  # below the gate, above the floor
    a_hat, scores = detect_concepts([[raw]], [emb], (2, 2), held=torch.tensor([False, True]))
    assert torch.equal(a_hat[0], torch.zeros(2, 2)) and a_hat[1, 1, 1] == 0.0
    assert a_hat[1, 0, 0] == pytest.approx((0.35 - 0.1) / (0.5 - 0.1))  # scaled against the gate, not to 1
    assert update_held(None, scores).tolist() == [False, False]
    assert update_held(torch.tensor([False, True]), torch.tensor([1.2, 0.1])).tolist() == [True, True]


def test_a_held_map_is_not_stretched_onto_a_neighbour():
    """Once the detected object fades, min-max would stretch a neighbour's weaker response to 1 and
    the AreaScaler would edit it; a held map is scaled against the gate instead."""
    from erasekit.dag.detect import detect_concepts, gated_normalise
    from erasekit.dag.guideline import GuidelineEmbedding

    emb = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.2)
    raw = torch.full((1, 2, 2), 0.1)
    raw[0, 0, 0], raw[0, 0, 1] = 0.25, 0.24  # the faded object and a neighbour, both above the floor
    stretched = gated_normalise(raw, 0.2, 0.2)
    assert stretched[0, 0, 1] >= 0.5  # what min-max alone would hand the AreaScaler
    a_hat, _ = detect_concepts([[raw]], [emb], (2, 2), held=torch.tensor([True]))
    assert a_hat[0, 0, 1] == pytest.approx((0.24 - 0.1) / (0.5 - 0.1)) and a_hat.max() < 0.5
    strong = raw.clone()
    strong[0, 1, 1] = 0.9  # above the gate: plain min-max, as for a fresh detection
    a_hat, _ = detect_concepts([[strong]], [emb], (2, 2), held=torch.tensor([True]))
    assert a_hat[0, 1, 1] == 1.0


@pytest.mark.parametrize("key, text", [("info", "{not json"), ("contrast_phrases", "[\"a\", "),
                                       ("detect_gate", "high"), ("detect_floor", "")])
def test_damaged_metadata_is_named_in_the_error(tmp_path, key, text):
    """A hand-edited or truncated header gets the file's name and the field, not a bare JSON error."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.errors import ModelFileError

    good = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.2,
                              contrast=torch.zeros(1, 8), contrast_phrases=["y"]).save(str(tmp_path / "g.safetensors"))
    with safe_open(good, "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(good)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, key: text})
    with pytest.raises(ModelFileError, match=f"bad.safetensors.*'{key}'"):
        GuidelineEmbedding.load(str(tmp_path / "bad.safetensors"))
    del tensors["guideline.sink"]
    save_file(tensors, str(tmp_path / "nosink.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="no 'guideline.sink'"):
        GuidelineEmbedding.load(str(tmp_path / "nosink.safetensors"))


def test_the_detector_carries_hysteresis_across_steps_until_reset():
    from erasekit.dag.detect import Detector
    from erasekit.dag.guideline import GuidelineEmbedding

    emb = GuidelineEmbedding(torch.zeros(2, 8), torch.zeros(8), "x", "toy", gate=0.5, floor=0.2)
    strong, faded = torch.full((2, 2, 2), 0.1), torch.full((2, 2, 2), 0.1)
    strong[1, 0, 0] = 0.9  # image 1 detected at the first step
    faded[:, 0, 0] = 0.35  # both below the gate at the next
    detector = Detector([emb])
    detector([[strong]], (2, 2))
    a_hat, _ = detector([[faded]], (2, 2))
    assert a_hat[0].max() == 0 and a_hat[1, 0, 0] > 0
    assert Detector([emb], hold=False)([[faded]], (2, 2))[0].max() == 0
    assert detector([[faded[:1]]], (2, 2))[0].max() == 0  # another batch: a new sampling
    detector([[strong]], (2, 2))
    detector.reset()
    assert detector([[faded]], (2, 2))[0].max() == 0
