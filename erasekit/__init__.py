"""Erasekit: make a text-to-image model not draw a concept.

The core library behind the ComfyUI node pack, the A1111/Forge extension and the trainer.
It never imports ComfyUI, A1111 or Gradio, and importing it is cheap: torch, diffusers and
friends load inside the functions that need them.

Modules, in the order a newcomer might read them:
    errors        the one exception type users see, with actionable messages
    checkpoints   read safetensors files safely; tell SD1.x / SD2.x / SDXL / toy apart
    models        load UNet + text encoder(s) from a diffusers folder, a single file, or memory
    attention     capture cross-attention maps of chosen layers through diffusers processors
    tiny          randomly initialised tiny models of the real SD configurations (for tests)
    toyworld      procedural scenes with exact ground truth and the tiny model trained on them
    bench         benchmarks that print JSON
"""

__version__ = "0.1.0"
