"""INPO's maths (Eq. 11-16) on hand-computed values, its presets (Table 6), and the objective on
the tiny toy model: zero at the start where theory says so, and erasing when trained."""

import json
import math
from contextlib import contextmanager

import pytest
import torch

from erasekit.erase.data import EraseData, toy_scene_set
from erasekit.erase.engine import StepContext, TrainConfig, train
from erasekit.erase.inpo import (
    PRESETS,
    InpoConfig,
    InpoObjective,
    adaptive_negative_scaling,
    inpo_loss,
    masked_score,
    preset,
    prior_loss,
)
from erasekit.tiny import toy_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sigmoid(u):
    return 1.0 / (1.0 + math.exp(-u))


# ----------------------------------------------------------------------------- equations


def test_adaptive_negative_scaling_eq14():
    d = torch.tensor([0.0, 0.1, 1.0, -0.5], dtype=torch.float64)
    got = adaptive_negative_scaling(d, gamma=3.0, tau=0.1)
    want = [1 / (1 + math.exp(3 * (x - 0.1))) for x in d.tolist()]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert got[1].item() == pytest.approx(0.5)  # alpha(tau) = 1/2
    assert got[0].item() == pytest.approx(0.574442516811659, abs=1e-12)
    assert got[2].item() == pytest.approx(0.06297335605699649, abs=1e-12)


def test_inpo_loss_eq15_and_eq13():
    d = torch.tensor([0.0, 0.1, 1.0, -0.5], dtype=torch.float64)
    # by hand: 2 beta alpha log(1 + exp(-eta dS)), gamma 3, tau 0.1, eta 1, beta 1
    want = [0.7963464218435209, 0.6443966600735709, 0.03945427957420124, 1.671806253358206]
    assert torch.allclose(inpo_loss(d), torch.tensor(want, dtype=torch.float64), atol=1e-12)
    # eta 3 (the style preset), beta 0.5
    want3 = [2 * 0.5 * sigmoid(-3 * (x - 0.1)) * math.log1p(math.exp(-3 * x)) for x in d.tolist()]
    assert torch.allclose(inpo_loss(d, eta=3.0, beta=0.5), torch.tensor(want3, dtype=torch.float64), atol=1e-12)
    # without adaptive scaling: Eq. 13, 2 beta log(1 + exp(-eta dS)); at dS = 0 that is 2 log 2
    want13 = [2 * math.log1p(math.exp(-x)) for x in d.tolist()]
    assert torch.allclose(inpo_loss(d, adaptive=False), torch.tensor(want13, dtype=torch.float64), atol=1e-12)
    assert inpo_loss(torch.tensor([0.0]), adaptive=False).item() == pytest.approx(2 * math.log(2))
    # bounded (Appendix B.1) and finite far out
    big = inpo_loss(torch.tensor([-1e4, 1e4]))
    assert torch.isfinite(big).all() and big[1].item() == pytest.approx(0.0, abs=1e-12)


def test_inpo_gradient_is_eq19():
    """d ell / d dS = 2 beta [-gamma alpha (1 - alpha) log(1 + e^{-eta dS}) - eta alpha sigma(-eta dS)]."""
    gamma, tau, eta, beta = 3.0, 0.1, 2.0, 0.7
    d = torch.tensor([-0.3, 0.0, 0.1, 0.8], dtype=torch.float64, requires_grad=True)
    inpo_loss(d, eta, gamma, tau, beta).sum().backward()
    want = []
    for x in d.detach().tolist():
        a = sigmoid(-gamma * (x - tau))
        want.append(2 * beta * (-gamma * a * (1 - a) * math.log1p(math.exp(-eta * x)) - eta * a * sigmoid(-eta * x)))
    assert torch.allclose(d.grad, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert (d.grad < 0).all()  # minimising the loss always raises dS (pushes the model off the concept)


def test_masked_score_eq11():
    target = torch.zeros(1, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # residual r; r^2 = 1, 4, 9, 16
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert masked_score(pred, target, mask, "mask").item() == pytest.approx((1 + 16) / 2)
    assert masked_score(pred, target, mask, "all").item() == pytest.approx((1 + 16) / 4)
    assert masked_score(pred, target, None).item() == pytest.approx(30 / 4)
    soft = torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]])  # ||M r||^2 = 0.25 + 16; sum M^2 = 1.25
    assert masked_score(pred, target, soft, "mask").item() == pytest.approx(16.25 / 1.25)
    assert masked_score(pred, target, torch.zeros_like(mask)).item() == 0.0
    # the mask broadcasts over channels: 3 channels with the same residual give the same mean
    p3, t3 = pred.expand(1, 3, 2, 2), target.expand(1, 3, 2, 2)
    assert masked_score(p3, t3, mask, "mask").item() == pytest.approx(8.5)
    assert masked_score(torch.stack([pred[0], 2 * pred[0]]), target.expand(2, 1, 2, 2), mask.expand(2, 1, 2, 2)).tolist() \
        == pytest.approx([8.5, 34.0])


def test_prior_loss_eq16():
    a = torch.tensor([[[[1.0, 2.0]]]])
    b = torch.tensor([[[[0.0, 4.0]]]])
    assert prior_loss(a, b).item() == pytest.approx((1 + 4) / 2)


