"""NCD (seed 000): every loss term on hand-computed values (implicit rewards, score weights, L_mod /
L_NCA, L_pair sum / mean, NCD-HA weights), the noise and t shared by a tuple's candidates, the
objective on the tiny toy model (its value at the start, a hand recomputation, training moves the
rewards apart), the data (user pairs, the toy model's own judged tuples, the cache, the errors), full-UNet
mode's SVD export, the CLI, a kill mid-run and the bench's SSR-N / ASR."""

import json
import math
import os
import time
from contextlib import contextmanager

import pytest
import torch

from erasekit import lora_io, models
from erasekit.erase.data import toy_scene_set
from erasekit.erase.engine import StepContext, TrainConfig, latest_checkpoint, train
from erasekit.erase.ncd import (
    NcdConfig,
    NcdObjective,
    harm_rank_weights,
    implicit_rewards,
    modified_loss,
    pair_loss,
    preset,
    safe_loss,
    score_weights,
    shared_noise_and_timesteps,
    squared_error,
)
from erasekit.erase.ncd_data import NcdData, NcdDataConfig, anchor_of, build_ncd_data, safe_prompt
from erasekit.errors import ErasekitError
from erasekit.tiny import toy_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
LOG2 = math.log(2)


def logsig(u):
    return -math.log1p(math.exp(-u))


# ----------------------------------------------------------------------------- equations


def test_squared_error_and_implicit_rewards_eq10():
    target = torch.zeros(1, 2, 1, 2)
    pred = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # two candidates: errors (1 + 9) / 2 and (4 + 4) / 2
    err = squared_error(pred, target)
    assert err.tolist() == [[5.0, 4.0]] and err.dtype == torch.float32
    assert squared_error(pred.half(), target.half()).dtype == torch.float32  # fp32 errors under fp16
    # r = beta / 2 (err_ref - err_theta): beta 2000, the trained model 0.001 better on candidate 0, 0.002 worse on 1
    r = implicit_rewards(torch.tensor([[0.499, 0.502]]), torch.tensor([[0.5, 0.5]]), beta=2000.0)
    assert r[0].tolist() == pytest.approx([1.0, -2.0], abs=1e-3)


def test_score_weights_eq11():
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w = score_weights(s, temperature=0.1, safe_bonus=0.01)
    z = math.exp(10.1) + 3  # safe: exp((1 + 0.01) / 0.1); harmful: exp(0)
    assert w[0].tolist() == pytest.approx([math.exp(10.1) / z, 1 / z, 1 / z, 1 / z], rel=1e-5)
    z2 = math.exp(0.1) + 3  # all scores equal: only the 0.01 bonus tells the safe one apart
    assert w[1].tolist() == pytest.approx([math.exp(0.1) / z2, 1 / z2, 1 / z2, 1 / z2], rel=1e-5)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert s[0, 0].item() == 1.0  # the scores are not changed in place


def test_modified_loss_eq14_and_nca_eq15():
    r = torch.tensor([[0.5, -1.0, 0.2, 2.0]], dtype=torch.float64)
    w = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    pull = 0.7 * logsig(0.5) + 0.1 * (logsig(-1.0) + logsig(0.2) + logsig(2.0))
    push = (logsig(1.0) + logsig(-0.2) + logsig(-2.0)) / 4  # (1/N) sum_{i>=1} log sigma(-r_i), N = 4
    assert modified_loss(r, w).item() == pytest.approx(-(pull + push), abs=1e-12)
    nca = -(pull + push + logsig(-0.5) / 4)  # Eq. 15 adds (1/N) log sigma(-r_0)
    assert modified_loss(r, w, nca=True).item() == pytest.approx(nca, abs=1e-12)
    zero = torch.zeros(1, 4, dtype=torch.float64)  # at the start: r = 0
    assert modified_loss(zero, w).item() == pytest.approx(1.75 * LOG2, abs=1e-12)


