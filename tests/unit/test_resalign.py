"""ResAlign on the engine (erasekit/erase/resalign.py), on the tiny toy model: functional calls equal
the module, the merged and full weight spaces are the LoRA's own function and pull gradients back
by the chain rule, a run logs its per-step terms, a run killed mid-way resumes bit for bit, an
existing erasure LoRA is the starting point of "harden this LoRA", and what v1 does not do is
refused with one sentence."""

import json
import os
from functools import partial

import pytest
import torch

from erasekit import checkpoints, lora_io
from erasekit.erase import methods
from erasekit.erase.data import EraseData, ImageSet, toy_scene_set
from erasekit.erase.engine import TrainConfig, latest_checkpoint, train
from erasekit.erase.resalign import (
    DEFAULT_POOL,
    InnerConfig,
    ResAlignConfig,
    ResAlignObjective,
    read_pool,
    write_pool,
)
from erasekit.erase.weight_space import WeightSpace
from erasekit.errors import ErasekitError
from erasekit.tiny import toy_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


tiny_components = toy_components  # erasekit/tiny.py


@pytest.fixture(scope="module")
def data():
    comps = tiny_components()
    forget = toy_scene_set(comps, [("red", "circle")], 4, seed=0)
    preserve = toy_scene_set(comps, [("blue", "square")], 4, seed=100, masks=False)
    return EraseData("red circle", forget, preserve, ["blue square"])


@pytest.fixture(scope="module")
def finetune_dir(tmp_path_factory):
    """A folder of fine-tuning images with captions (the tiny model has no toy architecture tag)."""
    from PIL import Image

    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    folder = tmp_path_factory.mktemp("ft")
    for i in range(6):
        s = render_scene(500 + i, objects=[("green", "square")] if i % 2 else [("blue", "triangle")])
        Image.fromarray(upscale_for_display(s.image)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(s.caption)
    return str(folder)


def small_pool(tmp_path):
    path = tmp_path / "pool.toml"
    write_pool(path, [InnerConfig(optimizer="adam", lr=1e-3, steps=2, space=s, batch=2) for s in ("lora", "merged", "full")])
    return str(path)


def objective(finetune_dir, pool, **kw):
    base = dict(iterations=2, configs=1, hvp_batch=2, finetune_images=6, finetune_dir=finetune_dir, pool=pool,
                harm_loss="inpo", alpha_r=1.0, alpha_r_end=2.0)
    return ResAlignObjective(ResAlignConfig(**{**base, **kw}))


def config(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), target="red circle", steps=3, batch_size=2, lr=5e-3, checkpoint_every=2,
                tensorboard=False, export=False, targets="feed-forward")
    return TrainConfig(**{**base, **kw})


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def weights(ckpt):
    return checkpoints.load_file(str(ckpt / "weights.safetensors"))[0]


# ----------------------------------------------------------------------------- functional calls


def lora_unet(seed=0):
    """The tiny UNet with a feed-forward LoRA whose B is not zero (so the adapter changes the output)."""
    from peft import LoraConfig

    from erasekit.erase.engine import unet_lora_targets

    unet = tiny_components(seed).unet.double()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=unet_lora_targets(unet, "feed-forward")))
    g = torch.Generator().manual_seed(5)
    lora = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for p in lora.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    g2 = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 16, 16, generator=g2, dtype=torch.float64)
    c = torch.randn(2, 24, 32, generator=g2, dtype=torch.float64)
    return unet, lora, (x, torch.tensor([50, 700]), {"encoder_hidden_states": c})


