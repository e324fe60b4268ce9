"""Cross-attention heatmaps of chosen words, as extra output images (an always-visible section of A1111).

``/sdapi/v1/txt2img``: ``alwayson_scripts: {"cross-attention heatmap (erasekit)": {"args": [enabled, words]}}``.
Each image of the batch is followed (after all images) by its heatmap over the image.
"""

import importlib.util
import os

import gradio as gr
from modules import script_callbacks, scripts

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("erasekit_core_loader", os.path.join(_ROOT, "core_loader.py"))
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)
_loader.register_core()
_loader.register("erasekit_a1111", os.path.join(_ROOT, "a1111"))

from erasekit_a1111 import attention_hooks  # noqa: E402

TITLE = "Cross-attention heatmap (Erasekit)"


class HeatmapScript(scripts.Script):
    def __init__(self):
        self.recorder = None
        self.overlays = []

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion

        with InputAccordion(False, label=TITLE) as enabled:
            words = gr.Textbox("", label="Words", info="Words of the prompt to show where the image attends to them.")
        return [enabled, words]

    def process(self, p, enabled=False, words=""):
        self._close()
        attention_hooks.A1111AttentionRecorder.close_current()  # left open by a generation that raised
        self.overlays = []

    def process_before_every_sampling(self, p, enabled=False, words="", **kwargs):
        self._close()
        if enabled and words.strip() and not hasattr(p.sd_model, "forge_objects"):
            self.recorder = attention_hooks.A1111AttentionRecorder(p).__enter__()

    def postprocess_batch_list(self, p, pp, enabled=False, words="", **kwargs):
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        recorder.close()
        if not recorder.sums or not pp.images:
            return
        from erasekit.visualize import heat_overlay

        try:
            positions = attention_hooks.word_positions(p.sd_model.cond_stage_model, p.prompts[0], words)
        except ValueError as err:  # the page shows comments, the API the params
            p.comment(str(err))
            p.extra_generation_params["Heatmap"] = str(err)
            return
        size = tuple(pp.images[0].shape[-2:])
        heat = recorder.heatmaps(positions, size)  # [B, H, W]
        for image, h in zip(pp.images, heat):
            self.overlays.append(heat_overlay(image.permute(1, 2, 0)[None].cpu().float(), h[None].cpu())[0])

    def postprocess(self, p, processed, enabled=False, words=""):
        from PIL import Image

        if "Detect-and-Guide stopped" in p.extra_generation_params:  # its images were withheld: their maps too
            self.overlays = []
        for over in self.overlays:
            processed.images.append(Image.fromarray((over.clamp(0, 1).numpy() * 255).round().astype("uint8")))
            processed.infotexts.append(processed.infotexts[0] if processed.infotexts else "")
        self.overlays = []

    def _close(self):
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


script_callbacks.on_cfg_denoiser(attention_hooks.on_denoiser)
script_callbacks.on_cfg_after_cfg(attention_hooks.on_after_cfg)
