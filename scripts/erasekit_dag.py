"""Detect-and-Guide as an always-visible section of A1111's and Forge's txt2img and img2img (the script they load).

The settings are the ComfyUI node's; each goes into the image's infotext, so PNG Info -> Send to
txt2img brings it back, and ``/sdapi/v1/txt2img`` takes them as
``alwayson_scripts: {"detect-and-guide (erasekit)": {"args": [enabled, guideline, safety text, mode,
strength, warmup, unsafe threshold, edit threshold, sld preset, sega mask, if detection fails,
show detection map]}}``. The work happens in the core and, in A1111, in :mod:`erasekit_a1111.dag_hooks`
(CFG callbacks and attention hooks); in Forge, in the ComfyUI pack's own patch (``nodes/dag_patch.py``,
registered by file path as ``erasekit_nodes``), since Forge's UNet patcher mirrors ComfyUI's.
"""

import importlib.util
import os

import gradio as gr
from modules import paths, script_callbacks, scripts

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("erasekit_core_loader", os.path.join(_ROOT, "core_loader.py"))
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)
_loader.register_core()
_loader.register("erasekit_a1111", os.path.join(_ROOT, "a1111"))

from erasekit_a1111 import dag_hooks, hooks  # noqa: E402

TITLE = "Detect-and-Guide (Erasekit)"
FAILURES = {"stop": "stop", "guide whole image": "guide_whole_image"}
# infotext key of each setting after the on/off box, in the order of the script's args
FIELDS = ["DAG guideline", "DAG safety text", "DAG mode", "DAG strength", "DAG warmup", "DAG unsafe threshold",
          "DAG edit threshold", "DAG SLD preset", "DAG SEGA mask", "DAG if detection fails"]


def guideline_folders() -> list[str]:
    """The pack's models/guideline and the web UI's models/guideline."""
    return [os.path.join(_ROOT, "models", "guideline"), os.path.join(paths.models_path, "guideline")]


def guideline_files() -> dict[str, str]:
    found = {}
    for folder in guideline_folders():
        for dirpath, _, names in os.walk(folder):
            for n in sorted(names):
                if n.endswith(".safetensors"):
                    found.setdefault(os.path.relpath(os.path.join(dirpath, n), folder), os.path.join(dirpath, n))
    return found