def test_functional_call_equals_the_module_in_every_weight_space():
    unet, lora, (x, t, kw) = lora_unet()
    with torch.no_grad():
        own = unet(x, t, **kw).sample
        unet.disable_adapters()
        base = unet(x, t, **kw).sample
        unet.enable_adapters()
    assert (own - base).abs().max() > 1e-4  # the adapter matters: the comparisons below can fail
    for kind in ("lora", "merged", "full"):
        space = WeightSpace(unet, lora, kind)
        with torch.no_grad():
            out = space(space.start, x, t, kw)
        assert torch.allclose(out, own, atol=1e-10), kind
    # a changed weight in the dict changes the call as the same change in the module does
    space = WeightSpace(unet, lora, "lora")
    name = next(n for n in space.start if ".lora_B." in n)  # (a constant added to A meets layer-normed inputs: no change)
    moved = {**space.start, name: space.start[name] + 0.1}
    with torch.no_grad():
        out = space(moved, x, t, kw)
        lora[name] += 0.1
        expected = unet(x, t, **kw).sample
        lora[name] -= 0.1
    assert torch.allclose(out, expected, atol=1e-10) and not torch.allclose(out, own)


def test_merged_and_full_spaces_pull_gradients_back_by_the_chain_rule():
    """grad over the LoRA of f(W0 + s B A) = pull_back(grad over W of f(W)): the merge's VJP."""
    unet, lora, (x, t, kw) = lora_unet()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    lspace = WeightSpace(unet, lora, "lora")
    p = {k: v.clone().requires_grad_(True) for k, v in lspace.start.items()}
    direct = torch.autograd.grad(((lspace(p, x, t, kw) - eps) ** 2).mean(), list(p.values()))
    for kind in ("merged", "full"):
        space = WeightSpace(unet, lora, kind)
        q = {k: v.clone().requires_grad_(True) for k, v in space.start.items()}
        gw = torch.autograd.grad(((space(q, x, t, kw) - eps) ** 2).mean(), list(q.values()))
        pulled = space.pull_back(dict(zip(q, gw)))
        assert set(pulled) == set(lora)
        for k, d in zip(p, direct):
            assert torch.allclose(pulled[k], d, atol=1e-10, rtol=1e-7), (kind, k)


def test_pool_reads_and_refuses_with_one_sentence(tmp_path):
    assert len(read_pool("")) == len(DEFAULT_POOL)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[config]]\noptimizer = "rmsprop"\n')
    with pytest.raises(ErasekitError, match="optimizer = 'rmsprop'.*sgd, adam"):
        read_pool(str(bad))
    bad.write_text('[[config]]\nlearning_rate = 1e-4\n')
    with pytest.raises(ErasekitError, match="unknown keys \\['learning_rate'\\]"):
        read_pool(str(bad))
    bad.write_text('[train]\nsteps = 3\n')
    with pytest.raises(ErasekitError, match="no \\[\\[config\\]\\] tables"):
        read_pool(str(bad))


def test_alpha_ramp_follows_the_official_sigmoid():
    obj = ResAlignObjective(ResAlignConfig(alpha_r=1.6, alpha_r_end=2.0))
    obj.total_steps = 100
    assert obj.alpha_at(0) == obj.alpha_at(49) == 1.6
    assert obj.alpha_at(75) == pytest.approx(1.8)
    assert obj.alpha_at(100) == pytest.approx(1.6 + 0.4 / (1 + 2.718281828 ** -5), rel=1e-6)
    assert 1.6 < obj.alpha_at(60) < obj.alpha_at(90) < 2.0


# ----------------------------------------------------------------------------- training


def test_a_run_logs_the_outer_step_terms_and_the_hypergradient_moves_the_weights(data, tmp_path, finetune_dir):
    pool = small_pool(tmp_path)
    result = train(config(tmp_path, steps=2), objective(finetune_dir, pool), data, tiny_components())
    assert result.status == "done" and result.step == 2
    rows = metrics(tmp_path / "run")
    for key in ("harm", "harm_star", "retain", "hyper_norm", "residual", "rho", "guard", "fallback", "hvps", "drift",
                "alpha", "objective"):
        assert key in rows[0] and all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    assert all(r["hyper_norm"] > 0 and r["drift"] > 0 for r in rows)
    assert all(r["hvps"] + r["fallback"] >= 1 for r in rows)  # K = 2: one product, or a counted fall-back
    assert read_pool(str(tmp_path / "run" / "pool.toml")) == read_pool(pool)  # the run keeps the pool it used
    # beta = 0 is the plain control: same data, no fine-tune terms, other weights
    control = train(config(tmp_path, "control", steps=2), objective(finetune_dir, pool, beta=0.0), data,
                    tiny_components())
    assert "hyper_norm" not in metrics(tmp_path / "control")[0]
    a, b = weights(result.checkpoint), weights(control.checkpoint)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text", [False, True], ids=["", "with-r-text"])
