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
    by SVD (:func:`erasekit.lora_extract.extract_lora`), and reports what the LoRA could not hold (the relative
    error per layer, the changed biases, norms and embeddings) under ``extraction`` in ``erasekit.config``
    and the model card.
    """
    from .. import lora_extract, lora_io
    from ..models import architecture_of_unet

    extraction = None
    if config.mode == "lora":
        lora = lora_io.lora_from_peft(unet=unet, text_encoder=text_encoder)
    else:
        parts = [lora_extract.extract_lora(reference_weights, unet.state_dict(), rank=config.rank)]
        if text_encoder is not None:
            parts.append(lora_extract.extract_lora(te_original, text_encoder.state_dict(), rank=config.rank,
                                              component="text_encoder"))
        lora = {m: w for part in parts for m, w in part.lora.items()}
        # how much of the fine-tune the file holds: a publisher reads it in the metadata and the card
        errors = {m: e for part in parts for m, e in part.errors.items()}
        worst = max(errors, key=errors.get, default="")
        extraction = {"rank": config.rank, "max_error": round(errors.get(worst, 0.0), 4), "worst_module": worst,
                      "mean_error": round(sum(errors.values()) / max(len(errors), 1), 4),
                      "not_in_lora": sorted(k for part in parts for k in part.skipped)}
    architecture = components.architecture or architecture_of_unet(unet)
    slug = re.sub(r"[^a-z0-9]+", "-", config.target.lower()).strip("-") or "concept"
    name = config.name or f"erase-{slug}-{method}"
    base = os.path.basename(os.path.normpath(config.base)) if config.base else ""
    # file names only: the metadata travels with the file to model hubs, the folders of this machine must not
    resolved = {"train": {**asdict(config), "out": os.path.basename(os.path.normpath(config.out)), "base": base},
                "method": method, **({"extraction": extraction} if extraction else {})}
    return Path(lora_io.save_lora(lora, Path(config.out) / f"{name}.safetensors", architecture,
                                  erased_concept=config.target, method=method, preserved=preserved, config=resolved,
                                  base_model=base))
