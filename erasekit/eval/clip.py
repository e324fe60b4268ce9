"""CLIP score (Hessel et al., 2021, CLIPScore with w = 100): 100 * max(cos(image, prompt), 0), per image, with a
local ``transformers`` CLIP model folder (``CLIPModel`` with its tokenizer and image processor, as
``save_pretrained`` writes them). Nothing is downloaded: the folder is read with ``local_files_only``.
"""

from __future__ import annotations

import json
import os

from ..errors import ErasekitError

W = 100.0  # CLIPScore's w (the papers' "CLIP score" scale)


def _not_clip(folder: str, why: str) -> ErasekitError:
    return ErasekitError(f"'{folder}' is not a CLIP model folder ({why}); give --clip a folder holding a transformers "
                         "CLIPModel with its tokenizer and image processor, e.g. openai/clip-vit-large-patch14 saved "
                         "with save_pretrained.")


class ClipScorer:
    """Scores images against their prompts with the CLIP model in ``folder``."""

    def __init__(self, folder: str, device: str = "cpu", batch: int = 32):
        if not os.path.isdir(folder):
            raise ErasekitError(f"The CLIP folder '{folder}' does not exist; give --clip a local folder with a "
                                "transformers CLIP model (nothing is downloaded).")
        config = os.path.join(folder, "config.json")
        try:
            with open(config, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError):
            raise _not_clip(folder, "no readable config.json") from None
        if model_type != "clip":
            raise _not_clip(folder, f"its config.json says model_type '{model_type}'")
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise _not_clip(folder, f"transformers could not load it: {str(err).splitlines()[0][:160]}") from None
        self.folder, self.device, self.batch = folder, device, batch
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __call__(self, images, prompts) -> list[float]:
        """CLIP score of each uint8 [H, W, 3] image against its prompt (same order)."""
        import torch

        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch):
                inputs = self.processor(text=prompts[s:s + self.batch], images=images[s:s + self.batch],
                                        return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                txt = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                   attention_mask=inputs.get("attention_mask"))
                img, txt = _tensor(img), _tensor(txt)
                cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
                out += (W * cos.clamp(min=0)).tolist()
        return out

    def describe(self) -> dict:
        return {"clip_model": os.path.abspath(self.folder)}


def _tensor(x):
    """The projected features: transformers 4 returns them, 5 a model output holding them as ``pooler_output``."""
    return x if hasattr(x, "shape") else x.pooler_output