def test_a_killed_run_resumes_identically(data, tmp_path, finetune_dir, text):
    """Also with R_text on the cross-attention layers: its prompts are drawn from the checkpointed generator."""
    pool = small_pool(tmp_path)
    layers = {"targets": "cross-attention"} if text else {}
    objective_ = partial(objective, finetune_dir, pool, **({"text_retain": 10.0} if text else {}))
    straight = train(config(tmp_path, "a", steps=4, checkpoint_every=2, **layers), objective_(), data, tiny_components())
    stopper = []
    cfg = config(tmp_path, "b", steps=4, checkpoint_every=2, **layers)
    first = train(cfg, objective_(), data, tiny_components(),
                  progress=lambda step, total, terms: step == 3 and stopper.append(1), cancel=lambda: bool(stopper))
    assert first.status == "cancelled" and first.step == 3
    # a kill -9 after step 3's log line but before any checkpoint of it: the run restarts from step 2's
    (tmp_path / "b" / "checkpoints" / "checkpoint-000003").rename(tmp_path / "b" / "checkpoints" / "gone")
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "gone")
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-000002"
    cfg.resume = True
    second = train(cfg, objective_(), data, tiny_components())
    assert second.status == "done" and second.step == 4
    a, b = weights(straight.checkpoint), weights(second.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["hyper_norm"] for r in rows_b] == [r["hyper_norm"] for r in rows_a]
    assert all(("text_retain" in r) == text for r in rows_b)


def test_harden_this_lora_starts_from_the_file(data, tmp_path, finetune_dir):
    """init_lora: an INPO erasure LoRA (kohya file) is the starting point: before any ResAlign update
    the trained adapter makes exactly the file's weight change."""
    from erasekit.erase.inpo import InpoObjective

    inpo = train(config(tmp_path, "inpo", steps=2, export=True), InpoObjective(), data, tiny_components())
    seen = []

    class First(ResAlignObjective):
        def loss(self, batch, unet, reference_ctx, ctx):
            if not seen:
                seen.append(lora_io.lora_from_peft(ctx.base_unet))
            return super().loss(batch, unet, reference_ctx, ctx)

    obj = First(objective(finetune_dir, small_pool(tmp_path), init_lora=str(inpo.lora)).config)
    train(config(tmp_path, "hard", steps=1, alpha=8.0), obj, data, tiny_components())
    file, _ = lora_io.load_lora(str(inpo.lora))
    assert set(seen[0]) == set(file)
    for k, w in file.items():
        assert torch.allclose(seen[0][k].delta(), w.delta(), atol=1e-6), k
    wrong = objective(finetune_dir, small_pool(tmp_path), init_lora=str(inpo.lora))
    with pytest.raises(ErasekitError, match="rank 4, this run 2; set --rank 4"):
        train(config(tmp_path, "wrong", steps=1, rank=2), wrong, data, tiny_components())


@pytest.mark.parametrize("setting,message", [
    ({"mixed_precision": "bf16"}, "float32 only.*--mixed-precision no"),
    ({"train_text_encoder": True}, "UNet LoRA only.*--train-text-encoder off"),
    ({"mode": "full"}, "mode = \"lora\""),
])
def test_what_v1_does_not_do_is_refused_with_one_sentence(data, tmp_path, finetune_dir, setting, message):
    with pytest.raises(ErasekitError, match=message) as err:
        train(config(tmp_path, **setting), objective(finetune_dir, ""), data, tiny_components())
    assert "\n" not in str(err.value)


