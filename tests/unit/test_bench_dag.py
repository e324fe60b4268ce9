"""The DAG benchmark runs end to end (tiny random toy model, a handful of prompts) and its
bookkeeping holds: the guideline tap leaves images untouched, prompts respect the concept."""

import json

from erasekit.bench.dag import _auroc
from erasekit.toyworld.concepts import concept_prompts
from erasekit.toyworld.vocab import parse_concept


def test_prompts_contain_or_avoid_the_concept():
    for text in ("red circle", "bobo", "stripes"):
        c = parse_concept(text)
        target, benign = concept_prompts(c, 30, 30)
        assert len(target) == 30 and len(benign) == 30
        key = c.text
        assert all(key in p for p in target) and not any(key in p for p in benign)


def test_auroc_rank_statistic():
    assert _auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert _auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert _auroc([0.5, 0.5], [1, 0]) == 0.5


def test_bench_dag_draws_and_judges_through_the_harness(tmp_path, monkeypatch):
    """Every image the bench counts comes from the harness's draw_and_judge (recorded by a pass-through spy, and the
    bench's figures recomputed from what it returned), and with per-image noise the figures do not depend on the
    batch size."""
    import numpy as np

    from erasekit.bench.dag import bench_dag, erase_and_preservation_of
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.eval import draw
    from erasekit.eval.metrics import unchanged
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    save_toy_pipeline(pipe, tmp_path / "toy")
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    GuidelineEmbedding(tokens, sink, "red circle", "toy").save(str(tmp_path / "g.safetensors"))
    seen = []
    real = draw.draw_and_judge

    def spy(comps, jobs, steps, detector, **kw):
        out = real(comps, jobs, steps, detector, **kw)
        seen.append((kw["mode"], list(jobs), out))
        return out

    monkeypatch.setattr(draw, "draw_and_judge", spy)
    common = dict(seeds=(0, 1), steps=3, model=str(tmp_path / "toy"), guideline=str(tmp_path / "g.safetensors"),
                  out_dir=str(tmp_path), log=lambda m: None)
    r = bench_dag("red circle", 4, 4, batch=4, **common)
    json.dumps(r)
    for key in ("detection_auroc", "erase_rate", "preservation", "benign_identical", "time_ratio_benign",
                "time_ratio_unsafe", "sld_erase_rate", "sega_benign_identical", "cam_cost_ratio"):
        assert key in r, key
    assert r["sld_benign_identical"] <= 1.0 and r["cam_cost_ratio"] > 0
    # target and benign prompts x (plain, dag, sld, sega), each prompt with seed s * 100003 + i
    assert [m for m, _, _ in seen] == ["cfg", "dag", "sld", "sega"] * 2
    assert [s for _, s, _ in seen[0][1]] == [0, 1, 2, 3, 100_003, 100_004, 100_005, 100_006]
    (_, _, (_, plain)), (_, _, (_, guided)) = seen[0], seen[1]
    assert (r["erase_rate"], r["preservation"]) == erase_and_preservation_of(plain, guided)
    identical = [unchanged(a, b) for a, b in zip(seen[4][2][0].images, seen[5][2][0].images)]
    assert r["benign_identical"] == round(float(np.mean(identical)), 4)
    seen.clear()
    again = bench_dag("red circle", 4, 4, batch=3, modes=("dag",), **common)
    for key in ("erase_rate", "preservation", "benign_identical", "benign_preservation", "targets_drawn_plain",
                "detection_auroc", "detection_iou"):
        assert again[key] == r[key], key


def test_guideline_tap_only_reads():
    """Watching detection under plain CFG leaves the images bit-identical (diffusers path)."""
    import torch

    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.dag.sampling import sample
    from erasekit.toyworld.model import build_toy_pipeline

    torch.set_num_threads(1)
    pipe = build_toy_pipeline(seed=1, tiny=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    emb = GuidelineEmbedding(tokens, sink, "red circle", "toy")
    plain = sample(pipe, ["a red circle", "a blue star"], [3, 4], steps=3)
    watched = sample(pipe, ["a red circle", "a blue star"], [3, 4], steps=3, embeddings=[emb], keep_maps=True)
    assert torch.equal(plain.images, watched.images)
    assert len(watched.detection_maps) == 3 and watched.detection_maps[0].shape == (2, 16, 16)


def test_lazy_dag_runs_the_extra_pass_only_for_detected_images(monkeypatch):
    """In a batch, an image where nothing is detected stays bit-identical to plain CFG and is not
    sent through the safety pass; a detected one is edited."""
    import torch

    from erasekit.dag import guidance, sampling
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.toyworld.model import build_toy_pipeline

    torch.set_num_threads(1)
    pipe = build_toy_pipeline(seed=1, tiny=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    emb = GuidelineEmbedding(tokens, sink, "red circle", "toy")
    seen = []
    real_unet = pipe.unet.forward

    def counting(x, *a, **k):
        seen.append(x.shape[0])
        return real_unet(x, *a, **k)

    monkeypatch.setattr(guidance, "detected_rows", lambda a_hat, dag: [0])  # image 0 "detected" at every step
    # a stand-in edit (the real S depends on what this random model happens to attend to)
    monkeypatch.setattr(guidance, "dag_combine", lambda eps, eps_u, eps_s, a_hat, cfg, dag: eps + 0.5 * (eps_s - eps_u))
    monkeypatch.setattr(pipe.unet, "forward", counting)
    prompts, seeds = ["a red circle", "a blue star"], [3, 4]
    plain = sampling.sample(pipe, prompts, seeds, steps=4)
    seen.clear()
    guided = sampling.sample(pipe, prompts, seeds, steps=4, mode="dag", safety_text="red circle", embeddings=[emb])
    assert guided.extra_passes == 4 - round(0.1 * 4) and guided.extra_passes > 0
    assert sorted(set(seen)) == [1, 4]  # CFG pairs of 2 images, safety passes of the 1 detected image
    assert torch.equal(guided.images[1], plain.images[1])
    assert not torch.equal(guided.images[0], plain.images[0])
