"""A1111's and Forge's card for an erasure LoRA: the ``<name>.json`` the web UI keeps beside each LoRA
(description, SD version, preferred weight; its "Edit metadata" dialog edits the same file), written from
the LoRA's own ``erasekit.*`` / ``ss_*`` metadata (:mod:`erasekit.lora_io` writes those)."""

from __future__ import annotations

import json
import os

from . import checkpoints
from .lora_io import FAMILY_TITLES, family

WEBUI_SD_VERSION = {"sd_v1": "SD1", "sd_v2": "SD2", "sdxl": "SDXL"}  # A1111's network.SdVersion names
_WEBUI_OURS = ("description", "sd version", "preferred weight")  # what a re-export refreshes in the sidecar


def erasure_summary(meta: dict) -> str:
    """What an erasure LoRA's metadata says, in one line: ``Erases: red circle. Method: inpo. Base:
    Stable Diffusion 1.x (v1-5.safetensors).``; ``""`` for a LoRA without ``erasekit.*`` metadata."""
    concept, method = meta.get("erasekit.erased_concept") or "", meta.get("erasekit.method") or ""
    if not concept and not method:
        return ""
    base = meta.get("ss_base_model_version") or meta.get("modelspec.architecture") or ""
    fam = family(base) if base else ""
    title = FAMILY_TITLES.get(fam, base or "unknown")
    model = meta.get("ss_sd_model_name") or ""
    parts = [f"Erases: {concept or 'an unnamed concept'}."]
    if method:
        parts.append(f"Method: {method}.")
    parts.append(f"Base: {title}" + (f" ({model})." if model else "."))
    preserved = meta.get("erasekit.preserved")
    try:
        kept = [str(c) for c in json.loads(preserved)] if isinstance(preserved, str) else list(preserved or [])
    except (ValueError, TypeError):
        kept = []
    if kept:
        shown = ", ".join(kept[:8]) + (", ..." if len(kept) > 8 else "")
        parts.append(f"Keeps: {shown}.")
    return " ".join(parts)


def webui_user_metadata(meta: dict, description: str = "") -> dict:
    """The card of an erasure LoRA in Automatic1111 / Forge: their per-LoRA user metadata, the JSON
    file ``<name>.json`` beside ``<name>.safetensors`` that their Lora page reads
    (``extensions-builtin/Lora``: ``ui_extra_networks_lora.py`` ``create_item``, edited by
    ``ui_edit_user_metadata.py``): ``description`` is shown on the card (what it erases, how, for
    which base model; then ``description``), ``sd version`` (SD1 / SD2 / SDXL) decides under which
    loaded model the card is listed, ``preferred weight`` 1 is the strength a click on the card puts
    in the prompt (``<lora:name:1>``). No activation text: the erased concept is not a trigger word."""
    fam = family(meta.get("ss_base_model_version") or "")
    summary = erasure_summary(meta)
    text = " ".join(t for t in (summary, (description or "").strip()) if t)
    return {"description": text, "sd version": WEBUI_SD_VERSION.get(fam, "Unknown"), "preferred weight": 1.0,
            "activation text": "", "negative text": "",
            "notes": "Made with Erasekit. The concept is erased while the LoRA is active at strength 1; lower "
                     "strengths erase less. Its metadata (the button on the card) lists the training settings."}


def webui_sidecar_path(lora_file: str) -> str:
    """``<name>.json`` beside ``<name>.safetensors``: where A1111 / Forge keep a LoRA's card."""
    return os.path.splitext(os.fspath(lora_file))[0] + ".json"


def write_webui_sidecar(lora_file: str, description: str = "") -> str:
    """Write the web UIs' card of the LoRA file (:func:`webui_user_metadata`) beside it, atomically;
    return its path. A card already there (the user may have edited it in the web UI) keeps the
    user's fields (activation text, negative prompt, notes, ...); its description, SD version and
    preferred weight are the new LoRA's. An unreadable card is replaced."""
    _, meta = checkpoints.read_header(lora_file, "LoRA file")
    path = webui_sidecar_path(lora_file)
    card = webui_user_metadata(meta, description)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        card = {**card, **{k: v for k, v in old.items() if k not in _WEBUI_OURS}}
    checkpoints.write_text_atomic(json.dumps(card, indent=4, ensure_ascii=False) + "\n", path)
    return path