def test_resalign_is_a_registered_method():
    m = methods.get("resalign")
    train_row, method_row = m.preset("colour", toy=True)
    assert train_row["targets"] == "cross-attention" and method_row["harm_loss"] == "relative"
    assert train_row["stop_when_erased"] is True and train_row["erase_check_clean"] == 3  # TrainConfig settings
    assert "stop_when_erased" not in method_row
    assert isinstance(m.objective(), ResAlignObjective)
    assert {"beta", "iterations", "configs", "init-lora", "pool"} <= {f.flag for f in m.flags}


def test_the_finetune_set_mixes_benign_and_target_images(data, finetune_dir):
    obj = objective(finetune_dir, "", finetune_target_share=0.5)
    from erasekit.erase.resalign_data import finetune_set

    ft = finetune_set(tiny_components(), data, obj.config)
    assert isinstance(ft, ImageSet) and len(ft) == 6 + 3  # the folder's six, plus half of six as target images
    assert ft.prompts[-3:] == data.forget.prompts[:3]


def test_the_trainer_page_and_cli_pass_resalign_settings_only_to_resalign():
    """The page holds every method's fields; a run gets its own method's flags only (the CLI refuses
    another method's), and the CLI resolves them into the [resalign] table."""
    from trainer.arguments import build_parser
    from trainer.runner import resolve
    from trainer.work import train_argv

    page = {"method": "resalign", "target": "red circle", "steps": 5, "eta": 1.0, "gamma": 3.0, "lambda_prior": 0.6,
            "resalign_beta": 0.5, "iterations": 2, "configs": 1, "pool": "", "init_lora": "runs/x/erase.safetensors"}
    argv = train_argv(page, "runs/ra")
    assert "--eta" not in argv and "--lambda-prior" not in argv
    assert argv[argv.index("--beta") + 1] == "0.5" and argv[argv.index("--init-lora") + 1] == "runs/x/erase.safetensors"
    tables = resolve(build_parser().parse_args(argv), "object", toy=True)
    assert tables["method"]["beta"] == 0.5 and tables["method"]["iterations"] == 2
    assert tables["method"]["init_lora"] == "runs/x/erase.safetensors"
    assert tables["train"]["steps"] == 5 and tables["train"]["stop_when_erased"] is False  # hardening: no check; the page's steps
    inpo = train_argv({**page, "method": "inpo"}, "runs/inpo")
    assert "--beta" not in inpo and "--init-lora" not in inpo and "--eta" in inpo


def test_harden_this_lora_trains_the_layers_and_rank_the_file_has(tmp_path):
    """--init-lora: the run takes its targets and rank from the LoRA file (whatever layers made it),
    unless a flag or the config file says otherwise; a file of mixed ranks is refused in one sentence."""
    from peft import LoraConfig

    from erasekit import checkpoints
    from erasekit.erase.resalign_data import lora_layout
    from trainer.arguments import build_parser
    from trainer.runner import resolve

    unet = tiny_components().unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "ff.net.2"]))
    path = lora_io.save_lora(lora_io.lora_from_peft(unet), str(tmp_path / "e.safetensors"),
                             checkpoints.toy(unet.config.cross_attention_dim), model_card=False)
    layout = lora_layout(path)
    assert layout == {"targets": "attn1.to_k,attn2.to_k,ff.net.2", "rank": 2}
    argv = ["train", "--method", "resalign", "--target", "red circle", "--init-lora", path]
    tables = resolve(build_parser().parse_args(argv), "object", toy=True)
    assert tables["train"]["targets"] == layout["targets"] and tables["train"]["rank"] == 2
    told = resolve(build_parser().parse_args([*argv, "--targets", "attention", "--rank", "4"]), "object", toy=True)
    assert told["train"]["targets"] == "attention" and told["train"]["rank"] == 4  # the flags win (load_into then refuses)
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.runner import prepare

    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp_path / "toy")
    said = []  # the page always sends its checkbox: a hardening run is told, and trains its steps
    run = prepare(build_parser().parse_args([*argv, "--base", str(tmp_path / "toy"), "--out", str(tmp_path / "run"),
                                             "--stop-when-erased"]), log=said.append, with_data=False)
    assert run["config"].stop_when_erased is False and any("starts erased" in m for m in said)
    lora = lora_io.load_lora(path)[0]
    first = next(iter(lora))
    lora[first] = lora_io.LoraWeights(lora[first].down.repeat(2, 1), lora[first].up.repeat(1, 2), lora[first].alpha)
    mixed = lora_io.save_lora(lora, str(tmp_path / "m.safetensors"), checkpoints.toy(unet.config.cross_attention_dim),
                              model_card=False)
    with pytest.raises(ErasekitError, match="mixes ranks \\[2, 4\\]"):
        lora_layout(mixed)


