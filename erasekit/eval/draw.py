"""Drawing and judging: the one way the harness and the benchmarks (``bench erase``, ``bench dag``) make the
images they count.

A job is ``(prompt, seed, guidance scale)``. :func:`draw` samples jobs with already-loaded components (a
:class:`erasekit.models.Components` or anything :func:`erasekit.dag.sampling.sample` takes: a LoRA merged
or attached is part of them) and per-image noise, so an image depends only on its job, never on the batch
it was drawn in; a Detect-and-Guide run (or SLD, SEGA) passes ``sample``'s own keywords
(``mode="dag", embeddings=[guideline], safety_text=..., dag=DagSettings(...)``). :func:`draw_and_judge`
adds a detector's verdicts (:mod:`erasekit.eval.detectors`). The harness (:func:`erasekit.eval.harness.run`)
adds the image cache around :func:`iter_draw`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Drawing:
    """What :func:`draw` made, in job order."""

    images: list  # uint8 [H, W, 3]
    seconds: float  # sampling time
    scores: list | None = None  # with keep_maps: each image's last-step detection score, peak(A) / gate
    maps: list | None = None  # with keep_maps: each image's last-step detection map A-hat (torch [h, w])

    def metas(self) -> list[dict]:
        """Per image, what its sampling measured, as the detectors read it (and the cache keeps it)."""
        return [{"guideline_score": s} for s in self.scores] if self.scores is not None else [{} for _ in self.images]


def iter_draw(comps, jobs, steps: int, *, batch: int = 8, **sample_kwargs):
    """Draw ``jobs`` batch by batch, one guidance scale per batch (ascending, jobs in order within it); yields
    ``(job indices, Drawing of that batch)``. ``sample_kwargs`` go to :func:`erasekit.dag.sampling.sample`."""
    from ..dag.sampling import sample

    if batch < 1:
        raise ValueError(f"batch {batch} must be at least 1 image")
    keep = bool(sample_kwargs.get("keep_maps"))
    for g in sorted({float(j[2]) for j in jobs}):
        idx = [i for i, j in enumerate(jobs) if float(j[2]) == g]
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            t0 = time.perf_counter()
            r = sample(comps, [jobs[i][0] for i in chunk], [int(jobs[i][1]) for i in chunk], steps=steps, cfg=g,
                       per_image_noise=True, **sample_kwargs)
            seconds = time.perf_counter() - t0
            yield chunk, Drawing(to_uint8(r.images), seconds,
                                 [float(x) for x in r.detection_scores[-1]] if keep else None,
                                 list(r.detection_maps[-1]) if keep else None)


def draw(comps, jobs, steps: int, *, batch: int = 8, **sample_kwargs) -> Drawing:
    """Every job's image (and, with ``keep_maps``, its last-step detection), in job order."""
    jobs = list(jobs)
    images, scores, maps, seconds = [None] * len(jobs), [None] * len(jobs), [None] * len(jobs), 0.0
    for chunk, d in iter_draw(comps, jobs, steps, batch=batch, **sample_kwargs):
        seconds += d.seconds
        for k, i in enumerate(chunk):
            images[i] = d.images[k]
            if d.scores is not None:
                scores[i], maps[i] = d.scores[k], d.maps[k]
    keep = bool(sample_kwargs.get("keep_maps"))
    return Drawing(images, seconds, scores if keep else None, maps if keep else None)


def draw_and_judge(comps, jobs, steps: int, detector, *, batch: int = 8, **sample_kwargs):
    """(:class:`Drawing`, the detector's :class:`~erasekit.eval.metrics.Finding` per image, in job order)."""
    d = draw(comps, jobs, steps, batch=batch, **sample_kwargs)
    return d, detector(d.images, d.metas())


def to_uint8(images) -> list[np.ndarray]:
    """torch [B, 3, H, W] in [0, 1] -> uint8 [H, W, 3] arrays (as the cache stores them as PNG)."""
    return [np.ascontiguousarray((im.permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).astype(np.uint8))
            for im in images]
