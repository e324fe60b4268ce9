"""The resilience benchmark (erasekit/bench/resilience.py): attack arms hold what they claim (exact
scene labels), the attack moves every weight of the merged UNet, and (slow) the whole benchmark runs
end to end on the real toy model with its smallest profile and reports the issue's keys."""

import json
import subprocess
import sys

import pytest
import torch

from erasekit.bench.resilience import ARM_SEED, arm_scenes
from erasekit.toyworld.concepts import concept_mask
from erasekit.toyworld.vocab import parse_concept

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_attack_arms_hold_what_they_claim():
    concept = parse_concept("red circle")
    has = lambda s: bool(concept_mask(s, concept).any())  # noqa: E731
    a, b, c, d = (arm_scenes(concept, arm, 20) for arm in "abcd")
    assert all(has(s) for s in a)
    assert not any(has(s) for s in b) and not any(has(s) for s in c)
    assert all(any(o.colour == "red" or o.shape == "circle" for o in s.objects) for s in b)  # neighbours
    assert not any(o.colour == "red" or o.shape == "circle" for s in c for o in s.objects)  # unrelated
    assert sum(has(s) for s in d) == 4  # 20% of the images show the target
    assert [s.caption for s in arm_scenes(concept, "b", 5)] == [s.caption for s in b[:5]]  # deterministic
    assert ARM_SEED != 7_000_000  # ResAlign's fine-tuning scenes come from other seeds


def test_the_attack_fine_tunes_every_weight():
    from diffusers import DDPMScheduler

    from erasekit import models
    from erasekit.bench.resilience import attack, encode_scenes
    from erasekit.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(0, tiny=True)
    comps = models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)
    data = encode_scenes(comps, arm_scenes(parse_concept("red circle"), "a", 4))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attack(pipe.unet, data, DDPMScheduler.from_config(pipe.scheduler.config), steps=2, seed=0)
    moved = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > 0.9 * len(before)


def test_deviation_is_the_mean_squared_change_of_the_noise_prediction():
    import copy

    from diffusers import DDPMScheduler

    from erasekit import models
    from erasekit.bench.resilience import deviation, encode_scenes
    from erasekit.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(0, tiny=True)
    comps = models.from_modules(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler)
    data = encode_scenes(comps, arm_scenes(parse_concept("red circle"), "a", 4))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    base = pipe.unet.eval()
    assert deviation(copy.deepcopy(base), base, data, sched, n=8) == 0.0
    shifted = copy.deepcopy(base)
    with torch.no_grad():
        shifted.conv_out.bias += 0.1  # every predicted value moves by exactly 0.1
    assert deviation(shifted, base, data, sched, n=8) == pytest.approx(0.01, rel=1e-4)
    moved = copy.deepcopy(base)
    with torch.no_grad():
        moved.conv_in.weight.mul_(1.5)
    first = deviation(moved, base, data, sched, n=8)
    assert first > 0 and deviation(moved, base, data, sched, n=8) == first  # the same images, noise and t each time


@pytest.mark.slow
@pytest.mark.parametrize("harm_loss,hardened", [("relative", None), ("ncd", "ncd"), ("relative", "plain")])
def test_resilience_benchmark_end_to_end(tmp_path, harm_loss, hardened):
    """Every method and arm on the smoke profile; ResAlign and its control erase from the base model with
    the toy tuning, or with NCD's harm loss harden NCD's LoRA (on NCD's tuples, its layers and rank), or
    (``--harden plain``) the control erases and ResAlign hardens the control's LoRA."""
    harden = ["--harden", hardened, "--beta", "0.5"] if hardened == "plain" else []
    out = subprocess.run([sys.executable, "-m", "erasekit.bench", "resilience", "--profile", "smoke", "--threads", "1",
                          "--harm-loss", harm_loss, "--resalign-steps", "3", "--out", str(tmp_path), "--json", *harden],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("resalign_erase_rate", "resalign_preservation", "resalign_erase_after", "plain_erase_after",
                "inpo_erase_after", "ncd_erase_after", "attack", "seconds", "resalign_peak_mem_ratio_vs_inpo"):
        assert key in row, key
    assert set(row["methods"]) == {"plain", "inpo", "ncd", "resalign"}
    for m in row["methods"].values():
        assert 0.0 <= m["erase_rate"] <= 1.0 and m["arms"]["d"]["erase_rate"].keys() == {"0", "2"}
        assert "lora_attack" in m
        assert m["deviation"].keys() == {"target", "d"} and min(m["deviation"].values()) >= 0  # on the target and arm d
    assert row["hardened"] == hardened
    assert row["resalign_overrides"] == {"harm_loss": harm_loss, "steps": 3, **({"beta": 0.5} if harden else {})}
    for name in ("plain", "resalign"):  # the overrides reach ResAlign and its control alike
        settings = row["training"][name]["settings"]
        assert settings["harm_loss"] == harm_loss and row["training"][name]["steps"] == 3
        if hardened == "plain":  # the control from the base model, checked as the toy tuning; ResAlign from its LoRA
            lora = row["training"]["plain"]["lora"]
            assert settings.get("init_lora") == (lora if name == "resalign" else None)
            assert settings["stop_when_erased"] is (name == "plain") and settings["beta"] == (0.0 if name == "plain" else 0.5)
            assert settings["targets"] == ("cross-attention" if name == "plain" else "attn2.to_k,attn2.to_out.0,attn2.to_q,attn2.to_v")
        elif hardened:
            assert settings["init_lora"] == row["training"][hardened]["lora"]
            assert settings["targets"] == "ff.net.0.proj,ff.net.2" and settings["stop_when_erased"] is False
        else:
            assert "init_lora" not in settings and settings["targets"] == "cross-attention"