@pytest.mark.slow  # ~1 min: the toy model draws its own forget and preserve images
def test_cli_hardens_an_erasure_lora_on_the_toy_model(tmp_path, capsys):
    """python -m trainer train --method resalign --init-lora <an INPO LoRA> on the bundled toy model
    (its own data, rendered fine-tuning scenes): the LoRA it exports, the terms it logged."""
    from trainer.cli import main

    small = ["--target", "red circle", "--forget-images", "2", "--images-per-concept", "1", "--threads", "1"]
    assert main(["train", "--method", "inpo", "--out", str(tmp_path / "inpo"), "--steps", "2", *small]) == 0
    lora = next((tmp_path / "inpo").glob("erase-*.safetensors"))
    argv = ["train", "--method", "resalign", "--out", str(tmp_path / "ra"), "--steps", "2", "--init-lora", str(lora),
            "--finetune-images", "4", *small]
    assert main(argv) == 0
    assert "erase-red-circle-resalign.safetensors" in capsys.readouterr().out
    rows = metrics(tmp_path / "ra")
    assert [r["step"] for r in rows] == [1, 2] and all("harm_star" in r and "guard" in r for r in rows)
    _, meta = lora_io.load_lora(str(tmp_path / "ra" / "erase-red-circle-resalign.safetensors"))
    assert "resalign" in json.dumps(meta)


def test_relative_harm_on_hand_computed_values():
    """relative: -mean(min((e - e0) / (e0 + 1e-3), cap)), e and e0 the per-image squared errors."""
    import torch

    from erasekit.erase.harm_losses import relative_harm
    from erasekit.erase.resalign import ResAlignConfig

    target = torch.zeros(2, 1, 1, 2)
    pred = torch.tensor([[[[1.0, 1.0]]], [[[3.0, 3.0]]]])  # e = 1, 9
    ref = torch.tensor([[[[1.0, 1.0]]], [[[1.0, 1.0]]]])  # e0 = 1, 1
    cfg = ResAlignConfig(harm_loss="relative", harm_cap=5.0)
    got = relative_harm(pred.requires_grad_(True), target, ref, {}, cfg)
    want = -(0.0 + 5.0) / 2  # (1 - 1) / 1.001 = 0; (9 - 1) / 1.001 = 7.99 capped at 5
    assert abs(float(got) - want) < 1e-6
    (g,) = torch.autograd.grad(got, pred)
    assert g[1].abs().sum() == 0 and g[0].abs().sum() > 0  # past the cap the image pulls no more


# ----------------------------------------------------------------------------- NCD's loss as the harm (Tab. 9)


def ncd_tuples(comps, n=4):
    """n rendered five-tuples: a green circle (safe) and three red circles under "a red circle"."""
    from erasekit.erase.ncd_data import NcdData

    safe = toy_scene_set(comps, [("green", "circle")], n, seed=0, masks=False)
    harm = [toy_scene_set(comps, [("red", "circle")], n, seed=100 * j, masks=False) for j in (1, 2, 3)]
    keep = toy_scene_set(comps, [("blue", "square")], n, seed=500, masks=False)
    return NcdData("red circle", torch.stack([safe.latents] + [h.latents for h in harm], 1), harm[0].embeds,
                   harm[0].ids, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n), torch.tensor([[0.0, 0.2, 0.1, 0.3]] * n),
                   harm[0].prompts, safe.prompts, preserve=keep, preserved=["blue square"])