def test_nca_gradient_reverses_at_n_over_n_plus_1_and_ncd_does_not_eq16_17():
    """d L / d r_0 with w_0 = 1: NCA -(1 - sigma(r_0)) + sigma(r_0) / N, zero at sigma(r_0) = N / (N + 1)
    = 0.8 and positive beyond (it pushes r_0 down); NCD's stays negative."""
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for s0, sign in ((0.7, -1), (0.9, 1)):
        r0 = math.log(s0 / (1 - s0))
        for nca in (True, False):
            r = torch.tensor([[r0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
            modified_loss(r, w, nca=nca).sum().backward()
            want = -(1 - s0) + (s0 / 4 if nca else 0.0)
            assert r.grad[0, 0].item() == pytest.approx(want, abs=1e-12)
            assert (r.grad[0, 0].item() > 0) == (nca and sign > 0)
    r = torch.tensor([[math.log(4.0), 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # sigma = 0.8
    modified_loss(r, w, nca=True).sum().backward()
    assert r.grad[0, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_pair_loss_eq18_sum_mean_and_ha_weights():
    r = torch.tensor([[1.0, 0.0, 2.0, -1.0]], dtype=torch.float64)
    terms = [logsig(1.0), logsig(-1.0), logsig(2.0)]  # log sigma(r_0 - r_i), i = 1..3
    assert pair_loss(r).item() == pytest.approx(-sum(terms), abs=1e-12)  # the paper's sum
    assert pair_loss(r, reduce="mean").item() == pytest.approx(-sum(terms) / 3, abs=1e-12)  # the code's mean
    omega = torch.tensor([[1.2, 1.0, 0.8]], dtype=torch.float64)
    assert pair_loss(r, omega).item() == pytest.approx(-(1.2 * terms[0] + terms[1] + 0.8 * terms[2]), abs=1e-12)
    with pytest.raises(ValueError, match="sum' or 'mean"):
        pair_loss(r, reduce="max")


def test_safe_loss_is_the_denoising_error_of_candidate_0_and_does_not_saturate():
    """L_safe (beyond the paper): the trained model's squared error on the safe candidate; its gradient
    on err_theta_0 stays 1 whatever the rewards, where Eq. 14 / 18's fade once r_harm is far below 0."""
    target = torch.zeros(2, 4, 1, 2)
    pred = torch.zeros(2, 4, 1, 2)
    pred[0, 0] = torch.tensor([[1.0, 3.0]])  # (1 + 9) / 2 = 5
    pred[1, 0] = torch.tensor([[2.0, 0.0]])  # (4 + 0) / 2 = 2
    pred[:, 1:] = 7.0  # the harmful candidates do not count
    assert safe_loss(squared_error(pred, target)).tolist() == [5.0, 2.0]
    err = torch.tensor([[0.5, 0.6, 0.6, 0.6]], dtype=torch.float64, requires_grad=True)
    err_ref = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    r = implicit_rewards(err, err_ref, beta=2000.0)  # r_harm = -100: saturated
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    (modified_loss(r, w) + pair_loss(r)).sum().backward()
    g_paper = err.grad.clone()
    assert g_paper[0, 1:].abs().max().item() < 1e-30  # log sigma(-r_i), log sigma(r_0 - r_i): no pull left
    err.grad = None
    safe_loss(err).sum().backward()
    assert err.grad[0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_harm_rank_weights_eq19_20():
    harm = torch.tensor([[0.1, 0.3, 0.2], [0.5, 0.5, 0.1], [0.0, 0.0, 0.0]])
    w = harm_rank_weights(harm, [1.2, 1.0, 0.8])  # the most harmful gets 1.2 (Tab. 8)
    assert w.flatten().tolist() == pytest.approx([0.8, 1.2, 1.0, 1.2, 1.0, 0.8, 1.2, 1.0, 0.8])  # ties: in order
    with pytest.raises(ValueError, match="3 harmful"):
        harm_rank_weights(harm, [1.0, 1.0])


def test_presets_are_the_papers_and_the_toy_tuning_on_top():
    row = preset("object")
    assert (row["lr"], row["batch_size"], row["grad_accum"], row["steps"], row["mode"]) == (1e-6, 8, 2, 3200, "full")
    assert (row["score_temperature"], row["lambda_pair"], row["beta"]) == (0.1, 0.5, 2000.0)
    assert preset("colour") == preset("object") and preset("nsfw")["mode"] == "full"
    toy = preset("object", toy=True)
    assert toy["mode"] == "lora" and toy["targets"] == "feed-forward"
    cfg = NcdConfig()
    assert (cfg.pair_reduce, cfg.nca, cfg.harm_weights, cfg.lambda_prior, cfg.lambda_pair) == ("sum", False, "", 0.0, 0.5)
    assert cfg.lambda_safe == 0.0 and "lambda_safe" not in preset("object")  # beyond the paper: off in its presets


# ----------------------------------------------------------------------------- on the tiny model


tiny_components = toy_components  # erasekit/tiny.py


def scene_tuples(comps, n=4, preserve=True) -> NcdData:
    """n rendered tuples: candidate 0 a green circle (safe), 1..3 red circles; captions "a red circle"."""
    safe = toy_scene_set(comps, [("green", "circle")], n, seed=0, masks=False)
    harm = [toy_scene_set(comps, [("red", "circle")], n, seed=100 * j, masks=False) for j in (1, 2, 3)]
    latents = torch.stack([safe.latents] + [h.latents for h in harm], 1)
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n)
    harm_scores = torch.tensor([[0.0, 0.2, 0.1, 0.3]] * n)
    keep = toy_scene_set(comps, [("blue", "square")], n, seed=500, masks=False) if preserve else None
    return NcdData("red circle", latents, harm[0].embeds, harm[0].ids, scores, harm_scores, harm[0].prompts,
                   safe.prompts, preserve=keep, preserved=["blue square"] if preserve else [])


@pytest.fixture(scope="module")
def tuples():
    return scene_tuples(tiny_components())


def adapters_off(unet):
    @contextmanager
    def reference_ctx():
        unet.disable_adapters()
        try:
            with torch.no_grad():
                yield unet
        finally:
            unet.enable_adapters()

    return reference_ctx


def lora_unet(seed=0, b_std=0.0):
    from peft import LoraConfig

    comps = tiny_components()
    comps.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if b_std:
        torch.manual_seed(seed)
        for n, p in comps.unet.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, b_std)  # a trained-looking adapter: model != reference
    return comps


def step_ctx(comps, seed=7):
    from diffusers import DDPMScheduler

    return StepContext(0, torch.Generator().manual_seed(seed), DDPMScheduler.from_config(comps.scheduler.config), "cpu", {})


def test_candidates_share_noise_and_timestep(tuples):
    comps = tiny_components()
    lat = tuples.latents[:3]
    noise, t = shared_noise_and_timesteps(step_ctx(comps), lat)
    assert noise.shape == lat.shape and t.shape == (3, 4)
    for i in range(1, 4):
        assert torch.equal(noise[:, i], noise[:, 0]) and torch.equal(t[:, i], t[:, 0])
    assert not torch.equal(noise[0, 0], noise[1, 0])  # tuples draw their own
    # the draw is the one the engine makes for latents[:, 0]: the same generator state gives the same noise
    ref_noise, ref_t = step_ctx(comps).noise_and_timesteps(lat[:, 0])
    assert torch.equal(noise[:, 0], ref_noise) and torch.equal(t[:, 0], ref_t)
    # in the objective: four copies of one image get the same x_t, so the same reward, even with model != reference
    comps = lora_unet(b_std=0.05)
    same = {"latents": tuples.latents[:2, :1].expand(-1, 4, -1, -1, -1).contiguous(), "embeds": tuples.embeds[:2],
            "ids": tuples.ids[:2], "scores": tuples.scores[:2], "harm": tuples.harm[:2]}
    with torch.no_grad():
        out = NcdObjective().loss({"tuples": same}, comps.unet, adapters_off(comps.unet), step_ctx(comps))
    assert out["r_safe"].item() != 0 and out["r_harm"].item() == pytest.approx(out["r_safe"].item(), rel=1e-5)
    assert out["implicit_acc"].item() == 0.0  # r_0 > r_i never holds between equal rewards


def test_objective_at_the_start_is_log2_terms(tuples):
    """With LoRA's B = 0 the model is the reference: every r_i = 0, sigma(r_0) = 1/2,
    L_mod = (1 + 3/4) log 2, L_pair = 3 log 2 (sum; mean: log 2), L_prior = 0."""
    comps = lora_unet()
    batch = tuples.sample(torch.Generator().manual_seed(0), 2)
    out = NcdObjective(NcdConfig(lambda_prior=1.0)).loss(batch, comps.unet, adapters_off(comps.unet), step_ctx(comps))
    assert out["mod"].item() == pytest.approx(1.75 * LOG2, abs=1e-6)
    assert out["pair"].item() == pytest.approx(3 * LOG2, abs=1e-6)
    assert out["sigma_r0"].item() == 0.5 and out["implicit_acc"].item() == 0.0 and out["prior"].item() == 0.0
    assert out["loss"].item() == pytest.approx((1.75 + 0.5 * 3) * LOG2, abs=1e-6)  # lambda_safe 0: the paper's
    with_safe = NcdObjective(NcdConfig(lambda_prior=1.0, lambda_safe=2.0)).loss(batch, comps.unet, adapters_off(comps.unet),
                                                                                step_ctx(comps))
    assert with_safe["safe"].item() > 0  # the model's plain denoising error on the safe picture
    assert with_safe["loss"].item() == pytest.approx((1.75 + 1.5) * LOG2 + 2.0 * with_safe["safe"].item(), rel=1e-5)
    mean = NcdObjective(NcdConfig(pair_reduce="mean")).loss(batch, comps.unet, adapters_off(comps.unet), step_ctx(comps))
    assert mean["pair"].item() == pytest.approx(LOG2, abs=1e-6)
    out["loss"].backward()
    grads = [p.grad for n, p in comps.unet.named_parameters() if "lora_B" in n]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_objective_is_the_equations_on_the_models_outputs(tuples):
    """The objective's terms recomputed by hand from the trained and reference UNet's outputs on the
    shared x_t (NCD-HA and the preservation term on)."""
    comps = lora_unet(b_std=0.05)
    batch = tuples.sample(torch.Generator().manual_seed(1), 2)
    cfg = NcdConfig(beta=500.0, harm_weights="1.2,1.0,0.8", lambda_prior=3.0, lambda_safe=40.0)
    with torch.no_grad():
        out = NcdObjective(cfg).loss(batch, comps.unet, adapters_off(comps.unet), step_ctx(comps))
        tup, keep = batch["tuples"], batch["preserve"]
        ctx = step_ctx(comps)
        noise, t = ctx.noise_and_timesteps(tup["latents"][:, 0])
        pn, pt = ctx.noise_and_timesteps(keep["latents"])
        x0 = torch.cat([tup["latents"].flatten(0, 1), keep["latents"]])
        eps = torch.cat([noise.repeat_interleave(4, 0), pn])
        tt = torch.cat([t.repeat_interleave(4), pt])
        c = torch.cat([tup["embeds"].repeat_interleave(4, 0), keep["embeds"]])
        xt = ctx.add_noise(x0, eps, tt)
        pred = comps.unet(xt, tt, encoder_hidden_states=c).sample
        comps.unet.disable_adapters()
        ref = comps.unet(xt, tt, encoder_hidden_states=c).sample
        comps.unet.enable_adapters()
    err = ((eps[:8] - pred[:8]) ** 2).mean((1, 2, 3)).view(2, 4)
    err_ref = ((eps[:8] - ref[:8]) ** 2).mean((1, 2, 3)).view(2, 4)
    r = 250.0 * (err_ref - err)
    w = torch.softmax((tup["scores"] + torch.tensor([0.01, 0, 0, 0])) / 0.1, 1)
    l_mod = -((w * torch.nn.functional.logsigmoid(r)).sum(1) + torch.nn.functional.logsigmoid(-r[:, 1:]).sum(1) / 4).mean()
    omega = torch.tensor([1.0, 0.8, 1.2])  # harm 0.2, 0.1, 0.3 -> ranks 2, 3, 1
    l_pair = -(omega * torch.nn.functional.logsigmoid(r[:, :1] - r[:, 1:])).sum(1).mean()
    l_prior = ((pred[8:] - ref[8:]) ** 2).mean()
    l_safe = err[:, 0].mean()
    assert out["mod"].item() == pytest.approx(l_mod.item(), rel=1e-4)
    assert out["safe"].item() == pytest.approx(l_safe.item(), rel=1e-4)
    assert out["pair"].item() == pytest.approx(l_pair.item(), rel=1e-4)
    assert out["prior"].item() == pytest.approx(l_prior.item(), rel=1e-4) and l_prior.item() > 0
    assert out["loss"].item() == pytest.approx(l_mod.item() + 0.5 * l_pair.item() + 3.0 * l_prior.item()
                                               + 40.0 * l_safe.item(), rel=1e-4)
    assert out["implicit_acc"].item() == pytest.approx((r[:, :1] > r[:, 1:]).float().mean().item())
    assert out["sigma_r0"].item() == pytest.approx(torch.sigmoid(r[:, 0]).mean().item(), rel=1e-5)


def evaluate(comps, data, cfg, repeats=8):
    """The objective's terms averaged over fixed draws (noise, t, tuples): steadier than a training step."""
    g = torch.Generator().manual_seed(123)
    ctx = StepContext(0, g, step_ctx(comps).noise_scheduler, "cpu", {})
    with torch.no_grad():
        outs = [NcdObjective(cfg).loss(data.sample(g, 4), comps.unet, adapters_off(comps.unet), ctx) for _ in range(repeats)]
    return {k: sum(float(o[k]) for o in outs) / repeats for k in outs[0]}


def test_training_prefers_the_safe_candidate(tuples, tmp_path):
    """16 steps on the tiny model: on fixed draws the safe candidate's reward passes the harmful ones'
    (implicit accuracy above chance) and the loss falls below its start; every term is logged."""
    comps = tiny_components()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=16, batch_size=2, lr=1e-2, checkpoint_every=100,
                      tensorboard=False, export=False, seed=0)
    ncd = NcdConfig(beta=200.0)
    train(cfg, NcdObjective(ncd), tuples, comps)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["implicit_acc"] == 0.0 and rows[0]["sigma_r0"] == 0.5
    assert all(k in rows[-1] for k in ("mod", "pair", "prior", "implicit_acc", "sigma_r0", "r_safe", "r_harm"))
    after = evaluate(comps, tuples, ncd)
    assert after["r_safe"] > after["r_harm"]
    assert after["implicit_acc"] > 0.6  # measured 0.667 (0 at the start: all rewards equal)
    assert after["loss"] < (1.75 + 0.5 * 3) * LOG2 - 0.1  # measured 2.06 vs 2.25


def test_full_mode_exports_by_svd_with_its_error(tuples, tmp_path):
    comps = tiny_components()
    cfg = TrainConfig(out=str(tmp_path / "full"), target="red circle", steps=2, batch_size=1, lr=1e-4, mode="full",
                      checkpoint_every=100, tensorboard=False, export=True)
    result = train(cfg, NcdObjective(), tuples, comps)
    lora, meta = lora_io.load_lora(str(result.lora))
    assert lora and meta["erasekit.method"] == "ncd"
    extraction = json.loads(meta["erasekit.config"])["extraction"]
    assert 0 < extraction["max_error"] <= 1 and extraction["worst_module"] in lora
    assert "Extracted from a full fine-tune by SVD at rank" in result.lora.with_suffix(".md").read_text()


# ----------------------------------------------------------------------------- data


def test_user_pairs_make_tuples_and_cache(tmp_path):
    from PIL import Image

    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    comps = tiny_components()
    folder = tmp_path / "pairs"
    write_pairs(folder)
    Image.fromarray(upscale_for_display(render_scene(9, objects=[("red", "circle")]).image)).save(folder / "p1_2.png")
    (folder / "p0.txt").write_text("a red circle on a dark background")
    Image.fromarray(upscale_for_display(render_scene(5, objects=[("red", "circle")]).image)).save(folder / "lonely.png")
    cache = str(tmp_path / "data.safetensors")
    cfg = NcdDataConfig(forget_dir=str(folder), images_per_concept=0, cache=cache)
    logs = []
    data = build_ncd_data(comps, "red circle", cfg, log=logs.append)
    assert data.latents.shape[:2] == (2, 4) and data.prompts == ["a red circle on a dark background", "red circle"]
    assert data.scores.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 2
    single = make_latent(comps, folder / "p0.png")
    assert torch.allclose(data.latents[0, 1], single, atol=1e-5) and torch.equal(data.latents[0, 1], data.latents[0, 3])
    assert not torch.equal(data.latents[1, 1], data.latents[1, 2])  # p1_2.png is p1's second harmful picture
    assert torch.allclose(data.latents[0, 0], make_latent(comps, folder / "p0_safe.png"), atol=1e-5)
    again = build_ncd_data(comps, "red circle", cfg, log=logs.append)
    assert "from " + cache in logs[-1] and torch.equal(again.latents, data.latents) and again.prompts == data.prompts
    (folder / "p1.txt").write_text("a red circle")  # a changed input makes new data
    assert build_ncd_data(comps, "red circle", cfg, log=logs.append).prompts[1] == "a red circle"
    assert "from " not in logs[-1]


def make_latent(comps, path):
    import shutil
    import tempfile

    from erasekit.erase.images import read_folder

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, os.path.join(tmp, "x.png"))
        f = read_folder(comps, tmp, masks=False, caption="")
    with torch.no_grad():
        return comps.vae.encode(f.images * 2 - 1).latent_dist.mode()[0] * comps.vae.config.scaling_factor


def test_data_errors_are_one_sentence(tmp_path, monkeypatch):
    from erasekit.toyworld import judge as judge_module

    comps = tiny_components()
    comps.architecture = None  # not the toy model: no judge to draw tuples with
    with pytest.raises(ErasekitError, match="name_safe.png") as err:
        build_ncd_data(comps, "nudity", NcdDataConfig(), log=lambda m: None)
    assert "\n" not in str(err.value) and "--forget-dir" in str(err.value)
    (tmp_path / "f").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "f" / "a.png")
    with pytest.raises(ErasekitError, match="no NCD pair"):
        build_ncd_data(comps, "x", NcdDataConfig(forget_dir=str(tmp_path / "f")), log=lambda m: None)
    toy = tiny_components()  # the toy architecture, but the judge never finds the target
    monkeypatch.setattr(judge_module, "judge", lambda image: judge_module.Judgement([], "plain"))
    with pytest.raises(ErasekitError, match="No NCD tuple of 'red circle' survived the judge"):
        build_ncd_data(toy, "red circle", NcdDataConfig(forget_images=1, max_tries=1, sample_steps=2, images_per_concept=0),
                       log=lambda m: None)


def test_safe_prompt_replaces_the_target_with_the_anchor():
    from erasekit.toyworld.vocab import parse_concept

    red = parse_concept("red circle")
    assert anchor_of(red) == "green circle" and anchor_of(red, "a blue circle") == "blue circle"
    assert safe_prompt("a red circle and a blue star", red, "green circle") == "a green circle and a blue star"
    style = parse_concept("striped background")
    assert safe_prompt("a red square on a striped background", style, anchor_of(style)) == \
        "a red square on a plain background"
    with pytest.raises(ErasekitError, match="does not name"):
        safe_prompt("a blue star", red, "green circle")


@pytest.mark.slow
def test_toy_model_draws_judged_tuples(tmp_path):
    """The bundled toy model: harmful candidates show the target (judge), the safe one shows the anchor
    and not the target, the seeds are outside the benchmarks' ranges (~40 s on one thread)."""
    from erasekit.toyworld.concepts import concept_mask
    from erasekit.toyworld.judge import judge
    from erasekit.toyworld.vocab import parse_concept

    comps = models.load(os.path.join(os.path.dirname(__file__), "..", "..", "models", "toy"))
    data = build_ncd_data(comps, "red circle", NcdDataConfig(forget_images=3, images_per_concept=0, sample_steps=20),
                          log=lambda m: None)
    assert len(data) == 3 and data.preserve is None
    red, green = parse_concept("red circle"), parse_concept("green circle")
    with torch.no_grad():
        images = (comps.vae.decode(data.latents.flatten(0, 1) / comps.vae.config.scaling_factor).sample + 1) / 2
    for i, img in enumerate(images.clamp(0, 1)):
        j = judge(img.permute(1, 2, 0).numpy())
        present = bool(concept_mask(j, red).any())
        assert present == (i % 4 != 0), (i, j.items())
        if i % 4 == 0:
            assert green.matches(j)
    assert data.scores.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 3 and (data.harm[:, 1:] > 0).all()
    assert all(s.replace("green circle", "red circle") == p for p, s in zip(data.prompts, data.safe_prompts))


def test_img2img_keeps_the_picture_at_low_strength():
    from erasekit.dag.sampling import sample
    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    comps = tiny_components()
    img = torch.from_numpy(upscale_for_display(render_scene(0, objects=[("red", "circle")]).image)).permute(2, 0, 1)[None] / 255
    low = sample(comps, ["a red circle"], [3], steps=25, cfg=1.0, init_images=img, strength=0.04).images
    full = sample(comps, ["a red circle"], [3], steps=25, cfg=1.0, init_images=img, strength=1.0).images
    assert (low - img).abs().mean() < 0.5 * (full - img).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sample(comps, ["a"], [0], steps=2, init_images=img, strength=0.0)


# ----------------------------------------------------------------------------- CLI, resume, bench


def write_pairs(folder, n=2):
    from PIL import Image

    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(upscale_for_display(render_scene(i, objects=[("red", "circle")]).image)).save(folder / f"p{i}.png")
        Image.fromarray(upscale_for_display(render_scene(i, objects=[("green", "circle")]).image)).save(folder / f"p{i}_safe.png")


def test_cli_trains_ncd_and_refuses_other_methods_flags(tmp_path, capsys):
    from erasekit.erase.engine import read_config
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.cli import main

    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp_path / "toy")
    write_pairs(tmp_path / "pairs")
    out = str(tmp_path / "run")
    common = ["train", "--method", "ncd", "--target", "red circle", "--base", str(tmp_path / "toy"), "--threads", "1"]
    rc = main(common + ["--out", out, "--forget-dir", str(tmp_path / "pairs"), "--images-per-concept", "1",
                        "--neighbours", "1", "--unrelated", "1", "--steps", "2", "--batch-size", "1", "--nca",
                        "--harm-weights", "1.2,1.0,0.8", "--pair-reduce", "mean", "--beta", "500", "--lambda-prior", "7"])
    assert rc == 0, capsys.readouterr().err
    lora, meta = lora_io.load_lora(os.path.join(out, "erase-red-circle-ncd.safetensors"))
    assert lora and meta["erasekit.method"] == "ncd" and meta["erasekit.erased_concept"] == "red circle"
    resolved = read_config(os.path.join(out, "config.toml"))
    assert resolved["ncd"]["nca"] is True and resolved["ncd"]["harm_weights"] == "1.2,1.0,0.8"
    assert resolved["ncd"]["pair_reduce"] == "mean" and resolved["ncd"]["beta"] == 500.0
    assert resolved["ncd"]["lambda_prior"] == 7.0  # a flag NCD shares with INPO
    assert resolved["ncd"]["lambda_pair"] == preset("object", toy=True)["lambda_pair"]
    assert resolved["train"]["mode"] == "lora" and resolved["train"]["targets"] == "feed-forward"
    assert resolved["data"]["img2img_strength"] == 0.9  # NCD's [data] table
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and "implicit_acc" in rows[0] and "sigma_r0" in rows[0]
    assert main(["train", "--method", "ncd", "--out", out, "--resume", "--steps", "3", "--threads", "1"]) == 0, \
        capsys.readouterr().err
    assert "2 tuples, 2 preserve images from" in capsys.readouterr().err  # the cached tuples
    assert main(common + ["--out", str(tmp_path / "x"), "--eta", "2"]) == 2
    assert "--eta is a setting of INPO, not of NCD" in capsys.readouterr().err
    assert main(["train", "--method", "inpo", "--target", "red circle", "--base", str(tmp_path / "toy"),
                 "--out", str(tmp_path / "y"), "--beta", "2"]) == 2
    assert "--beta is a setting of NCD" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_run_resumes(tmp_path):
    """A real ``kill -9`` of an NCD run that checkpoints every step: every checkpoint left loads, and
    resume goes on from the last to the end."""
    import signal
    import subprocess
    import sys
    import time

    from erasekit import checkpoints

    out = tmp_path / "killed"
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {here!r})\n"
        "from test_ncd import scene_tuples, tiny_components\n"
        "from erasekit.erase.engine import TrainConfig, train\n"
        "from erasekit.erase.ncd import NcdObjective, NcdConfig\n"
        "c = tiny_components()\n"
        f"train(TrainConfig(out={str(out)!r}, steps=100000, batch_size=2, lr=1e-3, checkpoint_every=1,"
        " keep_checkpoints=3, tensorboard=False, export=False), NcdObjective(NcdConfig(lambda_prior=1.0)),"
        " scene_tuples(c), c)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and (latest_checkpoint(out) is None or latest_checkpoint(out).name < "checkpoint-000004"):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    last = latest_checkpoint(out)
    assert last is not None, "the child never wrote a checkpoint"
    step = int(last.name.split("-")[1])
    for ckpt in (out / "checkpoints").glob("checkpoint-??????"):
        assert all(torch.isfinite(v).all() for v in checkpoints.load_file(str(ckpt / "weights.safetensors"))[0].values())
    comps = tiny_components()
    cfg = TrainConfig(out=str(out), steps=step + 2, batch_size=2, lr=1e-3, checkpoint_every=1, keep_checkpoints=3,
                      tensorboard=False, export=True, resume=True, target="red circle")
    result = train(cfg, NcdObjective(NcdConfig(lambda_prior=1.0)), scene_tuples(comps), comps)
    assert result.status == "done" and result.step == step + 2 and result.lora.is_file()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, step + 3))


