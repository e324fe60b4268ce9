"""Erasekit's Automatic1111 adapter: host code that only moves tensors between A1111's sampler and
:mod:`erasekit` (the maths and the per-step state live in the core). ``scripts/erasekit_dag.py`` is the
script A1111 loads; it registers this package by file path, like the core (``core_loader.py``)."""