def test_ncd_harm_is_l_mod_plus_lambda_l_pair_on_hand_computed_values():
    """harm_loss "ncd": Eq. 10 rewards against the reference, Eq. 11 weights, Eq. 14 + 0.5 Eq. 18 (sum),
    computed here from the formulas on per-candidate errors chosen by hand (B = 1, K = 4)."""
    import math

    from erasekit.erase.harm_losses import ncd_harm

    target = torch.zeros(4, 1, 1, 1)
    pred = torch.tensor([1.0, 2.0, 1.0, 3.0]).reshape(4, 1, 1, 1)  # err 1, 4, 1, 9
    ref = torch.tensor([2.0, 1.0, 1.0, 1.0]).reshape(4, 1, 1, 1)  # err_ref 4, 1, 1, 1
    extra = {"scores": torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "harm": torch.tensor([[0.0, 0.5, 0.2, 0.9]])}
    cfg = ResAlignConfig(harm_loss="ncd", ncd_beta=0.5)
    got = float(ncd_harm(pred, target, ref, extra, cfg))
    r = [0.25 * (4 - 1), 0.25 * (1 - 4), 0.0, 0.25 * (1 - 9)]  # (beta / 2)(err_ref - err)
    ls = lambda u: -math.log1p(math.exp(-u))  # log sigma
    e = [math.exp((1.01) / 0.1)] + [1.0] * 3  # softmax((s + 0.01 [i = 0]) / 0.1)
    w = [x / sum(e) for x in e]
    l_mod = -(sum(wi * ls(ri) for wi, ri in zip(w, r)) + sum(ls(-ri) for ri in r[1:]) / 4)
    l_pair = -sum(ls(r[0] - ri) for ri in r[1:])
    assert abs(got - (l_mod + 0.5 * l_pair)) < 1e-5


def test_resalign_hardens_on_ncd_tuples(tmp_path, finetune_dir):
    """harm_loss "ncd" trains on NCD's tuples: the harm and its post-fine-tune value are logged, the
    hypergradient moves the weights, and D_FT takes its target images from the harmful candidates."""
    from erasekit.erase.resalign_data import finetune_set

    comps = tiny_components()
    tuples = ncd_tuples(comps)
    obj = objective(finetune_dir, small_pool(tmp_path), harm_loss="ncd", ncd_beta=90.0, finetune_target_share=0.5)
    ft = finetune_set(comps, tuples, obj.config)
    assert len(ft) == 6 + 3 and ft.prompts[-3:] == [tuples.prompts[0]] * 3
    assert torch.equal(ft.latents[-3:], tuples.latents[:1, 1:].flatten(0, 1))  # tuple 0's three harmful images
    result = train(config(tmp_path, steps=2), obj, tuples, tiny_components())
    assert result.status == "done" and result.step == 2
    rows = metrics(tmp_path / "run")
    assert all(math_finite(r["harm"]) and math_finite(r["harm_star"]) and r["hyper_norm"] > 0 for r in rows)
    control = train(config(tmp_path, "control", steps=2), objective(finetune_dir, "", harm_loss="ncd", beta=0.0), tuples,
                    tiny_components())  # the same NCD harm without the fine-tune term
    a, b = weights(result.checkpoint), weights(control.checkpoint)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def math_finite(x) -> bool:
    return bool(torch.isfinite(torch.tensor(float(x))))


def test_the_harm_loss_and_the_data_must_match(data, tmp_path, finetune_dir):
    """NCD's loss needs tuples and the per-image losses need forget images: a mismatch (data made for
    another harm loss) is refused with one sentence before any step."""
    tuples = ncd_tuples(tiny_components())
    with pytest.raises(ErasekitError, match="'inpo' trains on forget and preserve images, but the data holds NCD's"):
        train(config(tmp_path, "a"), objective(finetune_dir, ""), tuples, tiny_components())
    with pytest.raises(ErasekitError, match="'ncd' trains on NCD's five-tuples, but the data holds forget images"):
        train(config(tmp_path, "b"), objective(finetune_dir, "", harm_loss="ncd"), data, tiny_components())


