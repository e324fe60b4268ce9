"""A finished run's LoRA file: the trained adapters (or the SVD of a full fine-tune's weight
change) with kohya keys and metadata, written into the run folder (:mod:`erasekit.lora_io`)."""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path


def export_lora(config, method: str, components, unet, text_encoder=None, reference_weights=None,
                te_original=None, preserved=()) -> Path:
    """Write ``<out>/<name>.safetensors``: a kohya LoRA with metadata (:func:`erasekit.lora_io.save_lora`).
    ``config`` is the run's :class:`~erasekit.erase.engine.TrainConfig`.

    LoRA mode exports the peft adapters as trained; full-parameter mode extracts a rank-``config.rank``
    LoRA from the weight change against ``reference_weights`` (the base UNet's state dict, in float32)
    by SVD (:func:`erasekit.lora_io.extract_lora`).
    """
    from .. import lora_io
    from ..models import architecture_of_unet

    if config.mode == "lora":
        lora = lora_io.lora_from_peft(unet=unet, text_encoder=text_encoder)
    else:
        lora = lora_io.extract_lora(reference_weights, unet.state_dict(), rank=config.rank).lora
        if text_encoder is not None:
            lora.update(lora_io.extract_lora(te_original, text_encoder.state_dict(), rank=config.rank,
                                             component="text_encoder").lora)
    architecture = components.architecture or architecture_of_unet(unet)
    slug = re.sub(r"[^a-z0-9]+", "-", config.target.lower()).strip("-") or "concept"
    name = config.name or f"erase-{slug}-{method}"
    base = os.path.basename(os.path.normpath(config.base)) if config.base else ""
    # file names only: the metadata travels with the file to model hubs, the folders of this machine must not
    resolved = {"train": {**asdict(config), "out": os.path.basename(os.path.normpath(config.out)), "base": base},
                "method": method}
    return Path(lora_io.save_lora(lora, Path(config.out) / f"{name}.safetensors", architecture,
                                  erased_concept=config.target, method=method, preserved=preserved, config=resolved,
                                  base_model=base))
