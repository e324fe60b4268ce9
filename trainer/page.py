"""The trainer app's page (Gradio 6 Blocks): the six steps in order, the runs, and the wiring of
every event to a :class:`trainer.app.TrainerApp` handler (each with an ``api_name``, so
``gradio_client`` drives the same handlers the buttons do). Layout only: no logic lives here."""

from __future__ import annotations

from erasekit.erase.images import IMAGE_EXTENSIONS
from trainer.convert_page import build_convert_section
from trainer.fields import CONCEPT_TYPES, FIELDS, HARM_LOSSES, INT_KEYS, KEYS, METHODS, with_signature
from trainer.help import HELP, STRENGTH_HELP, STRENGTHS
from trainer.plots import LOSS_COLOURS, SIGNAL_COLOURS
from trainer.pool import COLUMNS as POOL_COLUMNS
from trainer.pool import DATATYPES as POOL_TYPES
from trainer.runs import REPLACE_LABEL, WEBUI_ROOT
from trainer.view import POLL_OUTPUTS


def build_page(app):
    """The page for ``app`` (a :class:`trainer.app.TrainerApp`), queued, one job at a time."""
    import gradio as gr

    d = app.defaults
    comps = {}
    with gr.Blocks(title="Erasekit trainer") as demo:
        gr.Markdown("# Erasekit trainer\nErase a concept from a text-to-image model: pick the model, say what to "
                    "erase, make the data, train, check, export. Each step works on its own.")
        status = gr.Markdown("No job yet.", elem_id="job-status")
        with gr.Group():
            gr.Markdown("## 1. Base model")
            with gr.Row():
                comps["base"] = gr.Dropdown(app.base_choices(), value=d["base"], label="Base model",
                                            allow_custom_value=True, scale=4,
                                            info="A diffusers folder or a .safetensors checkpoint (local path).")
                detect_btn = gr.Button("Detect", scale=1)
            arch = gr.Markdown(app.detect(d["base"]), elem_id="arch")
        with gr.Group():
            gr.Markdown("## 2. What to erase")
            with gr.Row():
                comps["concept_type"] = gr.Radio(list(CONCEPT_TYPES), value=d["concept_type"], label="Concept type")
                comps["target"] = gr.Textbox(d["target"], label="Concept to erase")
                comps["anchor"] = gr.Textbox(d["anchor"], label="Anchor / safe concept",
                                             info="What the concept may turn into (INPO does not use it; kept in the settings).")
            with gr.Row():
                comps["preserve"] = gr.Textbox("\n".join(app._suggested(d["target"])), lines=4, scale=4,
                                               label="Concepts to preserve (one a line)")
                suggest_btn = gr.Button("Suggest", scale=1)
            comps["run_name"] = gr.Textbox(d["run_name"], label="Run name",
                                           info=f"{HELP['run_name']} Under {app.root}.")
            concept_note = gr.Markdown(app.concept_note(d["concept_type"], d["base"]), elem_id="concept-note")
        with gr.Group():
            gr.Markdown("## 3. Data")
            with gr.Row():
                for k in ("forget_images", "images_per_concept", "neighbours", "unrelated", "data_steps"):
                    comps[k] = gr.Number(d[k], label=dict((a, b) for a, b, _ in FIELDS)[k], precision=0)
            with gr.Row():
                comps["mask_from"] = gr.Dropdown(
                    [("auto: the guideline if given, NudeNet for nudity, else whole image", "auto"),
                     ("whole image", "full"), ("guideline embedding (Detect-and-Guide's detector)", "guideline"),
                     ("NudeNet boxes (nudity)", "nudenet")], value=d["mask_from"], label="Masks",
                    info="Where the concept is in each generated image. The toy model's judge knows exactly; "
                         "other models need one of these.")
                comps["guideline"] = gr.Textbox(d["guideline"], label=dict((a, b) for a, b, _ in FIELDS)["guideline"],
                                                placeholder="e.g. ComfyUI/models/guideline/my-concept.safetensors")
            with gr.Accordion("Upload forget images (optional)", open=False):
                uploads = gr.File(file_count="multiple", file_types=[*IMAGE_EXTENSIONS, ".txt"], elem_id="uploads",
                                  label="name.png, optional name_mask.png (white = concept) and name.txt (caption), "
                                        f"up to {app.upload_mb} MB a file")
                upload_msg = gr.Markdown("")
            data_btn = gr.Button("Generate data", variant="secondary", elem_id="generate-data")
            data_summary = gr.Markdown("", elem_id="data-summary")
            gallery = gr.Gallery(label="Forget (mask outlined) or NCD's tuples, and preserve images", columns=8, height=300,
                                 elem_id="data-gallery")
            with gr.Accordion("Review the forget images: fix a mask with the brush, remove an image", open=False,
                              elem_id="review"):
                with gr.Row():
                    review_index = gr.Number(1, label="Image (1 = first)", precision=0, minimum=1, elem_id="review-index")
                    review_show = gr.Button("Show", elem_id="review-show")
                    review_save = gr.Button("Save mask", variant="primary", elem_id="review-save")
                    review_remove = gr.Button("Remove image", variant="stop", elem_id="review-remove")
                editor = gr.ImageEditor(label="Mask (red layer)", type="numpy", image_mode="RGBA", sources=(),
                                        transforms=(), layers=False, format="png", height=340, elem_id="mask-editor",
                                        brush=gr.Brush(colors=["rgba(255, 40, 40, 0.6)"], default_size=16,
                                                       color_mode="fixed"),
                                        eraser=gr.Eraser(default_size=16))
                review_msg = gr.Markdown("", elem_id="review-msg")
        with gr.Group():
            gr.Markdown("## 4. Train")
            with gr.Row():
                comps["method"] = gr.Dropdown(list(METHODS), value="inpo", label="Method",
                                              info="Guideline tokens use the forget images (with masks) and a few "
                                                   "safe images; they train in seconds. NCD makes its own pictures: "
                                                   "each prompt's three drawings of the concept and one redrawn as "
                                                   "the anchor (or name.png + name_safe.png uploads).")
                comps["preset"] = gr.Dropdown(["object", "character", "style", "nsfw"], value=d["preset"],
                                              label="Preset (the paper's settings for this kind of concept)")
                strength = gr.Radio(list(STRENGTHS), value="default", label="Strength", info=STRENGTH_HELP,
                                    elem_id="strength")
                comps["steps"] = gr.Number(d["steps"], label="Steps", precision=0)
            with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                with gr.Row():
                    for k in ("lr", "rank", "alpha", "batch_size", "eta", "gamma"):
                        comps[k] = gr.Number(d[k], label=dict((a, b) for a, b, _ in FIELDS)[k],
                                             precision=0 if k in INT_KEYS else None)
                with gr.Row():
                    for k in ("tau", "lambda_prior", "sample_every", "sample_steps", "checkpoint_every", "seed"):
                        comps[k] = gr.Number(d[k], label=dict((a, b) for a, b, _ in FIELDS)[k],
                                             precision=0 if k in INT_KEYS else None)
                with gr.Row(visible=d["method"] == "ncd", elem_id="ncd-settings") as ncd_row:
                    label = dict((a, b) for a, b, _ in FIELDS)
                    for k in ("beta", "lambda_pair", "img2img_strength"):
                        comps[k] = gr.Number(d[k], label=label[k], info=HELP[k])
                    comps["pair_reduce"] = gr.Dropdown(["sum", "mean"], value=d["pair_reduce"], label=label["pair_reduce"],
                                                       info=HELP["pair_reduce"])
                    comps["harm_weights"] = gr.Textbox(d["harm_weights"], label=label["harm_weights"],
                                                       placeholder="1.2,1.0,0.8", info=HELP["harm_weights"])
                    comps["nca"] = gr.Checkbox(d["nca"], label=label["nca"], info=HELP["nca"])
                with gr.Column(visible=d["method"] == "resalign", elem_id="resalign-settings") as resalign_row:
                    with gr.Row():
                        for k in ("resalign_beta", "iterations", "configs"):
                            comps[k] = gr.Number(d[k], label=dict((a, b) for a, b, _ in FIELDS)[k],
                                                 precision=0 if k in INT_KEYS else None)
                        comps["init_lora"] = gr.Textbox(d["init_lora"], label=dict((a, b) for a, b, _ in FIELDS)["init_lora"])
                        comps["harm_loss"] = gr.Dropdown(list(HARM_LOSSES), value=d["harm_loss"], info=HELP["harm_loss"],
                                                         label=dict((a, b) for a, b, _ in FIELDS)["harm_loss"])
                    comps["pool"] = gr.Dataframe(d["pool"], headers=POOL_COLUMNS, datatype=POOL_TYPES, interactive=True,
                                                 label=dict((a, b) for a, b, _ in FIELDS)["pool"], row_count=None,
                                                 show_row_numbers=True, elem_id="f-pool")
                    gr.Markdown(HELP["pool"], elem_id="pool-help")
                    with gr.Row():
                        pool_file = gr.Textbox("", label="Pool file (.toml)", info=HELP["pool_file"], scale=4,
                                               placeholder="e.g. my-run/pool.toml", elem_id="pool-file")
                        pool_btn = gr.Button("Load pool file", scale=1, elem_id="load-pool")
                    pool_msg = gr.Markdown("", elem_id="pool-msg")
                comps["stop_when_erased"] = gr.Checkbox(
                    d["stop_when_erased"], label=dict((a, b) for a, b, _ in FIELDS)["stop_when_erased"])
                with gr.Row():
                    settings_file = gr.Textbox("settings.toml", label="Settings file (under the output root)")
                    save_btn = gr.Button("Save settings")
                    load_btn = gr.Button("Load settings")
                settings_msg = gr.Markdown("")
            estimate = gr.Markdown(app.estimate(d["base"], d["steps"], 1, d["sample_every"]), elem_id="estimate")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                resume_btn = gr.Button("Resume", elem_id="resume")
            action = gr.Markdown("", elem_id="action")
            job_id = gr.Number(0, visible=False, precision=0)
            with gr.Row():
                plot = gr.LinePlot(x="step", y="value", color="series", x_title="training step",
                                   label="Loss (blue: each step; orange: smoothed)", color_map=LOSS_COLOURS,
                                   y_title="loss", height=320,
                                   elem_id="loss-plot")
                with gr.Column():
                    signal = gr.LinePlot(x="step", y="value", color="series", color_map=SIGNAL_COLOURS,
                                         label="Erasure signal (the note under it names the lines' colours)",
                                         x_title="training step", y_title="signal", height=320, elem_id="signal-plot")
                    signal_note = gr.Markdown("", elem_id="signal-note")
            with gr.Row():
                with gr.Column():
                    preview = gr.Image(label="Latest preview (rows: prompts, columns: seeds)", type="pil",
                                       height=260, elem_id="preview")
                    preview_caption = gr.Markdown("")
            log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, elem_id="log")
        with gr.Group():
            gr.Markdown("## 5. Check\nThe same seeds before (left) and after (right) the LoRA (or Detect-and-Guide with "
                        "the guideline embedding), on the target, a "
                        "neighbouring and an unrelated prompt; the toy judge counts the images showing each concept.")
            with gr.Row():
                check_seeds = gr.Number(4, label="Seeds", precision=0, elem_id="check-seeds")
                check_steps = gr.Number(20, label="Sampling steps", precision=0, elem_id="check-steps")
                check_strength = gr.Slider(0.0, 5.0, value=1.0, step=0.05, label="Strength", elem_id="check-strength",
                                           info="The LoRA's weight (as in a LoRA loader), or Detect-and-Guide's "
                                                "strength (1 = the paper; raise it for small objects)")
                check_btn = gr.Button("Check", elem_id="check")
            check_msg = gr.Markdown("", elem_id="check-msg")
            grid = gr.Image(label="Before | after", type="numpy", elem_id="check-grid")
            counts = gr.Dataframe(headers=["row", "prompt", "judged concept", "before", "after"], label="Judge counts",
                                  interactive=False, elem_id="check-counts")
            report_note = gr.Markdown("", elem_id="check-report")
        with gr.Group():
            gr.Markdown("## 6. Export")
            with gr.Row():
                lora_name = gr.Textbox("erase-red-circle", label="LoRA name", elem_id="lora-name")
                license_ = gr.Textbox("", label="License", placeholder="default: the base model's license")
            description = gr.Textbox("", label="Description", placeholder="default: what it erases, and how")
            with gr.Row():
                into_host = "ComfyUI models/loras" if app.comfyui is not None else WEBUI_ROOT if app.webui is not None \
                    else None  # a host's own folder (python -m trainer app --comfyui / --webui)
                destination = gr.Radio(list(app.export_roots()), label="Into", value=into_host or "output root",
                                       elem_id="export-into",
                                       info="Web UI models/Lora (--webui): Automatic1111 / Forge list it on their "
                                            "Lora tab, with a card saying what it erases" if app.webui else None)
                folder = gr.Textbox("" if into_host else "loras", label="Folder (inside it)",
                                    placeholder="empty: directly into it")
            overwrite = gr.Checkbox(False, label=REPLACE_LABEL, elem_id="export-overwrite",
                                    info="Off: a file of the same name in that folder is kept and the export refused.")
            export_btn = gr.Button("Export", variant="primary", elem_id="export")
            export_msg = gr.Markdown("", elem_id="export-msg")
            export_path = gr.Textbox(label="Exported file", interactive=False, elem_id="export-path")
        build_convert_section(app)  # python -m trainer convert / merge on the page (trainer/convert_page.py)
        with gr.Group():
            gr.Markdown("## Runs")
            runs_table = gr.Dataframe(headers=["run", "target", "steps", "status", "output"], interactive=False,
                                elem_id="runs")
            refresh_btn = gr.Button("Refresh")
        for k, comp in comps.items():  # stable ids for the browser tests and user CSS; plain words under each
            comp.elem_id = comp.elem_id or f"f-{k}"
            if not getattr(comp, "info", None) and k in HELP:
                comp.info = HELP[k]
        trained = gr.Number(0, visible=False, precision=0)  # finished trainings: the estimate reads them again
        seen = gr.State({})
        timer = gr.Timer(1.0)

        inputs = [comps[k] for k in KEYS]
        sig = {"defaults": d}
        detect_btn.click(app.detect, comps["base"], arch, api_name="detect_model")
        comps["base"].change(app.detect, comps["base"], arch, api_name=False)
        for k in ("concept_type", "base"):
            comps[k].change(app.concept_note, [comps["concept_type"], comps["base"]], concept_note, api_name=False)
        strength.input(app.strength_changed, [strength, comps["preset"], comps["base"]],
                       [comps["steps"], comps["lambda_prior"]], api_name="strength")
        for k in ("preset", "concept_type"):  # they set the preset's own numbers: the strength is its default again
            comps[k].input(lambda: "default", None, strength, api_name=False)
        comps["concept_type"].input(
            app.concept_type_changed, [comps["concept_type"], comps["base"]],
            [comps["target"], comps["anchor"], comps["preserve"], comps["preset"], comps["steps"], comps["rank"],
             comps["eta"], comps["gamma"], comps["tau"], comps["lambda_prior"], comps["run_name"]],
            api_name="concept_type")
        comps["method"].input(app.method_changed, [comps["method"], comps["forget_images"], comps["preset"]],
                              [comps["steps"], comps["forget_images"]], api_name="method")
        comps["method"].input(app.method_view, [comps["method"], comps["base"]],
                              [comps["lr"], ncd_row, resalign_row, comps["beta"], comps["lambda_prior"], comps["batch_size"],
                               comps["stop_when_erased"]], api_name=False)
        comps["preset"].input(app.preset_changed, [comps["preset"], comps["base"]],
                              [comps[k] for k in ("steps", "rank", "eta", "gamma", "tau", "lambda_prior")],
                              api_name="preset")
        uploads.change(app.upload_images, [comps["run_name"], uploads, comps["method"]], upload_msg, api_name="upload_images")
        comps["method"].input(app.upload_summary, [comps["run_name"], comps["method"]], upload_msg, api_name=False)
        pool_btn.click(app.load_pool_file, pool_file, [comps["pool"], pool_msg], api_name="load_pool_file")
        review_show.click(app.review_show, [comps["run_name"], review_index], [editor, review_msg], api_name="review_show")
        review_save.click(app.review_save, [comps["run_name"], review_index, editor], review_msg, api_name="review_save")
        review_remove.click(app.review_remove, [comps["run_name"], review_index], [editor, review_index, review_msg],
                            api_name="review_remove")
        suggest_btn.click(app.suggest_preserve, [comps["target"], comps["neighbours"], comps["unrelated"]],
                          comps["preserve"], api_name="suggest_preserve")
        estimate_in = [comps["base"], comps["steps"], comps["batch_size"], comps["sample_every"]]
        for trigger in (comps["base"], comps["steps"], comps["batch_size"], comps["sample_every"], trained):
            trigger.change(app.estimate, estimate_in, estimate, api_name=False)
        data_btn.click(with_signature(app.generate_data, KEYS, **sig), inputs, [data_summary, job_id],
                       api_name="generate_data")
        start_btn.click(with_signature(app.start_training, KEYS, **sig), inputs, [action, job_id],
                        api_name="start_training")
        stop_btn.click(app.stop, None, action, api_name="stop")
        resume_btn.click(app.resume_training, [comps["run_name"], comps["steps"], comps["stop_when_erased"]], [action, job_id],
                         api_name="resume")
        check_btn.click(app.check, [comps["run_name"], check_seeds, check_steps, check_strength], [check_msg, job_id],
                        api_name="check")
        export_btn.click(app.export, [comps["run_name"], lora_name, description, license_, destination, folder, overwrite],
                         [export_msg, export_path], api_name="export")
        save_btn.click(with_signature(app.save_settings, ["file_name"] + KEYS, {"file_name": "settings.toml", **d}),
                       [settings_file] + inputs, settings_msg, api_name="save_settings")
        load_btn.click(app.load_settings, settings_file, inputs + [settings_msg], api_name="load_settings")
        parts = {"status": status, "log": log, "plot": plot, "preview": preview, "preview_caption": preview_caption,
                 "gallery": gallery, "data_summary": data_summary, "grid": grid, "counts": counts,
                 "report_note": report_note, "runs": runs_table,
                 "action": action, "check_msg": check_msg, "signal": signal, "signal_note": signal_note,
                 "data_btn": data_btn, "start_btn": start_btn, "stop_btn": stop_btn, "resume_btn": resume_btn,
                 "check_btn": check_btn, "export_btn": export_btn, "trained": trained}
        poll_out = [parts[n] for n in POLL_OUTPUTS] + [seen]
        timer.tick(app.poll, [seen, comps["run_name"]], poll_out, api_name="poll", show_progress="hidden",
                   concurrency_limit=None)
        refresh_btn.click(lambda run_name: app.poll({}, run_name), [comps["run_name"]], poll_out,
                          api_name="refresh", concurrency_limit=None)
        demo.load(lambda run_name: app.poll({}, run_name), [comps["run_name"]], poll_out, api_name=False)
        gr.api(app.job_status, api_name="job_status")
    demo.queue(default_concurrency_limit=1)
    return demo
