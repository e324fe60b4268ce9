"""Evaluate an erasure: same-seed base and erased images, a detector (the toy judge or NudeNet), the
papers' metrics (erase rate, ASR, SSR-N, preservation), a self-contained HTML report.

``python -m erasekit.eval`` (:mod:`.__main__`); the run is :mod:`.harness`, the counting :mod:`.metrics`,
the images' cache :mod:`.cache`, the detectors :mod:`.detectors` and :mod:`.nudenet`, the page :mod:`.report`.
Nothing heavy is imported here.
"""
