"""Loading models ComfyUI's own loaders do not know (the bundled toy model, diffusers folders)."""

from __future__ import annotations

import os

from .folders import PACK_MODELS, find, missing
from .spec import Input, NodeSpec, Output


def model_folders() -> dict[str, str]:
    """{name shown in the list: path} of diffusers folders in the pack's models/ and ComfyUI's models/diffusers."""
    return find("", "diffusers", lambda p: os.path.isfile(os.path.join(p, "model_index.json")))


def load_diffusers(model_name: str):
    from erasekit import models

    from .comfy_models import to_comfy

    folders = model_folders()
    if model_name not in folders:
        raise missing("diffusers model", model_name, f"{PACK_MODELS} or ComfyUI's models/diffusers", folders)
    return to_comfy(models.load(folders[model_name]))


SPECS = [
    NodeSpec(
        node_id="ErasekitLoadDiffusersModel",
        display_name="Load Diffusers Model (Erasekit)",
        description="Loads a diffusers model folder as MODEL, CLIP and VAE: the bundled toy model (models/toy) "
                    "or an SD1.x/2.x folder in ComfyUI's models/diffusers.",
        inputs=[Input("model_name", "COMBO", options=lambda: list(model_folders()) or ["(no model found)"],
                      tooltip="Folders with a model_index.json.")],
        outputs=[Output("MODEL", "model"), Output("CLIP", "clip"), Output("VAE", "vae")],
        function=load_diffusers,
        search_aliases=["toy model", "diffusers loader"],
    ),
]
