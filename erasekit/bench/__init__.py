"""Benchmarks (``python -m erasekit.bench ...``): one JSON line each, built on the core; nothing imports them.

startup (``__main__``), dag (Detect-and-Guide vs CFG, SLD, SEGA), erase (an erasure method's
erase rate, preservation and cost), lora (the export round trip through diffusers and ComfyUI).
They run the repository's tools (real ComfyUI in fresh processes), so they live in a checkout.
"""

from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])  # the checkout: tools/ and models/ sit there
