"""Load Erasure LoRA: apply a LoRA made by the Erasekit trainer (or any kohya LoRA), after
checking it was made for this base model, and show what it erases."""

from __future__ import annotations

import json
import os

from .spec import Input, NodeSpec, Output, file_stamp

ARCH_KEY = "erasekit_architecture"
# what the list says while ComfyUI's models/loras holds no LoRA: where erasure LoRAs come from
NO_LORA = "(no LoRA yet: make one with the Erasekit trainer, Export it, press R)"


def lora_names() -> list[str]:
    try:
        import folder_paths

        return folder_paths.get_filename_list("loras")
    except Exception:
        return []


def model_architecture(model):
    """The :class:`erasekit.checkpoints.Architecture` of a ComfyUI MODEL."""
    from erasekit import checkpoints

    known = model.model_options.get("transformer_options", {}).get(ARCH_KEY)
    if known is not None:
        return known
    import comfy.supported_models as known_models

    cfg = model.model.model_config
    context = cfg.unet_config.get("context_dim")
    if not context:
        raise ValueError(f"Load Erasure LoRA checks LoRAs for SD1.x, SD2.x and SDXL UNet models; this model "
                         f"({type(cfg).__name__}) is not one. Use ComfyUI's own LoRA loader for it.")
    if isinstance(cfg, (known_models.SDXL, known_models.SDXLRefiner)) or context == 2048:  # SSD-1B, Vega, KOALA too
        return checkpoints.sdxl()
    if isinstance(cfg, known_models.SD20) or context == 1024:
        return checkpoints.sd_v2(context)
    return checkpoints.sd_v1(context)


def describe(meta: dict) -> str:
    """One line a person reads: what the LoRA erases, how, for which model."""
    concept = meta.get("erasekit.erased_concept")  # not modelspec.trigger_phrase: other LoRAs' is what they add
    parts = [f"erases: {concept}" if concept else "not an Erasekit LoRA (no erased concept recorded)"]
    if meta.get("erasekit.method"):
        parts.append(f"method: {meta['erasekit.method']}")
    base = meta.get("ss_base_model_version") or meta.get("modelspec.architecture")
    if base:
        parts.append(f"base: {base}")
    if meta.get("erasekit.source_file"):  # a fine-tune converted by SVD (python -m trainer convert)
        try:
            ext = json.loads(meta.get("erasekit.extraction", "{}"))
            how = f" (rank {ext['rank']}, max error {float(ext['max_error']):.4f})"
        except (ValueError, KeyError, TypeError):
            how = ""
        parts.append(f"converted from {meta['erasekit.source_file']}{how}")
    preserved = meta.get("erasekit.preserved")
    if preserved:
        try:
            parts.append("keeps: " + ", ".join(json.loads(preserved))[:120])
        except ValueError:
            pass
    return "; ".join(parts)


def load_erasure_lora(model, lora_name: str, strength_model: float, strength_clip: float, clip=None, node_id=None):
    import comfy.sd
    import comfy.utils

    from erasekit import checkpoints, lora_io

    if lora_name == NO_LORA:
        raise ValueError("No LoRA in ComfyUI's models/loras yet. Make an erasure LoRA with the Erasekit trainer "
                         "(make trainer: Generate data, Start, then Export into ComfyUI models/loras), or copy a "
                         ".safetensors LoRA into models/loras; then press R to refresh the list and pick it.")
    path = _lora_path(lora_name)
    if path is None:
        raise ValueError(f"No LoRA named '{lora_name}' in ComfyUI's models/loras; refresh the list or copy the file there.")
    lora_io.check_compatible(path, model_architecture(model))
    _, meta = checkpoints.read_header(path, "LoRA file")
    info = describe(meta)
    tensors, _ = checkpoints.load_file(path, "LoRA file")
    lora_io.check_values(tensors, os.path.basename(path))  # NaN weights or an infinite alpha: refused, never applied
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
    _show_on_node(node_id, info)
    return (new_model, new_clip, info)


def _lora_path(lora_name):
    import folder_paths

    return folder_paths.get_full_path("loras", lora_name) if lora_name else None


def _show_on_node(node_id, text: str) -> None:
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # the text is a courtesy; never fail the graph for it
        pass


SPECS = [
    NodeSpec(
        node_id="ErasekitLoadErasureLoRA",
        display_name="Load Erasure LoRA",
        description="Applies an erasure LoRA (made by the Erasekit trainer, or any kohya-format LoRA) to MODEL and CLIP. "
                    "Refuses a LoRA made for another base model and shows what the LoRA erases.",
        inputs=[
            Input("model", "MODEL"),
            Input("lora_name", "COMBO", options=lambda: lora_names() or [NO_LORA],
                  tooltip="The LoRA files in ComfyUI's models/loras. The Erasekit trainer's Export puts erasure "
                          "LoRAs there; press R after exporting to see a new one."),
            Input("strength_model", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01,
                  tooltip="How much of the LoRA goes into the image model: 1 erases the concept, 0 is the model as "
                          "it was; between them keeps more of what is near the concept and erases less."),
            Input("strength_clip", "FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01,
                  tooltip="The same for the text encoder, when the LoRA has text-encoder weights (Erasekit's INPO "
                          "LoRAs have none: this then does nothing)."),
            Input("clip", "CLIP", optional=True, tooltip="Also patch the text encoder when the LoRA has text-encoder weights."),
        ],
        outputs=[Output("MODEL", "model"), Output("CLIP", "clip"), Output("STRING", "info", "What the LoRA erases, how, for which model; connect "
                                                        "'Preview as Text' to read it.")],
        function=load_erasure_lora,
        fingerprint=lambda lora_name=None, **_: file_stamp(_lora_path(lora_name)),  # re-exported under its name
        wants_node_id=True,
        search_aliases=["erasure lora", "unlearning", "safe lora"],
    ),
]