def test_presets_follow_table6():
    assert {k: v["steps"] for k, v in PRESETS.items()} == {"object": 300, "character": 300, "style": 400, "nsfw": 500}
    for row in PRESETS.values():
        assert (row["gamma"], row["tau"], row["lambda_prior"], row["rank"]) == (3.0, 0.1, 0.6, 4)
    assert preset("style")["eta"] == 3.0 and preset("object")["eta"] == 1.0
    assert preset("colour") == preset("object") and preset("shape")["steps"] == 300
    cfg = InpoConfig()
    assert (cfg.eta, cfg.gamma, cfg.tau, cfg.beta, cfg.lambda_prior) == (1.0, 3.0, 0.1, 1.0, 0.6)


# ----------------------------------------------------------------------------- on the tiny model


tiny_components = toy_components  # erasekit/tiny.py


@pytest.fixture(scope="module")
def scene_data():
    comps = tiny_components()
    forget = toy_scene_set(comps, [("red", "circle")], 4, seed=0)
    preserve = toy_scene_set(comps, [("blue", "square")], 4, seed=100, masks=False)
    return EraseData("red circle", forget, preserve, ["blue square"])


def adapters_off(unet):
    """The engine's reference for LoRA mode: the same UNet, adapters disabled, no gradients."""

    @contextmanager
    def reference_ctx():
        unet.disable_adapters()
        try:
            with torch.no_grad():
                yield unet
        finally:
            unet.enable_adapters()

    return reference_ctx


def evaluate(comps, data, repeats=8):
    """INPO's terms averaged over fixed draws (noise, t, images): less noisy than a training step."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(123)
    ctx = StepContext(0, g, DDPMScheduler.from_config(comps.scheduler.config), "cpu", {})
    with torch.no_grad():
        outs = [InpoObjective().loss(data.sample(g, 4), comps.unet, adapters_off(comps.unet), ctx) for _ in range(repeats)]
    return {k: sum(float(o[k]) for o in outs) / repeats for k in outs[0]}


def test_objective_at_the_start_is_the_bound(scene_data):
    """With LoRA's B = 0 the model is the reference: dS = 0 exactly, alpha = sigma(gamma tau),
    L_INPO = 2 beta sigma(gamma tau) log 2 and L_prior = 0."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    comps = tiny_components()
    unet = comps.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    ctx = StepContext(0, g, DDPMScheduler.from_config(comps.scheduler.config), "cpu", {})
    out = InpoObjective().loss(scene_data.sample(g, 2), unet, adapters_off(unet), ctx)
    assert out["delta_s"].item() == 0.0 and out["prior"].item() == 0.0
    assert out["alpha"].item() == pytest.approx(sigmoid(0.3), abs=1e-6)
    assert out["loss"].item() == pytest.approx(2 * sigmoid(0.3) * math.log(2), abs=1e-6)
    out["loss"].backward()
    grads = [p.grad for n, p in unet.named_parameters() if "lora_B" in n]
    assert grads and all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


def test_anchor_term_is_eq16_on_the_forget_images_under_preserved_prompts(scene_data):
    """lambda_anchor (beyond the paper): the third part of the batch is the forget latents with the
    preserve prompts' embeddings, and its term is Eq. 16 between the trained and reference model."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    comps = tiny_components()
    unet = comps.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained-looking adapter, so that model != reference

    def ctx():
        return StepContext(0, torch.Generator().manual_seed(7), DDPMScheduler.from_config(comps.scheduler.config), "cpu", {})

    batch = scene_data.sample(torch.Generator().manual_seed(1), 2)
    cfg = InpoConfig(lambda_anchor=2.0)
    with torch.no_grad():
        out = InpoObjective(cfg).loss(batch, unet, adapters_off(unet), ctx())
        f, p = batch["forget"], batch["preserve"]
        latents = torch.cat([f["latents"], p["latents"], f["latents"]])
        embeds = torch.cat([f["embeds"], p["embeds"], p["embeds"]])
        c = ctx()
        noise, t = c.noise_and_timesteps(latents)
        noisy = c.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=embeds).sample
        unet.disable_adapters()
        ref = unet(noisy, t, encoder_hidden_states=embeds).sample
        unet.enable_adapters()
    assert out["anchor"].item() == pytest.approx(prior_loss(pred[4:], ref[4:]).item(), rel=1e-5)
    assert out["prior"].item() == pytest.approx(prior_loss(pred[2:4], ref[2:4]).item(), rel=1e-5)
    assert out["anchor"].item() > 0
    assert out["loss"].item() == pytest.approx(out["inpo"].item() + cfg.lambda_prior * out["prior"].item()
                                               + 2.0 * out["anchor"].item(), rel=1e-5)
    assert "anchor" not in InpoObjective(InpoConfig()).loss(batch, unet, adapters_off(unet), ctx())


def test_training_raises_delta_s_and_lowers_the_loss(scene_data, tmp_path):
    """12 steps (~3 s): on fixed draws dS rises above 0 and the forget term falls below its start."""
    comps = tiny_components()
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=12, batch_size=2, lr=3e-3, checkpoint_every=100,
                      tensorboard=False, export=False, seed=0)
    train(cfg, InpoObjective(InpoConfig()), scene_data, comps)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["delta_s"] == 0.0 and rows[0]["inpo"] == pytest.approx(2 * sigmoid(0.3) * math.log(2), abs=1e-6)
    after = evaluate(comps, scene_data)
    assert after["delta_s"] > 0.002  # measured 0.0079
    assert after["inpo"] < 2 * sigmoid(0.3) * math.log(2) - 0.005  # measured 0.784 vs 0.796
    assert after["alpha"] < sigmoid(0.3)
