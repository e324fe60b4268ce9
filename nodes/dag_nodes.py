"""Detect-and-Guide nodes: load a guideline embedding, patch a MODEL, show the detection maps."""

from __future__ import annotations

import os

from .folders import PACK_MODELS, find, missing
from .spec import Input, NodeSpec, Output, file_stamp

PACK_GUIDELINES = os.path.join(PACK_MODELS, "guideline")
GUIDELINE = "ERASEKIT_GUIDELINE"
FAILURE_CHOICES = {"stop": "stop", "guide whole image": "guide_whole_image"}  # node choice -> DagSession's on_failure


def guideline_files() -> dict[str, str]:
    """{name: path} of .safetensors guideline embeddings in the pack's models/guideline and
    ComfyUI's models/guideline."""
    return find("guideline", "guideline", lambda p: p.endswith(".safetensors") and os.path.isfile(p))


# what the list says while no guideline embedding is found: where they come from
NO_GUIDELINE = "(none yet: train 'DAG guideline tokens' in the Erasekit trainer, Export, press R)"


def load_guideline(embedding_name: str):
    from erasekit.dag.guideline import GuidelineEmbedding

    files = guideline_files()
    if embedding_name not in files:
        raise missing("guideline embedding", embedding_name, f"{PACK_GUIDELINES} or ComfyUI's models/guideline", files)
    return ([GuidelineEmbedding.load(files[embedding_name])],)


def _check_fits(model, embeddings):
    config = model.model.model_config.unet_config
    if not config.get("context_dim") or "num_res_blocks" not in config:
        raise ValueError(f"Detect-and-Guide works on UNet models with cross-attention (SD1.x, SD2.x, SDXL); this model "
                         f"({type(model.model).__name__}) is not one.")
    width = config["context_dim"]
    for e in embeddings:
        if e.width != width:
            raise ValueError(f"The guideline embedding for '{e.concept}' has width {e.width} (made for {e.architecture}), "
                             f"but this model's text width is {width}; load an embedding trained for this model.")


def detect_and_guide(model, clip, guideline, safety_text: str, mode: str, strength: float, warmup: float,
                     unsafe_threshold: float, edit_threshold: float, sld_preset: str, sega_mask: float = 0.0,
                     guideline_2=None, if_detection_fails: str = "stop", node_id=None):
    from erasekit.dag.guidance import DagSettings, SegaSettings, SldSettings

    from .dag_patch import install

    embeddings = list(guideline) + list(guideline_2 or [])
    _check_fits(model, embeddings)
    text = safety_text.strip() or ", ".join(e.concept for e in embeddings)
    safety_cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    dag = DagSettings(tau_high=unsafe_threshold, tau_low=edit_threshold, warmup_fraction=warmup, strength=strength,
                      top_p=sega_mask)
    return (install(model, embeddings, safety_cond, mode.lower(), dag, SldSettings.preset(sld_preset),
                    SegaSettings(warmup_fraction=warmup), preview=_preview_sender(node_id),
                    on_failure=FAILURE_CHOICES[if_detection_fails]),)


def _preview_sender(node_id):
    """Live preview: send the detection map so far (max over the steps) to the front end at each step
    (web/erasekit.js draws it on the Detect-and-Guide node); the edit makes an object's map fade,
    so the last step's alone would end blank where the concept was removed. A small PNG, only while
    a browser is connected to the server."""
    if node_id is None:
        return None

    def send(a_hat, step, n_steps):
        try:
            import base64
            import io

            import numpy as np
            from PIL import Image
            from server import PromptServer

            from erasekit.visualize import colormap

            server = PromptServer.instance
            if server is None or not getattr(server, "sockets", None):
                return
            rgb = (colormap(a_hat[0].float().cpu()).numpy() * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).resize((128, 128), Image.NEAREST).save(buf, format="PNG")
            server.send_sync("erasekit.detection", {"node": str(node_id), "step": step, "steps": n_steps,
                                                    "image": base64.b64encode(buf.getvalue()).decode()},
                             server.client_id)  # to the tab that queued the prompt, as ComfyUI's progress
        except Exception:  # a preview must never break sampling
            pass

    return send


def detection_maps(model, image, which: str):
    import torch

    from erasekit.visualize import heat_overlay

    session = model.model_options.get("transformer_options", {}).get("erasekit_dag_session")
    if session is None:
        raise ValueError("This model has no Detect-and-Guide patch: connect the MODEL output of 'Detect-and-Guide' "
                         "(the one the sampler used).")
    if not session.log.maps:
        raise ValueError("No detection maps yet: connect the sampler's decoded IMAGE so this node runs after sampling "
                         "(and use mode DAG).")
    maps = torch.stack(session.log.maps)  # [steps, B, h, w]
    heat = {"max over steps": maps.amax(0), "last step": maps[-1], "mean over steps": maps.mean(0)}[which]
    if heat.shape[0] != image.shape[0]:
        heat = heat[:1].repeat(image.shape[0], 1, 1)
    import torch.nn.functional as F

    mask = F.interpolate(heat[:, None].float(), size=tuple(image.shape[1:3]), mode="bilinear", align_corners=False)[:, 0]
    return (mask.clamp(0, 1), heat_overlay(image, mask.to(image.dtype)).float())


