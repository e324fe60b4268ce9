"""Erasure LoRAs in Automatic1111 / Forge: the web UI's own Lora support loads them (``<lora:name:1>``);
this script only checks, for every erasure LoRA of a generation, that it was made for the loaded model.

An erasure LoRA (one with ``erasekit.*`` metadata, written by :func:`erasekit.lora_io.save_lora`) made
for another base model (an SDXL LoRA on SD 1.5, a LoRA of another text width) is mostly not applied by
the web UI, whose Lora code only logs the layers it cannot add ("Networks with errors: name (n)" on
the page, nothing in the API's info): the concept is then not erased, silently. Here such a
generation gets the reason, in the image's infotext ("Erasure LoRA warning: ...", also in
``/sdapi/v1/txt2img``'s info) and among the page's comments. The images are still made: the LoRA is
the user's choice and the web UI's business; this says what it does not do.

What the Lora tab shows (erased concept, method, base model) is the card file the trainer writes
beside the LoRA when it exports into a web UI's ``models/Lora`` (``<name>.json``, A1111's own per-LoRA
user metadata: :func:`erasekit.webui_card.write_webui_sidecar`), and the LoRA's metadata, which the
card's metadata view lists whole.

The check runs in ``process_batch``: after the web UI parsed the prompt's ``<lora:...>`` and loaded
the networks (``extensions-builtin/Lora``'s ``networks.loaded_networks``, in A1111 and Forge alike)
and before the infotext is written.
"""

import importlib.util
import logging
import os
import sys

from modules import scripts

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("erasekit_core_loader", os.path.join(_ROOT, "core_loader.py"))
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)
_loader.register_core()
_loader.register("erasekit_a1111", os.path.join(_ROOT, "a1111"))

from erasekit_a1111 import hooks  # noqa: E402

TITLE = "Erasure LoRA check (Erasekit)"
WARNING_KEY = "Erasure LoRA warning"  # the infotext key
log = logging.getLogger("erasekit")


class ErasureLoraCheck(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []  # nothing to set: it only reads what the prompt loaded

    def process_batch(self, p, *args, **kwargs):
        if getattr(p, "disable_extra_networks", False):
            return
        try:
            warnings = [w for w in (check(net, p.sd_model) for net in loaded_networks()) if w]
        except Exception as err:  # a check must never stop a generation
            log.warning("the erasure LoRA check failed: %s", err)
            return
        if not warnings:
            return
        old = p.extra_generation_params.get(WARNING_KEY)  # a batch before this one (n_iter > 1)
        p.extra_generation_params[WARNING_KEY] = " | ".join(dict.fromkeys((old.split(" | ") if old else []) + warnings))
        for w in warnings:
            p.comment(f"{WARNING_KEY}: {w}")
            log.warning("%s", w)


def loaded_networks() -> list:
    """The networks the web UI's Lora support loaded for this batch (``networks.loaded_networks``
    of ``extensions-builtin/Lora`` in A1111, ``sd_forge_lora`` in Forge); none without it."""
    networks = sys.modules.get("networks")
    return list(getattr(networks, "loaded_networks", None) or [])


def check(net, sd_model) -> str | None:
    """Why the erasure LoRA ``net`` does not do its work on ``sd_model``, or None: it fits, or it is
    not an erasure LoRA (other LoRAs are the web UI's own business)."""
    from erasekit import lora_io
    from erasekit.errors import ErasekitError

    disk = getattr(net, "network_on_disk", None)
    meta = getattr(disk, "metadata", None) or {}
    filename = getattr(disk, "filename", "") or ""
    if not (meta.get("erasekit.erased_concept") or meta.get("erasekit.method")) or not filename.endswith(".safetensors"):
        return None
    name = getattr(net, "mentioned_name", None) or getattr(net, "name", "") or os.path.basename(filename)
    concept = meta.get("erasekit.erased_concept") or "its concept"
    architecture = model_architecture(sd_model)
    if architecture is None:
        base = lora_io.FAMILY_TITLES.get(lora_io.family(meta.get("ss_base_model_version") or ""), "another model")
        return (f"the erasure LoRA '{name}' is for {base}, but the loaded model is not Stable Diffusion 1.x, 2.x or XL; "
                f"it does not erase '{concept}' here.")
    try:
        lora_io.check_compatible(filename, architecture)
    except ErasekitError as err:
        return f"the erasure LoRA '{name}' does not erase '{concept}' on this model: {err}"
    return None


def model_architecture(sd_model):
    """The :class:`erasekit.checkpoints.Architecture` of the web UI's loaded model (its
    ``is_sdxl`` / ``is_sd2`` / ``is_sd1`` flags, A1111's and Forge's alike, and its cross-attention
    width where the UNet is at hand), or None for other models (SD3, Flux)."""
    from erasekit import checkpoints

    if getattr(sd_model, "is_sdxl", False):
        return checkpoints.sdxl()
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)  # Forge keeps its UNet elsewhere
    width = hooks.context_width(unet) if unet is not None else None
    if getattr(sd_model, "is_sd2", False):
        return checkpoints.sd_v2(width or 1024)
    if getattr(sd_model, "is_sd1", False):
        return checkpoints.sd_v1(width or 768)
    return None