class DetectAndGuideScript(scripts.Script):
    def __init__(self):
        self.run = None  # the A1111Dag of the sampling in progress
        self.error = None  # why this batch could not be guided: its images are withheld (fail closed)
        self.maps = []  # detection maps of this generation's images (max over the steps)

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion

        names = list(guideline_files())
        with InputAccordion(False, label=TITLE) as enabled:
            with gr.Row():
                guideline = gr.Dropdown(names, value=names[0] if names else None, label="Guideline embedding",
                                        info="Learned tokens that find one concept (models/guideline).")
                safety = gr.Textbox("", label="Safety text", info="What to steer away from; empty: the embedding's concept.")
            with gr.Row():
                mode = gr.Radio(["DAG", "SLD", "SEGA"], value="DAG", label="Mode")
                strength = gr.Slider(0.0, 5.0, value=1.0, step=0.05, label="Strength (1 = paper)")
                warmup = gr.Slider(0.0, 1.0, value=0.1, step=0.01, label="Warm-up (fraction of the steps)")
            with gr.Row():
                unsafe = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Unsafe region threshold")
                edit = gr.Slider(0.0, 1.0, value=0.01, step=0.005, label="Edit threshold")
                sld = gr.Dropdown(["weak", "medium", "strong", "max"], value="medium", label="SLD preset")
                sega = gr.Slider(0.0, 0.99, value=0.0, step=0.05, label="SEGA mask")
            with gr.Row():
                failure = gr.Radio(list(FAILURES), value="stop", label="If detection fails",
                                   info="Stop with an error, or guide that image whole; never unguided.")
                show_map = gr.Checkbox(False, label="Add the detection map to the outputs")
        settings = [guideline, safety, mode, strength, warmup, unsafe, edit, sld, sega, failure]
        self.infotext_fields = [(enabled, lambda d: "DAG mode" in d)] + [
            (c, key) for c, key in zip(settings, FIELDS)]
        return [enabled, *settings, show_map]

    # ----------------------------------------------------------------------------------------- one generation
    def process(self, p, enabled=False, *args):
        self._close()
        dag_hooks.A1111Dag.close_current()  # e.g. the other tab's, left open by a generation that raised
        self.maps, self.error = [], None
        if not enabled:
            return
        values = dict(zip(FIELDS, args))
        p.extra_generation_params.update({k: v for k, v in values.items() if v not in ("", None)})

    def process_before_every_sampling(self, p, enabled=False, guideline="", safety="", mode="DAG", strength=1.0,
                                      warmup=0.1, unsafe=0.5, edit=0.01, sld="medium", sega=0.0, failure="stop",
                                      show_map=False, **kwargs):
        """One sampling (a hires fix pass is another): A1111 only logs what a script raises here, so a
        failure is kept and the batch's images are withheld in :meth:`postprocess_batch_list`."""
        if hasattr(p.sd_model, "forge_objects"):
            return self._forge_before_sampling(p, enabled, guideline, safety, mode, strength, warmup, unsafe, edit, sld,
                                               sega, failure)
        self._close()
        if not enabled or self.error is not None:
            return
        try:
            guidance = _guidance(mode, strength, warmup, unsafe, edit, sld, sega)
            emb = _embedding(guideline, _context_width(p.sd_model.model.diffusion_model))
            self.run = dag_hooks.A1111Dag(p, [emb], guidance, safety.strip() or emb.concept, FAILURES[failure]).__enter__()
        except Exception as err:
            self._fail(err)

    def _forge_before_sampling(self, p, enabled, guideline, safety, mode, strength, warmup, unsafe, edit, sld, sega,
                               failure):
        """Forge: the ComfyUI patch (``nodes/dag_patch.py``, through its Forge backend) on a clone of Forge's UNet
        patcher, as Forge's own Perturbed Attention Guidance installs itself. Forge restores
        ``forge_objects`` before every sampling, so each sampling gets a fresh patch and DagSession."""
        earlier = self.run
        self._close()
        if earlier is not None and earlier.error is not None and self.error is None:
            self.error = earlier.error  # a first pass that failed fails the hires fix pass too
        if not enabled or self.error is not None:
            return
        try:
            import importlib

            import torch
            from modules import prompt_parser

            _loader.register("erasekit_nodes", os.path.join(_ROOT, "nodes"))  # the ComfyUI pack's modules, by file path
            dag_patch = importlib.import_module("erasekit_nodes.dag_patch")
            patch_backend = importlib.import_module("erasekit_nodes.patch_backend")
            g = _guidance(mode, strength, warmup, unsafe, edit, sld, sega)
            unet = p.sd_model.forge_objects.unet
            emb = _embedding(guideline, _context_width(unet.model.diffusion_model))
            text = prompt_parser.SdConditioning([safety.strip() or emb.concept], width=p.width, height=p.height)
            with torch.no_grad():
                safety_cond = p.sd_model.get_learned_conditioning(text)  # [1, 77, C], or SDXL's dict

            def progress():  # the CFG denoiser of the sampler in use (the hires fix pass has its own)
                denoiser = p.sampler.model_wrap_cfg
                return denoiser.step, denoiser.total_steps

            run = _ForgeRun(patch_backend.ForgeBackend(progress))
            p.sd_model.forge_objects.unet = dag_patch.install(
                unet, [emb], safety_cond, g.mode, g.dag, g.sld, g.sega, on_failure=FAILURES[failure], backend=run.backend,
                on_error=run.fail)
            self.run = run
        except Exception as err:
            self._fail(err)

    def _fail(self, err):
        import modules.shared as shared
        from modules import errors

        self.error = err
        errors.report(f"Detect-and-Guide stopped: {err}", exc_info=True)
        shared.state.interrupt()  # stop sampling: nothing unguided is shown

    def postprocess_batch_list(self, p, pp, enabled=False, *args, **kwargs):
        run = self.run
        self._close()
        if run is not None and run.error is not None:
            self.error = run.error
        if self.error is not None:  # fail closed: no image that was sampled unguided
            pp.images.clear()
            p.prompts, p.negative_prompts, p.seeds, p.subseeds = [], [], [], []
            p.comment(f"Detect-and-Guide stopped: {self.error}")  # the page shows comments, the API the params
            p.extra_generation_params["Detect-and-Guide stopped"] = str(self.error)
            return
        if run is not None and run.session.log.seen is not None:
            self.maps.extend(zip(pp.images, run.session.log.seen))

    def postprocess(self, p, processed, enabled=False, *args):
        show_map = args[-1] if args else False
        if not (enabled and show_map and self.maps):
            return
        import torch.nn.functional as F
        from PIL import Image

        from erasekit.visualize import heat_overlay

        for image, heat in self.maps:
            mask = F.interpolate(heat[None, None].float(), size=tuple(image.shape[-2:]), mode="bilinear")[0, 0]
            over = heat_overlay(image.permute(1, 2, 0)[None].cpu(), mask[None].clamp(0, 1).cpu())[0]
            processed.images.append(Image.fromarray((over.numpy() * 255).round().astype("uint8")))
            processed.infotexts.append(processed.infotexts[0] if processed.infotexts else "")
        self.maps = []

    def _close(self):
        if self.run is not None:
            self.run.close()
            self.run = None


