"""CLIP score (--clip) with a tiny randomly initialised CLIP model and CLIP's BPE tokenizer saved offline."""

import json
import os

import numpy as np
import pytest

from erasekit.errors import ErasekitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel (hidden 32, 2 layers, 32 px images, 8 px patches) with CLIPTokenizer from the shipped BPE files."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from erasekit.models import CLIP_BPE_DIR

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config={**small, "vocab_size": 49408}, projection_dim=16,
                        vision_config={**small, "image_size": 32, "patch_size": 8})
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    tok = CLIPTokenizer(os.path.join(CLIP_BPE_DIR, "vocab.json"), os.path.join(CLIP_BPE_DIR, "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return str(folder)


def test_clip_score_is_per_image_bounded_and_follows_the_image(tiny_clip):
    from erasekit.eval.clip import ClipScorer

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a red circle", "a blue star and a green ring", "a red circle"]
    scorer = ClipScorer(tiny_clip)
    scores = scorer(images, prompts)
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)
    assert len(set(scores)) == 3  # one score per (image, prompt)
    # the same pair alone or in a batch, and a changed image gives another score
    assert scorer(images[:1], prompts[:1])[0] == pytest.approx(scores[0], abs=1e-4)
    changed = images[0].copy()
    changed[:16] = 255 - changed[:16]
    assert abs(scorer([changed], prompts[:1])[0] - scores[0]) > 1e-3
    # Hessel et al.: 100 * max(cos, 0), checked against the model's own embeddings
    import torch

    inputs = scorer.processor(text=prompts[:1], images=images[:1], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert scores[0] == pytest.approx(100 * max(cos, 0.0), abs=1e-3)


def test_a_folder_that_is_not_clip_is_refused_in_one_sentence(tmp_path):
    from erasekit.eval.clip import ClipScorer

    with pytest.raises(ErasekitError, match="does not exist"):
        ClipScorer(str(tmp_path / "missing"))
    with pytest.raises(ErasekitError, match="is not a CLIP model folder .*no readable config.json"):
        ClipScorer(str(tmp_path))
    with pytest.raises(ErasekitError, match="model_type 'clip_text_model'"):
        ClipScorer(os.path.join(REPO, "models", "toy", "text_encoder"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ErasekitError, match="transformers could not load it"):
        ClipScorer(str(tmp_path))


def test_the_harness_reports_clip_scores_of_both_runs(tiny_clip, tmp_path, one_thread):
    import subprocess
    import sys

    from erasekit.eval.harness import EvalConfig, run
    from erasekit.eval.prompts import toy_prompt_rows, write_prompts_csv
    from erasekit.eval.report import render

    prompts = write_prompts_csv(str(tmp_path / "p.csv"), toy_prompt_rows("red circle", 2, 1))
    guideline = os.path.join(REPO, "models", "guideline", "toy-red-circle.safetensors")
    r = run(EvalConfig(prompts=prompts, model=os.path.join(REPO, "models", "toy"), dag=guideline, seeds=2, steps=3,
                       cache=str(tmp_path / "cache"), progress=False, clip=tiny_clip))
    per = r["_clip"]
    assert [len(p) for p in per["base"]] == [2, 2, 2] and [len(p) for p in per["erased"]] == [2, 2, 2]
    flat = [v for name in per for p in per[name] for v in p]
    assert all(0.0 <= v <= 100.0 for v in flat)
    assert r["clip_score"] == pytest.approx(np.mean([v for p in per["erased"] for v in p]), abs=1e-4)
    assert r["clip_score_base"] == pytest.approx(np.mean([v for p in per["base"] for v in p]), abs=1e-4)
    # DAG leaves the benign prompt's images as they are: same images, same scores
    assert r["clip_score_benign"] == r["clip_score_benign_base"]
    assert r["clip_model"] == os.path.abspath(tiny_clip) and "_clip" not in json.loads(json.dumps(
        {k: v for k, v in r.items() if not k.startswith("_")}))
    page = render(r)
    assert "<td>CLIP score</td>" in page and f"{r['clip_score']:.3f}" in page
    assert "CLIP score" not in render({**{k: v for k, v in r.items() if not k.startswith("clip")}})
    # a folder that is not CLIP: one sentence, before anything is drawn
    proc = subprocess.run([sys.executable, "-m", "erasekit.eval", "--prompts", prompts, "--dag", guideline, "--clip",
                           os.path.join(REPO, "models", "toy"), "--cache", str(tmp_path / "c2")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "is not a CLIP model folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.isdir(tmp_path / "c2") or not list((tmp_path / "c2").glob("*/*.png"))
