"""Toy model components: exact latent map, content gate, save/load, sampling, eval CLI, training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.toyworld import scenes as S
from erasekit.toyworld import vocab as V
from erasekit.toyworld.model import (
    ToyCLIPTextModel,
    ToyVAE,
    build_toy_pipeline,
    content_gate,
    load_toy_pipeline,
    save_toy_pipeline,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_toy_pipeline(seed=0, tiny=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_pipe):
    return save_toy_pipeline(tiny_pipe, tmp_path_factory.mktemp("toy") / "model")


def _display_batch(n=6, seed=3):
    images, _, _ = S.render_batch(seed, n)
    display = S.upscale_for_display(images)  # uint8 [n, 128, 128, 3]
    return images, display, torch.from_numpy(display).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- latent map
def test_vae_round_trip_is_exact_on_display_images():
    vae = ToyVAE()
    scenes, display, x = _display_batch()
    z = vae.encode(x).latent_dist.sample()
    assert z.shape == (6, 12, 16, 16)
    assert torch.equal(z, vae.encode(x).latent_dist.mode())
    back = vae.decode(z).sample
    assert back.shape == x.shape
    u8 = ((back.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(u8, display)
    # the latent is the 32x32 scene, pixel-unshuffled
    scene = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(z, torch.nn.functional.pixel_unshuffle(scene, 2), atol=1e-6, rtol=0)


def test_vae_config_matches_sd_conventions():
    vae = ToyVAE()
    assert vae.config.scaling_factor == 1.0
    assert vae.config.latent_channels == 12
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert sum(p.numel() for p in vae.parameters()) == 0
    z = torch.randn(2, 12, 8, 8)  # any 8x latent size works (ComfyUI's EmptyLatentImage: H/8 x W/8)
    assert vae.decode(z, return_dict=False)[0].shape == (2, 3, 64, 64)


# ----------------------------------------------------------------------------- content gate
def test_content_gate_function():
    h = torch.randn(2, 5, 3)
    ids = torch.tensor([[1, 7, 0, 9, 0], [1, 0, 0, 0, 0]])
    out = content_gate(h, ids, torch.tensor([1, 7, 9]))
    torch.testing.assert_close(out[0, [0, 1, 3]], h[0, [0, 1, 3]])
    torch.testing.assert_close(out[0, 2], h[0, 0])
    torch.testing.assert_close(out[1], h[1, :1].expand(5, 3))


def _encode(pipe, prompts):
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return tok.input_ids, pipe.text_encoder(tok.input_ids)[0]


def test_gated_positions_equal_the_bos_state(tiny_pipe):
    ids, h = _encode(tiny_pipe, ["a red circle and a blue square on a striped background", "", "bobo, grid background"])
    content = torch.tensor(tiny_pipe.text_encoder.gate_keep_list)
    assert V.BOS_ID in content.tolist() and V.PAD_ID not in content.tolist()
    gated = ~torch.isin(ids, content)
    assert gated.any() and (~gated[:, 1:]).any()
    for b in range(len(ids)):
        torch.testing.assert_close(h[b][gated[b]], h[b, :1].expand(int(gated[b].sum()), -1), atol=0, rtol=0)
    # the bos state is the same for every prompt (causal encoder), so the empty caption is constant
    torch.testing.assert_close(h[0, 0], h[1, 0])
    torch.testing.assert_close(h[1], h[1, :1].expand_as(h[1]))
    # content positions are not gated away
    assert (h[0, ~gated[0]][1:] - h[0, 0]).abs().amax() > 0


def test_function_words_change_nothing_at_gated_positions(tiny_pipe):
    _, a = _encode(tiny_pipe, ["a red circle on a striped background"])
    _, b = _encode(tiny_pipe, ["an red circle with an striped background"])
    ids, _ = _encode(tiny_pipe, ["a red circle on a striped background"])
    gated = ~torch.isin(ids[0], torch.tensor(tiny_pipe.text_encoder.gate_keep_list))
    torch.testing.assert_close(a[0][gated], b[0][gated], atol=0, rtol=0)


def test_content_ids_are_the_content_words(tiny_pipe):
    vocab = tiny_pipe.tokenizer.get_vocab()
    assert set(tiny_pipe.text_encoder.config.content_token_ids) == {vocab[w] for w in V.CONTENT_WORDS}


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny_pipe, tiny_dir):
    for sub in ("model_index.json", "unet/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
                "vae/config.json", "scheduler/scheduler_config.json"):
        assert (tiny_dir / sub).is_file(), sub
    assert not list(tiny_dir.rglob("*.bin")) and list(tiny_dir.rglob("*.safetensors"))
    loaded = load_toy_pipeline(tiny_dir)
    assert isinstance(loaded.text_encoder, ToyCLIPTextModel) and isinstance(loaded.vae, ToyVAE)
    assert loaded.scheduler.config.clip_sample is True  # the SD pipeline's reset of it is undone
    # and DDIM takes its noise direction from the clipped x0 (the pipeline's sampling and ours)
    assert loaded.prepare_extra_step_kwargs(None, 1.0)["use_clipped_model_output"] is True
    for name in ("unet", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    prompts = ["a red circle", "kiki and a blue ring on a dotted background"]
    torch.testing.assert_close(_encode(tiny_pipe, prompts)[1], _encode(loaded, prompts)[1], atol=0, rtol=0)
    assert loaded.tokenizer("a red circle").input_ids == tiny_pipe.tokenizer("a red circle").input_ids


def test_missing_model_is_a_clear_error(tmp_path):
    from erasekit.errors import ModelFileError

    with pytest.raises(ModelFileError, match="train"):
        load_toy_pipeline(tmp_path / "nothing")


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_pipeline_samples_a_128px_image(tiny_dir, scheduler):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    pipe = load_toy_pipeline(tiny_dir)
    cls = DDIMScheduler if scheduler == "ddim" else EulerAncestralDiscreteScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    out = pipe(["a red circle", "bobo"], num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 128, 128, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_limited_interval_guidance_switches_the_scale_by_timestep(tiny_dir):
    """Guidance only at t < T: T above every timestep is plain CFG bit for bit, T = 0 is the
    conditional prediction alone, and an interval in between differs from both."""
    from erasekit.toyworld.evaluate import EvalConfig, generate

    pipe = load_toy_pipeline(tiny_dir)
    base = dict(model=str(tiny_dir), steps=4, batch=2)
    run = lambda guidance, below=None: generate(  # noqa: E731
        pipe, ["a red circle", "a blue star"], [3, 4], EvalConfig(**base, guidance_below=below).resolved(), guidance)
    plain, everywhere = run(5.0), run(5.0, below=1000)
    assert np.array_equal(plain, everywhere)
    nowhere, unguided = run(5.0, below=0), run(1.0 + 1e-6)
    assert np.array_equal(nowhere, unguided) and not np.array_equal(nowhere, plain)
    half = run(5.0, below=500)
    assert not np.array_equal(half, plain) and not np.array_equal(half, nowhere)


def test_prompt_sets_are_deterministic_and_well_formed():
    from erasekit.toyworld.evaluate import prompt_set

    for kind, n_obj in (("single", 1), ("pair", 2), ("style", 1)):
        a, b = prompt_set(kind, 12), prompt_set(kind, 12)
        assert a == b
        for p in a:
            assert len(p["objects"]) == n_obj and len(set(p["objects"])) == n_obj
            for colour, shape in p["objects"]:
                assert colour in p["prompt"] and shape in p["prompt"]
    assert {p["style"] for p in prompt_set("style", 8)} == set(V.STYLES)


@pytest.mark.slow
def test_eval_quick_cli_prints_one_json_object(tiny_dir):
    cmd = [sys.executable, "-m", "erasekit.toyworld", "eval", "--json", "--quick", "--model", str(tiny_dir),
           "--judge-scenes", "10", "--prompts", "2", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("judge_accuracy", "prompt_following_single", "prompt_following_pair", "prompt_following_by_cfg",
                "style_following", "word_cam_iou"):
        assert key in result
    assert set(result["prompt_following_by_cfg"]) == {"1.5", "3", "5", "7.5"}
    assert "ddim" in result["prompt_following_single"]["sampler"]
    assert result["judge_accuracy"]["value"] >= 0.9


@pytest.mark.slow
def test_training_runs_checkpoints_and_resumes(tmp_path):
    from erasekit.toyworld.train import CKPT_NAME, TrainConfig, train

    common = dict(batch_size=4, ckpt_dir=str(tmp_path / "ckpt"), ckpt_every_minutes=1e-6, text_hidden=32)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=3, resume=False, **common))
    assert (tmp_path / "ckpt" / CKPT_NAME).is_file()
    (tmp_path / "ckpt" / CKPT_NAME).unlink()
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, resume=False, **common))
    resumed = train(TrainConfig(out=str(tmp_path / "b"), steps=3, resume=True, **common))
    a, b = load_toy_pipeline(straight), load_toy_pipeline(resumed)
    for (k, v), w in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)
    card = (resumed / "MODEL_CARD.md").read_text()
    assert "--steps 3" in card and "EMA" in card