def test_resalign_makes_the_data_its_harm_loss_needs(monkeypatch):
    """The run's method settings choose ResAlign's data: NCD's tuples for harm_loss "ncd", else
    INPO's forget and preserve sets."""
    from erasekit.erase import data as data_mod
    from erasekit.erase import ncd_data

    made = []
    monkeypatch.setattr(ncd_data, "build_ncd_data", lambda *a, **k: made.append("tuples") or "T")
    monkeypatch.setattr(data_mod, "build_erase_data", lambda *a, **k: made.append("sets") or "S")
    m = methods.get("resalign")
    assert m.build_data(None, "red circle", m.data_config(), method_config=ResAlignConfig(harm_loss="ncd")) == "T"
    assert m.build_data(None, "red circle", m.data_config(), method_config=ResAlignConfig(harm_loss="inpo")) == "S"
    assert m.build_data(None, "red circle", m.data_config()) == "S" and made == ["tuples", "sets", "sets"]


def test_the_page_sends_the_harm_loss_only_when_chosen():
    from trainer.arguments import build_parser
    from trainer.runner import resolve
    from trainer.work import train_argv

    page = {"method": "resalign", "target": "red circle", "harm_loss": "preset"}
    assert "--harm-loss" not in train_argv(page, "runs/ra")
    argv = train_argv({**page, "harm_loss": "ncd"}, "runs/ra")
    assert argv[argv.index("--harm-loss") + 1] == "ncd"
    assert resolve(build_parser().parse_args(argv), "object", toy=True)["method"]["harm_loss"] == "ncd"
    assert "--harm-loss" not in train_argv({**page, "method": "inpo", "harm_loss": "ncd"}, "runs/inpo")


def _cross_attention_lora(unet):
    from peft import LoraConfig

    from erasekit.erase.engine import TARGET_PRESETS

    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TARGET_PRESETS["cross-attention"]))
    return unet


def test_text_retain_is_the_relative_change_of_the_keys_and_values():
    """R_text = mean over the to_k / to_v LoRA layers of E||dW c||^2 / E||W c||^2 on the prompts' tokens:
    0 for a fresh LoRA (B = 0), the hand-computed value once B moves, 0 for a LoRA without such layers."""
    from erasekit.dag.conditioning import encode
    from erasekit.erase.text_retain import TextRetain

    comps = tiny_components()
    unet = _cross_attention_lora(comps.unet)
    prompts = ["a blue square", "a green ring and a red star"]
    term = TextRetain(unet, comps, prompts)
    assert {n.rsplit(".", 1)[-1] for n, _ in term.layers} == {"to_k", "to_v"}
    assert float(term(8)) == 0.0
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in term.layers:
            m.lora_B["default"].weight.normal_()
    c = encode(comps, prompts).states.float()
    want = []
    for _, m in term.layers:
        w, a, b = m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight
        want.append(((c @ (b @ a).T * m.scaling["default"]) ** 2).sum(-1).mean() / ((c @ w.T) ** 2).sum(-1).mean())
    assert torch.allclose(term(8), torch.stack(want).mean(), rtol=1e-4)

    ff = tiny_components().unet
    from peft import LoraConfig

    ff.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["ff.net.2"]))
    assert float(TextRetain(ff, comps, prompts)(8)) == 0.0  # a feed-forward LoRA cannot change keys or values


def test_text_retain_holds_the_keys_and_values_of_benign_prompts(data, tmp_path):
    """The control (beta 0) on the cross-attention layers: with a large text_retain weight the LoRA
    changes the benign prompts' keys and values far less than with a negligible one."""
    def run(name, weight):
        cfg = ResAlignConfig(beta=0.0, harm_loss="ga", alpha_r=0.0, alpha_r_end=0.0, text_retain=weight)
        train(config(tmp_path, name, steps=6, lr=2e-2, targets="cross-attention"), ResAlignObjective(cfg), data,
              tiny_components())
        return metrics(tmp_path / name)[-1]["text_retain"]

    assert run("held", 1e4) < 0.1 * run("free", 1e-9)