SPECS = [
    NodeSpec(
        node_id="ErasekitLoadGuideline",
        display_name="Load Guideline Embedding",
        description="Loads a guideline embedding (learned tokens that find one concept in the image while sampling) "
                    "from the pack's models/guideline or ComfyUI's models/guideline.",
        inputs=[Input("embedding_name", "COMBO", options=lambda: list(guideline_files()) or [NO_GUIDELINE],
                      tooltip="A .safetensors guideline embedding made for the base model you sample with.")],
        outputs=[Output(GUIDELINE, "guideline")],
        function=load_guideline,
        fingerprint=lambda embedding_name=None, **_: file_stamp(guideline_files().get(embedding_name)),  # retrained in place
    ),
    NodeSpec(
        node_id="ErasekitDetectAndGuide",
        display_name="Detect-and-Guide",
        description="Safe generation without retraining (DAG, CVPR 2025): while sampling, the guideline tokens find where "
                    "the unsafe concept appears and a safety guidance edits only that region, scaled by its size and "
                    "confidence. Nothing detected: the output is exactly plain CFG, at no extra cost (at CFG 1 the "
                    "unconditional pass that ComfyUI otherwise skips still runs: the guidance needs it). "
                    "Put it between the model loader and the sampler; it needs a negative prompt (KSampler, CFGGuider).",
        inputs=[
            Input("model", "MODEL"),
            Input("clip", "CLIP", tooltip="Encodes the safety concept text."),
            Input("guideline", GUIDELINE, tooltip="From 'Load Guideline Embedding'."),
            Input("safety_text", "STRING", default="", tooltip="The concept to steer away from; empty: the embedding's concept."),
            Input("mode", "COMBO", options=["DAG", "SLD", "SEGA"], default="DAG",
                  tooltip="DAG: region-limited, adaptive (the paper). SLD / SEGA: whole-image safety guidance, for comparison."),
            Input("strength", "FLOAT", default=1.0, min=0.0, max=5.0, step=0.05, tooltip="Multiplies DAG's scale map (1 = paper). The paper scales an edit "
                  "by the area of its region, so small objects get weak edits: raise it when they survive, at some "
                  "cost to what is near them."),
            Input("warmup", "FLOAT", default=0.1, min=0.0, max=1.0, step=0.01,
                  tooltip="Fraction of the steps before guidance starts (paper: 5 of 50)."),
            Input("unsafe_threshold", "FLOAT", default=0.5, min=0.0, max=1.0, step=0.01,
                  tooltip="How sure the detector must be that a pixel shows the concept for it to count toward the "
                          "region's size, which sets how strongly the region is edited (the paper's 0.5; its "
                          "'AreaScaler'). Lower counts more of the image as the concept."),
            Input("edit_threshold", "FLOAT", default=0.01, min=0.0, max=1.0, step=0.005,
                  tooltip="Pixels whose detection is above this may be edited, the rest of the image stays as "
                          "it was (the paper's 0.01; its 'EditMask'). Higher edits a tighter area around the "
                          "concept."),
            Input("sld_preset", "COMBO", options=["weak", "medium", "strong", "max"], default="medium",
                  tooltip="Only for mode SLD."),
            Input("sega_mask", "FLOAT", default=0.0, min=0.0, max=0.99, step=0.05, optional=True,
                  tooltip="DAG: inside the detected region, edit only the strongest (1 - this) of the safety "
                  "direction per channel (SEGA's mask, which the paper's main runs use). 0: the whole region. "
                  "Higher keeps more of the rest of the image and erases less."),
            Input("guideline_2", GUIDELINE, optional=True, tooltip="A second concept (maps combine by max)."),
            Input("if_detection_fails", "COMBO", options=list(FAILURE_CHOICES), default="stop", optional=True,
                  tooltip="When the detection map cannot be computed (non-finite values from the model or the "
                  "embedding): stop the sampling with an error, or guide that image as a whole (SEGA's edit). "
                  "It never samples unguided."),
        ],
        outputs=[Output("MODEL", "model", "The model with safe self-regulation; connect it to the sampler.")],
        function=detect_and_guide,
        search_aliases=["dag", "safe", "nsfw", "censor", "safety guidance", "sld", "sega"],
        wants_node_id=True,
    ),
    NodeSpec(
        node_id="ErasekitDetectionMaps",
        display_name="Detection Maps (Detect-and-Guide)",
        description="What Detect-and-Guide detected during the last sampling: a MASK and the image with the map over it.",
        inputs=[
            Input("model", "MODEL", tooltip="The MODEL from 'Detect-and-Guide' that the sampler used."),
            Input("image", "IMAGE", tooltip="The decoded image (also makes this node run after the sampler)."),
            Input("which", "COMBO", options=["max over steps", "last step", "mean over steps"], default="max over steps"),
        ],
        outputs=[Output("MASK", "mask"), Output("IMAGE", "overlay")],
        function=detection_maps,
    ),
]