def test_resume_continues_identically(tmp_path):
    """Stopped at step 3 and resumed, an NCD run ends with the weights of a run never stopped."""
    comps = tiny_components()
    data = scene_tuples(comps)

    def cfg(name, **kw):
        return TrainConfig(out=str(tmp_path / name), steps=6, batch_size=2, lr=1e-3, checkpoint_every=100,
                           tensorboard=False, export=False, **kw)

    straight = train(cfg("a"), NcdObjective(NcdConfig(lambda_prior=1.0)), data, tiny_components())
    stopper = []
    first = train(cfg("b"), NcdObjective(NcdConfig(lambda_prior=1.0)), data, tiny_components(),
                  progress=lambda step, total, terms: step == 3 and stopper.append(1), cancel=lambda: bool(stopper))
    assert first.status == "cancelled" and first.step == 3
    second = train(cfg("b", resume=True), NcdObjective(NcdConfig(lambda_prior=1.0)), data, tiny_components())
    from erasekit import checkpoints

    a = checkpoints.load_file(str(straight.checkpoint / "weights.safetensors"))[0]
    b = checkpoints.load_file(str(second.checkpoint / "weights.safetensors"))[0]
    assert second.step == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_ssr_and_asr_eq12():
    from erasekit.bench.erase import over_seeds, ssr_asr, ssr_seed_list

    found = [[False, False, False, True], [True, False, False, False], [False] * 4]
    out = ssr_asr(found, (1, 3, 4))
    assert out["ssr"] == {"1": round(1 / 3, 4), "3": round(1 / 3, 4), "4": round(2 / 3, 4)}
    assert out["asr"] == round(2 / 12, 4)
    seeds = ssr_seed_list(10, 0)
    assert len(set(seeds)) == 10 and all(1 <= s <= 1024 for s in seeds) and seeds == ssr_seed_list(10, 0)
    runs = [{"method": "ncd", "target": "red circle", "seed": s, "erase_rate": e, "preservation": p,
             "ssr": {"1": e, "3": e, "10": e}, "asr": e} for s, e, p in ((0, 0.9, 0.97), (1, 1.0, 0.93))]
    summary = over_seeds(runs)
    assert summary["erase_rate_min"] == 0.9 and summary["preservation_min"] == 0.93
    assert set(summary["seeds"]) == {"0", "1"} and summary["ssr_mean"]["10"] == 0.95


