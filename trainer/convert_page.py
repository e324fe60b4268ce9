"""The trainer page's "Convert a fine-tuned model" section: ``python -m trainer convert`` (someone's erased
UNet -> an erasure LoRA, with its SVD error) and ``python -m trainer merge`` (base + LoRA -> one checkpoint) on
the page. Handlers and layout live here, so the page gains the section with one call
(:func:`build_convert_section`); the work is :mod:`erasekit.convert` and :mod:`erasekit.merge`."""

from __future__ import annotations

from pathlib import Path

from erasekit.errors import ErasekitError

from . import jobs

METHOD_NAMES = ("", "esd", "uce", "ncd", "resalign", "inpo", "other")


class ConvertHandlers:
    """The section's two buttons; files are written only under the app's output root or a host's own
    folder (ComfyUI's / A1111's models), never elsewhere, and an existing file only when asked."""

    def __init__(self, app):
        self.app = app

    def lora_roots(self) -> dict:
        return self.app.export_roots()

    def checkpoint_roots(self) -> dict:
        roots = {"output root": self.app.root}
        if self.app.comfyui:
            roots["ComfyUI models/checkpoints"] = self.app.comfyui / "models" / "checkpoints"
        if self.app.webui:
            roots["Web UI models/Stable-diffusion"] = self.app.webui / "models" / "Stable-diffusion"
        return roots

    def _out(self, roots: dict, destination: str, name: str, overwrite: bool) -> Path:
        stem = jobs.slug(name) if name and name.strip() else ""
        if not stem:
            raise ErasekitError("The file name is empty; give one such as 'esd-van-gogh'.")
        path = jobs.safe_path(roots.get(destination) or self.app.root, stem + ".safetensors", "file name")
        if path.exists() and not overwrite:
            raise ErasekitError(f"'{path}' exists; tick 'Replace' to overwrite it, or pick another name.")
        return path

    def convert(self, source, base, rank, method, concept, name, destination, overwrite=False):
        """A fine-tuned UNet file -> an erasure LoRA; returns (message, written path)."""
        import gradio as gr

        from erasekit.convert import convert_to_lora

        try:
            if not (source or "").strip():
                raise ErasekitError("No fine-tuned weights given; type the path of the .safetensors (or .pt of plain "
                                    "tensors) file to convert.")
            out = self._out(self.lora_roots(), destination, name or Path(source.strip()).stem + "-lora", bool(overwrite))
            conv = convert_to_lora(source.strip(), (base or self.app.base).strip(), str(out), rank=int(rank or 8),
                                   method=(method or "").strip(), concept=(concept or "").strip())
        except (ErasekitError, ValueError) as err:
            gr.Warning(str(err))
            return f"**Error:** {err}", ""
        lines = conv.summary().splitlines()
        return ("\n".join([f"Wrote **{conv.path}**", "", *(f"- {ln.strip()}" for ln in lines[1:])])
                + "\n\nLoad it like a trained erasure LoRA (Load Erasure LoRA shows its method and concept)."), conv.path

    def merge(self, lora, base, strength, name, destination, overwrite=False):
        """Base + erasure LoRA -> one single-file checkpoint; returns (message, written path)."""
        import gradio as gr

        from erasekit.merge import merge_checkpoint

        try:
            if not (lora or "").strip():
                raise ErasekitError("No LoRA given; type the path of the erasure LoRA (.safetensors) to merge.")
            out = self._out(self.checkpoint_roots(), destination, name or Path(lora.strip()).stem + "-merged",
                            bool(overwrite))
            merged = merge_checkpoint((base or self.app.base).strip(), str(out), lora=lora.strip(),
                                      strength=float(strength if strength not in (None, "") else 1.0))
        except (ErasekitError, ValueError) as err:
            gr.Warning(str(err))
            return f"**Error:** {err}", ""
        return (f"Wrote **{merged.path}** ({merged.architecture.title}; erases: {merged.concept or 'not recorded'}; "
                f"{merged.unet_changed} UNet and {merged.text_changed} text-encoder weights changed).\n\n"
                "ComfyUI: Load Checkpoint; A1111 / Forge: the checkpoint list (models/Stable-diffusion)."), merged.path


def build_convert_section(app):
    """The section, inside the page's ``gr.Blocks``; returns its handlers."""
    import gradio as gr

    h = ConvertHandlers(app)
    with gr.Group(elem_id="convert-section"):
        gr.Markdown("## Convert a fine-tuned model\nSomeone else's erased weights (an ESD, UCE, NCD or ResAlign "
                    "release: a full or partial UNet, diffusers or original keys) become an erasure LoRA by SVD "
                    "against the base model, with the error of each layer reported. Or merge an erasure LoRA into "
                    "the base model as one checkpoint file.")
        with gr.Row():
            source = gr.Textbox(label="Fine-tuned weights", scale=3, elem_id="convert-source",
                                placeholder="e.g. /models/esd-x-van-gogh.safetensors",
                                info=".safetensors, a diffusers UNet folder, or a .pt/.bin of plain tensors only.")
            base = gr.Textbox(app.base, label="Base model it was fine-tuned from", scale=3, elem_id="convert-base")
        with gr.Row():
            rank = gr.Number(8, label="Rank", precision=0, minimum=1, elem_id="convert-rank",
                             info="Higher holds more of the fine-tune; the error report says whether it is enough.")
            method = gr.Dropdown(list(METHOD_NAMES), value="", label="Method", allow_custom_value=True,
                                 elem_id="convert-method")
            concept = gr.Textbox(label="Erased concept", elem_id="convert-concept", placeholder="e.g. Van Gogh")
        with gr.Row():
            name = gr.Textbox(label="LoRA name", elem_id="convert-name", placeholder="default: <file>-lora")
            into = gr.Radio(list(h.lora_roots()), value="output root", label="Into", elem_id="convert-into")
            replace = gr.Checkbox(False, label="Replace a file of the same name", elem_id="convert-replace")
        convert_btn = gr.Button("Convert", variant="primary", elem_id="convert")
        convert_msg = gr.Markdown("", elem_id="convert-msg")
        convert_path = gr.Textbox(label="Written file", interactive=False, elem_id="convert-path")
        with gr.Accordion("Merge an erasure LoRA into a checkpoint", open=False, elem_id="merge"):
            with gr.Row():
                lora = gr.Textbox(label="Erasure LoRA", scale=3, elem_id="merge-lora")
                strength = gr.Number(1.0, label="Strength", elem_id="merge-strength")
            with gr.Row():
                ckpt_name = gr.Textbox(label="Checkpoint name", elem_id="merge-name", placeholder="default: <LoRA>-merged")
                ckpt_into = gr.Radio(list(h.checkpoint_roots()), value="output root", label="Into", elem_id="merge-into")
                ckpt_replace = gr.Checkbox(False, label="Replace a file of the same name", elem_id="merge-replace")
            merge_btn = gr.Button("Merge", elem_id="merge-button")
            merge_msg = gr.Markdown("", elem_id="merge-msg")
            merge_path = gr.Textbox(label="Written checkpoint", interactive=False, elem_id="merge-path")
    convert_btn.click(h.convert, [source, base, rank, method, concept, name, into, replace], [convert_msg, convert_path],
                      api_name="convert_model")
    merge_btn.click(h.merge, [lora, base, strength, ckpt_name, ckpt_into, ckpt_replace], [merge_msg, merge_path],
                    api_name="merge_checkpoint")
    return h