# ----------------------------------------------------------------------------- net of the fine-tune's damage (Eq. 3n)


@pytest.mark.parametrize("loss", ["ga", "inpo", "relative"])
def test_net_harm_star_is_the_forget_harm_less_the_benign_harm(loss):
    """Eq. 3n: with net_of_damage, L_h(theta*) on the forget images less the same loss on the preserve
    images' x_t; a fine-tune that hurts forget and benign images alike (here: the same images twice)
    gives 0 and no gradient, where the plain harm reads it as erasure."""
    unet, lora, (x, t, kw) = lora_unet()
    space = WeightSpace(unet, lora, "merged")
    g = torch.Generator().manual_seed(7)
    target = torch.randn(x.shape, generator=g, dtype=x.dtype)
    with torch.no_grad():
        ref = space(space.start, x, t, kw) + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in space.start.items()}
    plain = ResAlignObjective(ResAlignConfig(harm_loss=loss))
    net = ResAlignObjective(ResAlignConfig(harm_loss=loss, net_of_damage=True))

    harm, damage = plain.harm_star(space, params, (x, t, kw, target, ref, {}, 2))
    assert damage is None
    twice = {"encoder_hidden_states": kw["encoder_hidden_states"].repeat(2, 1, 1)}
    same = (x.repeat(2, 1, 1, 1), t.repeat(2), twice, target.repeat(2, 1, 1, 1), ref.repeat(2, 1, 1, 1), {}, 2)
    zero, damage = net.harm_star(space, params, same)
    assert abs(float(zero)) < 1e-12 and abs(float(damage) + float(harm)) < 1e-9  # damage = -L_h(preserve)
    grads = torch.autograd.grad(zero, list(params.values()), allow_unused=True)
    assert all(gr is None or gr.abs().max() < 1e-12 for gr in grads)
    # other preserve images: exactly the difference of the two plain harms
    xb, targetb, refb = x.flip(0) * 0.5, target * 0.3, ref.flip(0)
    both = (torch.cat([x, xb]), torch.cat([t, t.flip(0)]), twice, torch.cat([target, targetb]), torch.cat([ref, refb]), {}, 2)
    got, damage = net.harm_star(space, params, both)
    benign, _ = plain.harm_star(space, params, (xb, t.flip(0), kw, targetb, refb, {}, 2))
    assert abs(float(got) - (float(harm) - float(benign))) < 1e-9 and abs(float(damage) + float(benign)) < 1e-9
    assert abs(float(benign) - float(harm)) > 1e-4  # the two differ: the check above can fail


def test_a_run_net_of_damage_logs_the_damage_and_takes_another_path(data, tmp_path, finetune_dir):
    pool = small_pool(tmp_path)
    plain = train(config(tmp_path, "plain", steps=2), objective(finetune_dir, pool), data, tiny_components())
    net = train(config(tmp_path, "net", steps=2), objective(finetune_dir, pool, net_of_damage=True), data,
                tiny_components())
    rows = metrics(tmp_path / "net")
    assert all(math_finite(r["damage"]) and math_finite(r["harm_star"]) for r in rows)
    assert "damage" not in metrics(tmp_path / "plain")[0]
    a, b = weights(plain.checkpoint), weights(net.checkpoint)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_net_of_damage_needs_preserve_images_and_image_harm(data, tmp_path, finetune_dir):
    bare = type(data)(data.target, data.forget, None, [])
    with pytest.raises(ErasekitError, match="net_of_damage measures a fine-tune's damage on the preserve images"):
        train(config(tmp_path, "a"), objective(finetune_dir, small_pool(tmp_path), net_of_damage=True), bare,
              tiny_components())
    tuples = ncd_tuples(tiny_components())
    with pytest.raises(ErasekitError, match="net_of_damage compares the harm of forget and preserve images"):
        train(config(tmp_path, "b"), objective(finetune_dir, "", harm_loss="ncd", net_of_damage=True), tuples,
              tiny_components())
