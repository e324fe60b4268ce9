"""The DAG benchmark runs end to end (tiny random toy model, a handful of prompts) and its
bookkeeping holds: the guideline tap leaves images untouched, prompts respect the concept."""

import json

from erasekit.bench_dag import _auroc, concept_prompts
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


def test_bench_dag_smoke(tmp_path):
    from erasekit.bench_dag import bench_dag
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    save_toy_pipeline(pipe, tmp_path / "toy")
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    GuidelineEmbedding(tokens, sink, "red circle", "toy").save(str(tmp_path / "g.safetensors"))
    r = bench_dag("red circle", 4, 4, seeds=(0,), steps=3, model=str(tmp_path / "toy"),
                  guideline=str(tmp_path / "g.safetensors"), batch=4, out_dir=str(tmp_path), log=lambda m: None)
    json.dumps(r)
    for key in ("detection_auroc", "erase_rate", "preservation", "benign_identical", "time_ratio_benign",
                "time_ratio_unsafe", "sld_erase_rate", "sega_benign_identical", "cam_cost_ratio"):
        assert key in r, key
    assert r["sld_benign_identical"] <= 1.0 and r["cam_cost_ratio"] > 0


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