def test_trainer_page_trains_ncd_with_its_settings(tmp_path):
    """The trainer app, driven as the page drives it (gradio_client): method NCD with pairs uploaded
    for the run, NCD's fields passed as its flags (INPO's left out), the LoRA exported; the method's
    view shows NCD's settings and its preset's learning rate."""
    from gradio_client import Client

    from erasekit.erase.engine import read_config
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.app import TrainerApp
    from trainer.fields import METHODS
    from trainer.work import train_argv

    assert "ncd" in dict((v, k) for k, v in METHODS)
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp_path / "toy")
    app = TrainerApp(tmp_path / "runs", base=str(tmp_path / "toy"), threads=1)
    lr, row, resalign_row, beta, lambda_prior, batch, stop = app.method_view("ncd", "/not/a/toy")
    from erasekit.erase import methods

    assert (batch, stop) == (methods.get("ncd").preset("object")[0]["batch_size"], False)  # the paper's batch, no check
    assert lr == 1e-6 and row["visible"] is True and resalign_row["visible"] is False  # the paper's full-UNet lr
    assert (beta, lambda_prior) == (2000.0, 0.0)  # the paper's beta, no preservation term
    toy_view = app.method_view("ncd", str(tmp_path / "toy"))  # the toy tuning's, not the page's INPO defaults
    assert toy_view[3:5] == (preset("object", toy=True)["beta"], preset("object", toy=True)["lambda_prior"])
    assert toy_view[3] != 2000.0
    assert app.method_view("inpo", str(tmp_path / "toy"))[1]["visible"] is False
    assert app.method_view("inpo", "/not/a/toy")[4] == 0.6  # back to INPO: its own lambda_prior (Alg. 1)
    resalign_view = app.method_view("resalign", str(tmp_path / "toy"))
    assert resalign_view[2]["visible"] is True and resalign_view[5:] == (4, True)  # ResAlign's toy tuning
    argv = train_argv({"method": "ncd", "eta": 2.0, "beta": 500.0, "nca": True, "anchor": "green circle",
                       "lambda_prior": 3.0}, "out")
    assert "--eta" not in argv and argv[argv.index("--beta") + 1] == "500.0" and "--nca" in argv
    assert argv[argv.index("--anchor") + 1] == "green circle" and "--lambda-prior" in argv
    inpo = train_argv({"method": "inpo", "eta": 2.0, "beta": 500.0, "nca": True, "anchor": "green circle"}, "out")
    assert "--eta" in inpo and "--beta" not in inpo and "--nca" not in inpo and "--anchor" not in inpo

    write_pairs(tmp_path / "runs" / "ncd-run" / "uploads" / "forget")
    demo = app.build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        c = Client(demo.local_url, verbose=False)
        kw = {"base": str(tmp_path / "toy"), "run_name": "ncd-run", "target": "red circle", "preserve": "",
              "images_per_concept": 1, "neighbours": 1, "unrelated": 1, "data_steps": 3, "steps": 3, "lr": 0.01,
              "rank": 2, "batch_size": 1, "sample_every": 0, "checkpoint_every": 2, "method": "ncd", "beta": 300.0,
              "pair_reduce": "mean", "harm_weights": "1.2,1.0,0.8", "lambda_prior": 2.0}
        msg, job_id = c.predict(**kw, api_name="/start_training")
        assert "Queued" in msg, msg
        end = time.time() + 300
        while time.time() < end:
            st = c.predict(job_id=job_id, api_name="/job_status")
            if st["state"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert st["state"] == "done", st["message"]
    finally:
        demo.close()
    run = tmp_path / "runs" / "ncd-run"
    resolved = read_config(str(run / "config.toml"))
    assert resolved["ncd"]["beta"] == 300.0 and resolved["ncd"]["pair_reduce"] == "mean"
    assert resolved["ncd"]["harm_weights"] == "1.2,1.0,0.8" and resolved["ncd"]["lambda_prior"] == 2.0
    assert "inpo" not in resolved and resolved["data"]["forget_dir"].endswith("forget")
    lora, meta = lora_io.load_lora(str(run / "erase-red-circle-ncd.safetensors"))
    assert lora and meta["erasekit.method"] == "ncd"
