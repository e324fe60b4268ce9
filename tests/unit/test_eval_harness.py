"""The evaluation harness on the bundled toy model: the CLI's JSON line and report, a killed run resumed
without redrawing, LoRAs at a strength, and the errors a user meets."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from erasekit.errors import ErasekitError
from erasekit.eval.harness import EvalConfig, parse_lora, run, shared_seeds
from erasekit.eval.prompts import read_prompts, toy_prompt_rows, write_prompts_csv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(REPO, "models", "toy")
GUIDELINE = os.path.join(REPO, "models", "guideline", "toy-red-circle.safetensors")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts_csv(str(tmp_path_factory.mktemp("p") / "toy.csv"), toy_prompt_rows("red circle", 4, 2))


def _cli(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "erasekit.eval", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_per_image_noise_makes_an_image_independent_of_its_batch(one_thread):
    """What the cache relies on: with per_image_noise an image is the one its seed draws alone."""
    from erasekit import models
    from erasekit.dag.sampling import sample

    comps = models.load(TOY)
    prompts, seeds = ["a red circle", "a blue star and a green ring", "a white square"], [11, 12, 13]
    together = sample(comps, prompts, seeds, steps=4, cfg=3.0, per_image_noise=True).images
    alone = sample(comps, prompts[1:2], seeds[1:2], steps=4, cfg=3.0, per_image_noise=True).images
    assert (together[1] - alone[0]).abs().max() < 1e-4
    # the benchmarks' batch noise: the same image drawn in another batch differs (why the flag exists)
    shared = sample(comps, prompts, seeds, steps=4, cfg=3.0).images
    assert (shared[1] - alone[0]).abs().max() > 1e-2


def test_cli_with_dag_prints_one_json_line_and_writes_the_report(prompts, tmp_path):
    report = tmp_path / "out" / "report.html"
    proc = _cli("--prompts", prompts, "--model", TOY, "--dag", GUIDELINE, "--seeds", "3", "--steps", "10",
                "--cache", str(tmp_path / "cache"), "--report", str(report), "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert "images (base + erased)" in proc.stderr and "36/36" in proc.stderr  # tqdm's bar, on stderr
    for key in ("erase_rate", "asr", "ssr", "preservation", "overhead_ratio", "per_category", "benign"):
        assert key in r
    assert set(r["ssr"]) == {"1", "3"} and r["images"] == 36 and r["images_drawn"] == 36
    assert r["concept"] == "red circle" and r["detector"] == "toy-judge"  # the guideline's concept
    assert r["asr_base"] > 0.5  # the toy model draws the red circle it is asked for
    assert r["asr"] < r["asr_base"] and r["erase_rate"] > 0
    assert r["identical"] == 1.0 and r["preservation"] == 1.0  # DAG leaves benign images bit-identical
    assert set(r["per_category"]) >= {"red circle"} and r["per_category"]["red circle"]["asr"] == r["asr"]
    assert 0 < r["overhead_ratio"] < 0.5
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 36 and page.count("<svg") == 3
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched


def test_a_killed_run_resumes_without_redrawing(prompts, tmp_path):
    """SIGKILL mid-run; the rerun keeps every finished PNG untouched, draws only the rest, and gets the
    images (and figures) an uninterrupted run gets."""
    cache = tmp_path / "cache"
    args = ["--prompts", prompts, "--model", TOY, "--dag", GUIDELINE, "--seeds", "3", "--steps", "6", "--batch", "2",
            "--json", "--threads", "1", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erasekit.eval", *args, "--cache", str(cache)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("*/*.png"))) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*/*.png")}
    assert 6 <= len(before) < 36  # killed part-way
    resumed = _cli(*args, "--cache", str(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = json.loads(resumed.stdout)
    assert r["images_cached"] == len(before) and r["images_drawn"] == 36 - len(before)
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())  # not redrawn
    whole = _cli(*args, "--cache", str(tmp_path / "fresh"))
    w = json.loads(whole.stdout)
    for key in ("erase_rate", "asr", "asr_base", "ssr", "ssr_base", "preservation", "per_category"):
        assert r[key] == w[key], key
    for name in ("base", "erased"):
        mine, theirs = sorted(os.listdir(r["cache"][name])), sorted(os.listdir(w["cache"][name]))
        assert mine == theirs
        from PIL import Image

        for f in (f for f in mine if f.endswith(".png")):
            a = np.asarray(Image.open(os.path.join(r["cache"][name], f))).astype(int)
            b = np.asarray(Image.open(os.path.join(w["cache"][name], f))).astype(int)
            assert np.abs(a - b).max() <= 1, f


def _state(cache):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*/*.png")}


def _kill_when(args, cache, n_png: int):
    """Start the CLI and SIGKILL it once the cache holds at least ``n_png`` PNGs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erasekit.eval", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("*/*.png"))) < n_png and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


@pytest.mark.slow  # 41 s on the shared 2-core machine, 218 s with benchmarks beside it
def test_a_200_prompt_run_killed_twice_resumes_without_redrawing(tmp_path, one_thread):
    """200 prompts (400 images, 2 steps): killed in the base run and again in the erased run; each rerun keeps
    every finished PNG untouched and draws only the rest, and the figures equal a recompute from the cache, whose
    images are the ones each job draws alone."""
    from erasekit import models
    from erasekit.dag.guidance import DagSettings
    from erasekit.dag.guideline import GuidelineEmbedding
    from erasekit.eval.draw import draw

    prompts = write_prompts_csv(str(tmp_path / "p200.csv"), toy_prompt_rows("red circle", 40, 160))
    assert len({r.prompt for r in read_prompts(prompts)}) == 200  # 200 distinct images per run
    cache = tmp_path / "cache"
    args = ["--prompts", prompts, "--model", TOY, "--dag", GUIDELINE, "--seeds", "1", "--steps", "2", "--json",
            "--threads", "1", "--no-progress", "--cache", str(cache)]
    _kill_when(args, cache, 60)  # in the base run
    first = _state(cache)
    assert 60 <= len(first) < 200
    _kill_when(args, cache, 260)  # in the erased run
    second = _state(cache)
    assert 260 <= len(second) < 400
    assert all(second[p] == v for p, v in first.items())  # the first run's images were not redrawn
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = json.loads(resumed.stdout)
    assert r["images"] == 400 and r["images_cached"] == len(second) and r["images_drawn"] == 400 - len(second)
    final = _state(cache)
    assert len(final) == 400 and all(final[p] == v for p, v in second.items())
    # the figures: a recompute from the cached images (draws nothing) gives the same
    again = run(EvalConfig(prompts=prompts, model=TOY, dag=GUIDELINE, seeds=1, steps=2, cache=str(cache), progress=False))
    assert again["images_drawn"] == 0
    for key in ("erase_rate", "erase_rate_images", "asr", "asr_base", "ssr", "ssr_base", "preservation", "identical",
                "per_category", "benign"):
        assert again[key] == r[key], key
    # images drawn before the first kill, between the kills and after them are those their jobs draw alone
    emb = GuidelineEmbedding.load(GUIDELINE)
    comps, seed, picks = models.load(TOY), again["seeds"][0], [0, 39, 40, 120, 199]
    jobs = [(again["_rows"][i].prompt, seed, 3.0) for i in picks]
    alone = {"base": draw(comps, jobs, 2, batch=1),
             "erased": draw(comps, jobs, 2, batch=1, mode="dag", embeddings=[emb], safety_text=emb.concept,
                            dag=DagSettings())}
    for name, d in alone.items():
        for i, im in zip(picks, d.images):
            assert np.abs(again["_images"][name][i][0].astype(int) - im.astype(int)).max() <= 1, (name, i)


def _toy_lora(path, scale: float, concept="red circle"):
    """A random LoRA on the toy UNet's cross-attention (to_k, to_v), saved as the trainer saves one."""
    import torch

    from erasekit import checkpoints, lora_io, models
    from erasekit.lora_io import LoraWeights

    unet = models.load(TOY).unet
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            lora[f"unet.{name}"] = LoraWeights(torch.randn(2, m.in_features, generator=g) * scale,
                                               torch.randn(m.out_features, 2, generator=g) * scale, 2.0)
    return lora_io.save_lora(lora, path, checkpoints.toy(unet.config.cross_attention_dim), erased_concept=concept,
                             method="test", model_card=False)


def test_lora_strength_zero_changes_nothing_and_one_changes_images(prompts, tmp_path, one_thread):
    lora = str(_toy_lora(tmp_path / "erase-red-circle.safetensors", 0.5))
    common = dict(prompts=prompts, model=TOY, seeds=1, steps=4, cache=str(tmp_path / "cache"), progress=False)
    off = run(EvalConfig(loras=[(lora, 0.0)], **common))
    assert off["identical"] == 1.0 and off["concept"] == "red circle"  # the LoRA's own metadata names the target
    on = run(EvalConfig(loras=[parse_lora(f"{lora}:1.0")], **common))
    assert on["identical"] < 1.0 and on["ssim"] < 1.0
    assert on["images_cached"] == 6 and on["images_drawn"] == 6  # the base images came from the cache


def test_errors_name_the_fault(prompts, tmp_path):
    from erasekit import tiny
    from erasekit.bench.lora import add_random_lora
    from erasekit.checkpoints import sd_v1
    from erasekit.lora_io import lora_from_peft, save_lora

    parts = tiny.build("sd_v1", seed=0)
    add_random_lora(parts["unet"], ["to_k", "to_v"], r=2, lora_alpha=2)
    sd1 = str(save_lora(lora_from_peft(unet=parts["unet"]), tmp_path / "sd1.safetensors", sd_v1(tiny.TINY_WIDTH),
                        model_card=False))
    cases = [
        (dict(loras=[(sd1, 1.0)]), "is a LoRA for Stable Diffusion 1.x, but the model is"),
        (dict(loras=[(str(tmp_path / "nope.safetensors"), 1.0)]), "does not exist"),
        (dict(dag=GUIDELINE, model=str(tmp_path / "missing")), "The model .* does not exist"),
        (dict(), "Nothing to evaluate"),
        (dict(dag=GUIDELINE, seeds=2000), "out of range"),
        (dict(dag=GUIDELINE, concept="red blob"), "unknown word 'blob'"),
    ]
    for overrides, message in cases:
        cfg = EvalConfig(**{**dict(prompts=prompts, model=TOY, seeds=1, steps=2, cache=str(tmp_path / "c"),
                                   progress=False), **overrides})
        with pytest.raises(ErasekitError, match=message):
            run(cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = _cli("--prompts", str(empty), "--dag", GUIDELINE)
    assert proc.returncode == 2 and "has no prompts" in proc.stderr and "Traceback" not in proc.stderr


def test_shared_seed_list_and_lora_strength_parsing():
    assert shared_seeds(3) == shared_seeds(10)[:3] and all(1 <= s <= 1024 for s in shared_seeds(50))
    assert len(set(shared_seeds(1024))) == 1024
    assert parse_lora("a/b.safetensors:0.6") == ("a/b.safetensors", 0.6)
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_nudenet_as_the_harness_detector(prompts, tmp_path, one_thread):
    """NudeNet with the papers' classes on toy scenes: nothing flagged, so nothing to erase (None, not 0 or 1),
    and preservation falls back to SSIM against the base image."""
    pytest.importorskip("nudenet")
    r = run(EvalConfig(prompts=prompts, model=TOY, dag=GUIDELINE, seeds=1, steps=4, detector="nudenet",
                       cache=str(tmp_path / "cache"), progress=False))
    assert r["detector"] == "nudenet" and r["threshold"] == 0.6 and len(r["classes"]) == 5
    assert r["asr"] == 0.0 and r["asr_base"] == 0.0 and r["erase_rate"] is None and r["ssr"] == {"1": 0.0}
    assert r["preservation"] == r["ssim"] == 1.0  # DAG leaves the benign images bit-identical
    with pytest.raises(ErasekitError, match="'BREASTS' is not a NudeNet class"):
        run(EvalConfig(prompts=prompts, model=TOY, dag=GUIDELINE, seeds=1, steps=4, detector="nudenet",
                       nudenet_classes="BREASTS", cache=str(tmp_path / "cache"), progress=False))


def test_guideline_detection_as_the_detector(prompts, tmp_path, one_thread):
    """The guideline's own detection, recorded while sampling and kept beside each image: it agrees with the toy
    judge on most base images, and a rerun (any detector) draws nothing."""
    common = dict(prompts=prompts, model=TOY, dag=GUIDELINE, seeds=2, steps=12, cache=str(tmp_path / "cache"),
                  progress=False)
    g = run(EvalConfig(detector="guideline", **common))
    assert g["detector"] == "guideline" and g["concept"] == "red circle" and g["images_drawn"] == 24
    t = run(EvalConfig(detector="toy", **common))
    assert t["images_drawn"] == 0
    verdicts = [(a.unsafe, b.unsafe) for pa, pb in zip(g["_findings"]["base"], t["_findings"]["base"])
                for a, b in zip(pa, pb)]
    assert sum(a == b for a, b in verdicts) / len(verdicts) >= 0.75, verdicts
    assert g["asr_base"] > 0.4 and g["asr"] < g["asr_base"]
    again = run(EvalConfig(detector="guideline", **common))
    assert again["images_drawn"] == 0 and again["asr"] == g["asr"]
    with pytest.raises(ErasekitError, match="only watch the DAG's own embedding"):
        run(EvalConfig(detector="guideline", guideline=str(_toy_lora(tmp_path / "x.safetensors", 0.1)), **common))
