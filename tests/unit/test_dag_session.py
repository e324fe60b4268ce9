"""The per-sampling state machine of Detect-and-Guide (erasekit/dag/session.py)."""

import pytest
import torch

from erasekit.dag.guidance import DagSettings, Guidance
from erasekit.dag.session import DagSession, GuidanceError


class _Emb:
    """A guideline stand-in: the detector needs only a gate and a floor."""

    def gate_floor(self, timestep=None):
        return 0.3, 0.1


def _cams(batch=2, value=None):
    maps = torch.zeros(batch, 4, 4)
    maps[:, 1:3, 1:3] = 0.9  # an object in the middle of every image
    if value is not None:
        maps[0, 0, 0] = value
    return [[maps, maps[:, ::2, ::2]]]  # one concept, two layers


def test_a_non_finite_map_raises_instead_of_nothing_detected():
    session = DagSession(Guidance("dag", DagSettings()), [_Emb()])
    session.start(10)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(GuidanceError, match="image\\(s\\) \\[0\\].*instead of sampling unguided"):
            session.detect(_cams(value=bad), (8, 8))


def test_guide_whole_image_guides_only_the_failed_image():
    session = DagSession(Guidance("dag", DagSettings(warmup_fraction=0.0)), [_Emb()], on_failure="guide_whole_image")
    session.start(10)
    a_hat, failed = session.detect(_cams(value=float("nan")), (8, 8))
    assert failed == [0] and torch.isfinite(a_hat).all()
    pred = torch.zeros(2, 4, 8, 8)
    safety = torch.ones(2, 4, 8, 8)
    out = session.step(5, pred, pred, pred, lambda rows: safety if rows is None else safety[rows], 3.0,
                       a_hat=torch.zeros_like(a_hat), failed=failed)
    assert out[0].abs().sum() > 0 and torch.equal(out[1], pred[1])
    assert session.log.whole_image_rows == 1 and session.log.guided_steps == 1


def test_a_non_finite_safety_pass_raises():
    session = DagSession(Guidance("sega"), on_failure="guide_whole_image")
    session.start(10)
    pred = torch.zeros(1, 4, 8, 8)
    with pytest.raises(GuidanceError, match="non-finite values"):
        session.step(5, pred, pred, pred, lambda rows: torch.full_like(pred, float("nan")), 3.0)


def test_a_split_sampling_is_one_sampling_and_a_new_one_starts_afresh():
    session = DagSession(Guidance("dag", DagSettings()), [_Emb()])
    assert not session.start(6, first_sigma=14.6, last_sigma=2.0, shape=(1, 4, 8, 8))
    session.detect(_cams(1), (8, 8))
    assert session.start(4, first_sigma=2.0, last_sigma=0.0, shape=(1, 4, 8, 8))  # starts where the first stopped
    assert session.steps_before == 6 and session.n_steps == 10 and len(session.log.maps) == 1
    assert session.detector.held is not None  # the hold goes on
    assert not session.start(4, first_sigma=2.0, last_sigma=0.0, shape=(2, 4, 8, 8))  # another latent: afresh
    assert session.steps_before == 0 and session.log.maps == [] and session.detector.held is None


def test_the_diffusers_sampler_fails_closed(monkeypatch):
    """sample() in DAG mode with maps that are NaN: an error, not plain CFG; or, when asked, guided."""
    from erasekit.dag import detect
    from erasekit.dag.guideline import GuidelineEmbedding, encode_phrase
    from erasekit.dag.sampling import sample
    from erasekit.toyworld.model import build_toy_pipeline

    pipe = build_toy_pipeline(seed=0, tiny=True)
    sink, tokens = encode_phrase(pipe.text_encoder, pipe.tokenizer, "red circle")
    emb = GuidelineEmbedding(tokens, sink, "red circle", "toy")
    cam = detect.guideline_cam
    monkeypatch.setattr(detect, "guideline_cam", lambda *a: torch.full_like(cam(*a), float("nan")))
    kw = dict(steps=4, cfg=3.0, mode="dag", safety_text="red circle", embeddings=[emb])
    with pytest.raises(GuidanceError, match="stopped instead of sampling unguided"):
        sample(pipe, ["a red circle"], [0], **kw)
    plain = sample(pipe, ["a red circle"], [0], steps=4, cfg=3.0)
    guided = sample(pipe, ["a red circle"], [0], on_failure="guide_whole_image", **kw)
    assert guided.extra_passes > 0 and not torch.equal(guided.images, plain.images)