class _ForgeRun:
    """One sampling under the patch in Forge: its session (for the maps) and its error, if any. Forge would
    only stop the request on an error in its sampler (no sentence, no infotext), so the patch hands it
    here, stands down, and the images are withheld (:meth:`DetectAndGuideScript.postprocess_batch_list`)."""

    def __init__(self, backend):
        self.backend = backend
        self.error = None

    @property
    def session(self):
        return self.backend.session

    def fail(self, err):
        import modules.shared as shared
        from modules import errors

        self.error = err
        errors.report(f"Detect-and-Guide stopped: {err}", exc_info=True)
        shared.state.interrupt()  # stop sampling: nothing unguided is shown

    def close(self):
        pass  # Forge puts its own UNet patcher back before the next sampling


def _guidance(mode, strength, warmup, unsafe, edit, sld, sega):
    from erasekit.dag.guidance import DagSettings, Guidance, SegaSettings, SldSettings

    return Guidance(mode.lower(), DagSettings(tau_high=unsafe, tau_low=edit, warmup_fraction=warmup, strength=strength,
                                              top_p=sega), SegaSettings(warmup_fraction=warmup), SldSettings.preset(sld))


def _embedding(name: str, width: int):
    """The guideline embedding ``name``, checked against the model's text width."""
    from erasekit.dag.guideline import GuidelineEmbedding

    files = guideline_files()
    if name not in files:
        raise ValueError(f"No guideline embedding named '{name}' in {' or '.join(guideline_folders())}.")
    emb = GuidelineEmbedding.load(files[name])
    if emb.width != width:
        raise ValueError(f"The guideline embedding '{name}' has width {emb.width} (made for {emb.architecture}), "
                         f"but this model's text width is {width}; pick an embedding trained for this model.")
    return emb


def _context_width(diffusion_model) -> int:
    width = hooks.context_width(diffusion_model)
    if width is None:
        raise ValueError("This model has no cross-attention layers: Detect-and-Guide needs SD1.x, SD2.x or SDXL.")
    return width


script_callbacks.on_cfg_denoiser(dag_hooks.on_denoiser)
script_callbacks.on_cfg_denoised(dag_hooks.on_denoised)
script_callbacks.on_cfg_after_cfg(dag_hooks.on_after_cfg)
