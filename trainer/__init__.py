"""The Erasekit trainer: fine-tune a checkpoint so that it no longer draws a concept, and export
the result as a LoRA that ComfyUI, A1111/Forge and diffusers load.

``python -m trainer train --method inpo --target "red circle" --out runs/red-circle`` is the
command line (:mod:`trainer.__main__`); the work itself is done by :mod:`erasekit.erase`.
"""
