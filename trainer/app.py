"""The trainer app: ``python -m trainer app`` (Gradio 6), a page over the engine, one step after another.

1. Base model  2. What to erase  3. Data  4. Train (INPO, or DAG guideline tokens)  5. Check
6. Export, and the list of runs. This module holds the handlers (:class:`TrainerApp`); the
layout is :mod:`trainer.page`, the work :mod:`trainer.work` (run as background jobs of
:mod:`trainer.jobs`, one at a time) and run folders :mod:`trainer.runs`. A 1-second timer shows
the current job (so a reloaded page sees it too). Every event has an ``api_name``
(``gradio_client`` drives them all; ``/job_status`` is API-only). Files are written only under
``--out-root`` (and ComfyUI's ``models/loras`` / ``models/guideline`` with ``--comfyui``, a web UI's
``models/Lora`` / ``models/guideline`` with ``--webui``);
user-given paths are resolved and checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from erasekit.dag.fit import GUIDELINE_IMAGES  # noqa: E402
from erasekit.erase.images import IMAGE_EXTENSIONS  # noqa: E402
from erasekit.errors import ErasekitError  # noqa: E402
from trainer import estimate, jobs, runs, work  # noqa: E402
from trainer.fields import (  # noqa: E402
    DEFAULT_BASE,
    EXAMPLES,
    FIELD_OF_SETTING,
    FIELDS,
    GUIDELINE_STEPS_PER_IMAGE,
    INT_KEYS,
    KEYS,
    PRESET_OF_TYPE,
    UPLOAD_MB,
)
from trainer.review import ReviewHandlers  # noqa: E402
from trainer.words import page_words  # noqa: E402


def _run_steps(run_dir) -> str:
    """The total steps a run was made with (its config.toml), as text."""
    from erasekit.erase.state import read_config

    try:
        return str(read_config(Path(run_dir) / "config.toml")["train"]["steps"])
    except (ErasekitError, KeyError, TypeError):
        return "an unknown number of steps"


class TrainerApp(ReviewHandlers):
    def __init__(self, out_root="runs", comfyui: str | None = None, base: str | None = None, threads: int | None = None,
                 upload_mb: int = UPLOAD_MB, webui: str | None = None):
        self.upload_mb = int(upload_mb)  # the most an uploaded file may weigh (Gradio's max_file_size too)
        self.root = Path(out_root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.comfyui = Path(comfyui).resolve() if comfyui else None
        self.webui = Path(webui).resolve() if webui else None  # Automatic1111 / Forge: its folder or its --data-dir
        self.base = str(base or DEFAULT_BASE)
        self.threads = threads
        self.defaults = {k: v for k, _, v in FIELDS}
        self.defaults["base"] = self.base
        if self._is_toy(self.base):  # the toy model's measured tuning (erasekit.erase.inpo.TOY_TUNING)
            from erasekit.erase.inpo import TOY_TUNING

            self.defaults.update(TOY_TUNING)

    # ------------------------------------------------------------------ helpers

    def base_choices(self) -> list:
        choices = [self.base]
        if str(DEFAULT_BASE) not in choices:
            choices.append(str(DEFAULT_BASE))
        if self.comfyui:
            folder = self.comfyui / "models" / "checkpoints"
            if folder.is_dir():
                choices += sorted(str(p) for p in folder.rglob("*.safetensors"))
            dfolder = self.comfyui / "models" / "diffusers"
            if dfolder.is_dir():
                choices += sorted(str(p.parent) for p in dfolder.glob("*/model_index.json"))
        if self.webui:
            folder = self.webui / "models" / "Stable-diffusion"
            if folder.is_dir():
                choices += sorted(str(p) for p in folder.rglob("*.safetensors"))
        return choices

    def export_roots(self) -> dict:
        roots = {"output root": self.root}
        if self.comfyui:
            roots["ComfyUI models/loras"] = self.comfyui / "models" / "loras"
        if self.webui:
            roots[runs.WEBUI_ROOT] = self.webui / "models" / "Lora"
        return roots

    def settings(self, values) -> dict:
        s = dict(zip(KEYS, values))
        for k in INT_KEYS:
            if s.get(k) not in (None, ""):
                s[k] = int(s[k])
        s["alpha"] = float(s["alpha"]) if s.get("alpha") else None
        s["stop_when_erased"] = bool(s.get("stop_when_erased"))
        s["preset"] = s.get("preset") or PRESET_OF_TYPE.get(s.get("concept_type"), "object")
        lines = [ln.strip() for ln in str(s.get("preserve") or "").replace(",", "\n").splitlines() if ln.strip()]
        suggestions = [self._suggested(s.get("target"), s.get("neighbours"), s.get("unrelated")),
                       self._suggested(s.get("target"))]  # an untouched suggestion means "the engine's default"
        s["preserve_prompts"] = lines if lines and lines not in suggestions else None
        s["threads"] = self.threads
        s["base"] = (s.get("base") or self.base).strip()
        # ResAlign's pool table: checked and written as the run's pool.toml by Start (start_training), not a flag
        s["pool_table"], s["pool"] = s.get("pool"), None
        if not s.get("target", "").strip():
            raise ErasekitError("No concept to erase: type one in step 2, e.g. 'red circle'.")
        uploads = self.run_dir(s["run_name"]) / "uploads" / "forget"
        if uploads.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in uploads.iterdir()):
            s["forget_dir"] = str(uploads)  # the user's images replace the generated forget set
        return s

    def run_dir(self, name: str) -> Path:
        return jobs.safe_path(self.root, name, "run name")

    def _is_toy(self, base: str) -> bool:
        index = os.path.join(base, "model_index.json")
        if not os.path.isfile(index):
            return False
        try:
            with open(index, encoding="utf-8") as f:
                return '"ToyPipeline"' in f.read()
        except (OSError, ValueError):  # unreadable: not the toy model (Detect says what is wrong)
            return False

    def _suggested(self, target, neighbours=4, unrelated=4) -> list:
        from erasekit.erase.data import preserve_concepts, prompts_for
        from erasekit.toyworld.vocab import parse_concept

        try:
            concept = parse_concept(target or "")
        except ValueError:
            return []
        return [prompts_for(c, 1, 0)[0] for c in preserve_concepts(concept, int(neighbours or 0), int(unrelated or 0))]

    # ------------------------------------------------------------------ step handlers

    def detect(self, base):
        from erasekit import checkpoints

        base = (base or "").strip()
        if not base or not os.path.exists(base):
            return f"**Not found:** '{base}' does not exist; pick a diffusers folder or a .safetensors checkpoint."
        try:
            if os.path.isdir(base):
                arch = folder_architecture(base)
            else:
                shapes, _ = checkpoints.read_header(base, "checkpoint")
                arch = checkpoints.detect_architecture(shapes, base)
        except ErasekitError as err:
            return f"**Error:** {page_words(err)}"
        return f"Architecture: **{arch.title}** (`{arch.name}`)."

    def concept_type_changed(self, concept_type, base=None):
        target, anchor = EXAMPLES.get(concept_type, EXAMPLES["object"])
        preset_name = PRESET_OF_TYPE[concept_type]
        return (target, anchor, "\n".join(self._suggested(target)), preset_name,
                *self.preset_changed(preset_name, base), f"erase-{jobs.slug(target)}")

    def concept_note(self, concept_type, base=None):
        """A warning under step 2 when the base model cannot draw this kind of concept (also a toast)."""
        import gradio as gr

        from trainer.help import concept_warning

        note = concept_warning(concept_type, self._is_toy(base or self.base))
        if note:
            gr.Warning(note.replace("**", ""))
        return note

    def strength_changed(self, strength, preset_name, base=None):
        """(steps, lambda_prior) of the preset at a strength: gentle, default or strong (:mod:`trainer.help`)."""
        from erasekit.erase.inpo import preset
        from trainer.help import strength_values

        return strength_values(preset(preset_name or "object", toy=self._is_toy(base or self.base)), strength)

    def preset_changed(self, name, base=None):
        from erasekit.erase.inpo import preset

        row = preset(name or "object", toy=self._is_toy(base or self.base))
        return row["steps"], row["rank"], row["eta"], row["gamma"], row["tau"], row["lambda_prior"]

    def method_changed(self, method, forget_images, preset):
        """(steps, forget images) for the method: DAG's 100 x the unsafe images, or INPO's preset. The
        image count moves between the two methods' defaults; a number the user typed stays."""
        from erasekit.erase.inpo import preset as inpo_preset

        inpo_images = dict((k, d) for k, _, d in FIELDS)["forget_images"]
        n = int(forget_images or 0)
        if method == "guideline":
            n = GUIDELINE_IMAGES if n in (0, inpo_images) else n
            return GUIDELINE_STEPS_PER_IMAGE * n, n
        if method in ("resalign", "ncd"):  # their presets' steps (NCD: the paper's 3200, the toy tuning's own)
            from erasekit.erase import methods

            return methods.get(method).preset(preset or "object", toy=self._is_toy(self.base))[0]["steps"], \
                inpo_images if n in (0, GUIDELINE_IMAGES) else n
        return inpo_preset(preset or "object")["steps"], inpo_images if n in (0, GUIDELINE_IMAGES) else n

    def method_view(self, method, base=None):
        """(learning rate, NCD's settings, ResAlign's settings shown or hidden, beta, lambda_prior, batch size,
        stop when erased) for the method: its preset's learning rate (NCD on a real model: the paper's 1e-6 for
        the full UNet), each method's row only with it; NCD's beta and the method's lambda_prior from its preset
        (the toy tuning's on the toy model, the paper's elsewhere: NCD 0), so the page sends those rather than
        another method's; the batch size and *Stop when erased* of its preset (the engine's 1 and off where
        it names none: ResAlign's toy tuning has 4 and on)."""
        import gradio as gr

        from erasekit.erase import methods

        if method not in methods.METHODS:  # the guideline tokens keep the field as it is
            return gr.skip(), gr.update(visible=False), gr.update(visible=False), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        train_row, method_row = methods.get(method).preset("object", toy=self._is_toy(base or self.base))
        ncd = method == "ncd"
        return (train_row.get("lr", 1e-4), gr.update(visible=ncd), gr.update(visible=method == "resalign"),
                method_row.get("beta", gr.skip()) if ncd else gr.skip(),
                method_row.get("lambda_prior", 0.0 if ncd else gr.skip()), train_row.get("batch_size", 1),
                train_row.get("stop_when_erased", False))

    def suggest_preserve(self, target, neighbours, unrelated):
        import gradio as gr

        found = self._suggested(target, neighbours, unrelated)
        if not found:
            gr.Warning("No suggestion: the toy model does not know this concept; type the concepts to keep, one a line.")
        return "\n".join(found)

    def estimate(self, base, steps, batch_size, sample_every):
        base = base or self.base
        recent = estimate.recent_runs(self.root)
        return (estimate.time_line(recent, steps, batch_size, sample_every, self._is_toy(base), base) + "\n\n"
                + estimate.memory_line(recent, base))

    def _memory(self, base: str) -> str:
        return estimate.memory_line(estimate.recent_runs(self.root), base)

    def upload_images(self, run_name, files, method="inpo"):
        """Copy uploaded images (``name.png`` / ``.jpg`` / ``.webp``, optional ``name_mask.png`` and
        ``name.txt``; NCD's pairs add ``name_safe.png``) into the run's ``uploads/forget`` folder: they
        become the forget set (NCD: its tuples) instead of generated images; :meth:`upload_summary` says
        what the chosen method will use. Refused while a job or another process uses the run, and once
        the run has checkpoints (its data would change under a later Resume); a file over the upload
        limit is refused with its name and size. Nothing of the run changes when an upload is refused."""
        import shutil

        import gradio as gr

        try:
            folder = self.run_dir(run_name) / "uploads" / "forget"
            self._check_upload(folder.parent.parent, files)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}"
        shutil.rmtree(folder, ignore_errors=True)
        # the data cache is keyed by the folder's path, not its files: new uploads mean new data
        (folder.parent.parent / "data.safetensors").unlink(missing_ok=True)
        shutil.rmtree(folder.parent.parent / runs.REVIEW, ignore_errors=True)
        for f in files or []:
            src = Path(f if isinstance(f, str) else getattr(f, "name", f))
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", src.name)
            if name.lower().endswith((*IMAGE_EXTENSIONS, ".txt")):
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / name)
        return self.upload_summary(run_name, method) or "No uploaded images: the forget set is generated from the base model."

    def upload_summary(self, run_name, method="inpo") -> str:
        """What the run's uploaded images are to the chosen method: INPO's (and ResAlign's) forget images
        with their masks, or NCD's pairs (``name.png`` beside ``name_safe.png``; ``name_2`` / ``name_3``
        more pictures of the concept; a picture without its safe version is left out). "" without uploads."""
        try:
            folder = self.run_dir(run_name) / "uploads" / "forget"
        except ErasekitError:
            return ""
        names = sorted(f.name.lower() for f in folder.iterdir()) if folder.is_dir() else []
        stems = [os.path.splitext(n) for n in names]
        images = [stem for stem, ext in stems if ext in IMAGE_EXTENSIONS and not stem.endswith("_mask")]
        if not images:
            return ""
        run = folder.parent.parent.name
        if method == "ncd":
            heads = [s for s in images if not s.endswith("_safe") and not re.search(r"_[23]$", s)]
            pairs = [s for s in heads if s + "_safe" in images]
            alone = [s for s in heads if s not in pairs]
            more = sum(f"{s}_{j}" in images for s in pairs for j in (2, 3))
            if not pairs:
                return (f"**No NCD pair** among the {len(images)} uploaded images of run '{run}': NCD needs each picture "
                        "of the concept as name.png beside the same picture without it as name_safe.png.")
            return (f"{len(pairs)} uploaded NCD pair{'s' if len(pairs) != 1 else ''} (a picture of the concept beside its "
                    f"safe version, name_safe.png{f'; {more} more pictures of the concept as name_2 / name_3' if more else ''}"
                    f") replace NCD's generated tuples of run '{run}'"
                    + (f"; {len(alone)} picture{'s' if len(alone) != 1 else ''} without a name_safe.png "
                       f"({', '.join(alone[:3])}{', ...' if len(alone) > 3 else ''}) {'is' if len(alone) == 1 else 'are'} "
                       "left out." if alone else "."))
        masks = sum(stem.endswith("_mask") and stem[:-5] in images for stem, ext in stems)
        return (f"{len(images)} uploaded images ({masks} with a mask; no mask = the whole image) replace the generated "
                f"forget set of run '{run}'.")

    def _check_upload(self, run_dir: Path, files) -> None:
        """Refuse an upload into a run that is busy (a job here, another process's lock) or has
        checkpoints, and files over the upload limit, with one sentence."""
        from erasekit.erase.state import busy_sentence, latest_checkpoint, lock_holder

        busy = jobs.busy_with(run_dir)
        if busy is not None:
            raise ErasekitError(f"The run '{run_dir.name}' is busy with job {busy.id} ({busy.kind}); upload once it ends.")
        holder = lock_holder(run_dir)
        if holder is not None:
            raise ErasekitError(busy_sentence(run_dir, holder))
        if latest_checkpoint(run_dir) is not None:
            raise ErasekitError(f"The run '{run_dir.name}' has checkpoints: new images would change its data under a "
                                "later Resume; upload them into a new run name (step 2).")
        for f in files or []:
            src = Path(f if isinstance(f, str) else getattr(f, "name", f))
            size = src.stat().st_size if src.is_file() else 0
            if size > self.upload_mb * 2**20:
                raise ErasekitError(f"The file '{src.name}' is {size / 2**20:.0f} MB; uploads are limited to "
                                    f"{self.upload_mb} MB a file.")

    def _submit(self, kind, title, fn, run_dir):
        import gradio as gr

        busy = jobs.busy_with(run_dir)
        if busy is not None:
            raise gr.Error(f"The run '{run_dir.name}' is busy with job {busy.id} ({busy.kind}); stop it or wait.")
        job = jobs.submit(kind, title, fn, run_dir)
        return f"Queued: {title} (job {job.id}).", job.id

    def generate_data(self, *values):
        import gradio as gr

        try:
            s = self.settings(values)
            run_dir = self.run_dir(s["run_name"])
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}", 0
        return self._submit("data", f"data for '{s['target']}' in {run_dir.name}", work.data_job(s, run_dir), run_dir)

    def start_training(self, *values):
        import gradio as gr

        from erasekit.erase.engine import latest_checkpoint

        try:
            s = self.settings(values)
            run_dir = self.run_dir(s["run_name"])
            if s.get("method") == "guideline":
                if latest_checkpoint(run_dir) is not None or runs.find_lora(run_dir) is not None:
                    raise ErasekitError(f"The run '{run_dir.name}' holds an INPO training; give the guideline tokens "
                                        "their own run name (step 2).")
                return self._submit("guideline", f"guideline tokens for '{s['target']}' in {run_dir.name}",
                                    work.guideline_job(s, run_dir), run_dir)
            if latest_checkpoint(run_dir) is not None:
                raise ErasekitError(f"The run '{run_dir.name}' already has checkpoints; press Resume to continue it, "
                                    "or give a new run name.")
            if runs.find_guideline(run_dir) is not None:
                raise ErasekitError(f"The run '{run_dir.name}' holds guideline tokens; give the INPO training its own "
                                    "run name (step 2).")
            if s.get("method") == "resalign":  # a bad row of the table: one sentence, nothing starts
                from dataclasses import asdict

                from trainer.pool import pool_from_table

                s["pool_rows"] = [asdict(c) for c in pool_from_table(s["pool_table"])]
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}", 0
        return self._submit("train", f"training '{s['target']}' in {run_dir.name}", work.train_job(s, run_dir), run_dir)

    def resume_training(self, run_name, steps, stop_when_erased=None):
        import gradio as gr

        from erasekit.erase.state import checkpoint_step, latest_checkpoint

        try:
            run_dir = self.run_dir(run_name)
            last = latest_checkpoint(run_dir)
            if last is None:
                raise ErasekitError(f"The run '{run_dir.name}' has no checkpoint to resume from; press Start instead "
                                    "(guideline tokens train in seconds and always start afresh).")
            at = checkpoint_step(last)
            if steps and int(steps) <= at:  # e.g. the page's default after a reload: it would end the run where it is
                raise ErasekitError(f"Steps ({int(steps)}) is not above the step the run '{run_dir.name}' has reached "
                                    f"({at}); set Steps to the total you want it to train (it was made with "
                                    f"{_run_steps(run_dir)}).")
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}", 0
        s = {"steps": int(steps) if steps else None, "threads": self.threads,
             # ticked: turn it on; unticked (also what a reloaded page shows): the run keeps its own setting
             "stop_when_erased": True if stop_when_erased else None}
        made = _run_steps(run_dir)
        change = f" to {int(steps)} steps (made with {made})" if steps and str(int(steps)) != made else ""
        return self._submit("train", f"resuming {run_dir.name}{change}", work.train_job(s, run_dir, resume=True), run_dir)

    def stop(self):
        job = jobs.cancel()
        if job is None or not job.cancel.is_set():
            return "Nothing is running."
        return f"Stopping job {job.id} after the current step (a checkpoint is written; Resume continues)."

    def check(self, run_name, seeds, steps, strength=1.0):
        import gradio as gr

        try:
            run_dir = self.run_dir(run_name)
            if runs.find_lora(run_dir) is None and runs.find_guideline(run_dir) is None:
                raise ErasekitError(f"The run '{run_dir.name}' has no exported LoRA or guideline embedding yet; train it "
                                    "to the end first.")
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}", 0
        return self._submit("check", f"before/after check of {run_dir.name}",
                            work.check_job(run_dir, int(seeds or 4), int(steps or 20),
                                           strength=1.0 if strength is None else float(strength)), run_dir)

    def export(self, run_name, lora_name, description, license, destination, folder, overwrite=False):
        """Copy the run's LoRA (or guideline embedding) into the chosen folder; a file of the same
        name there is replaced only when ``overwrite`` (the step's checkbox) is ticked."""
        import gradio as gr

        try:
            run_dir = self.run_dir(run_name)
            guideline = runs.find_lora(run_dir) is None and runs.find_guideline(run_dir) is not None
            root = self.export_roots().get(destination) or self.root
            into_webui = self.webui is not None and destination == runs.WEBUI_ROOT
            if guideline and self.comfyui is not None and destination.startswith("ComfyUI"):
                root = self.comfyui / "models" / "guideline"  # where Load Guideline Embedding looks
            if guideline and into_webui:
                root = self.webui / "models" / "guideline"  # where the Detect-and-Guide section looks
            dest = jobs.safe_path(root, folder or ".", "export folder") if (folder or "").strip() not in ("", ".") \
                else root.resolve()
            name = lora_name or run_dir.name
            path = runs.export_guideline(run_dir, dest, name, bool(overwrite)) if guideline else \
                runs.export_lora(run_dir, dest, name, description or "", license or "", bool(overwrite),
                                 webui_card=into_webui)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}", ""
        renamed = _renamed(lora_name or run_dir.name, path)
        if guideline and into_webui:
            return (f"Exported **{path}** (guideline embedding for Detect-and-Guide).{renamed}\n\nIn Automatic1111: open the "
                    f"**Detect-and-Guide (Erasekit)** section of txt2img or img2img and pick `{path.name}` (a restarted "
                    "web UI lists new files)."), str(path)
        if into_webui:
            return (f"Exported **{path}** with its card `{path.with_suffix('.json').name}` (model card: "
                    f"`{path.with_suffix('.md').name}`).{renamed}\n\nIn Automatic1111 / Forge: press Refresh on the **Lora** tab "
                    f"and click the card, or add `<lora:{path.stem}:1>` to the prompt; strength 1 erases the concept."), \
                str(path)
        if guideline:
            folder = (self.comfyui / "models" / "guideline").resolve() if self.comfyui else None
            inside = folder is not None and folder in path.parents
            how = (f"In ComfyUI: **Load Guideline Embedding** (Erasekit) lists `{path.relative_to(folder) if inside else path.name}`"
                   + ("" if inside else " once the file is in ComfyUI's `models/guideline` folder")
                   + "; connect it to **Detect-and-Guide** between the checkpoint loader and the KSampler.")
            return f"Exported **{path}** (guideline embedding for Detect-and-Guide).{renamed}\n\n{how}", str(path)
        in_comfy = self.comfyui is not None and (self.comfyui / "models" / "loras").resolve() in path.parents
        how = (f"In ComfyUI: add **Load Erasure LoRA** (Erasekit) or **LoraLoader** after the checkpoint loader and pick "
               f"`{path.relative_to((self.comfyui / 'models' / 'loras').resolve()) if in_comfy else path.name}`"
               + ("" if in_comfy else " after copying the file into ComfyUI's `models/loras` folder")
               + "; strength 1.0 erases the concept.")
        return f"Exported **{path}** (model card: `{path.with_suffix('.md').name}`).{renamed}\n\n{how}", str(path)

    def save_settings(self, file_name, *values):
        from dataclasses import asdict

        import gradio as gr

        from erasekit.erase.state import write_toml

        try:
            from trainer.pool import pool_from_table

            s = dict(zip(KEYS, values))
            if "pool" in s:  # the table as rows (a list of tables), checked (Load settings reads them back)
                s["pool"] = [asdict(c) for c in pool_from_table(s["pool"])]
            path = jobs.safe_path(self.root, file_name or "settings.toml", "settings file")
            if path.suffix != ".toml":
                path = path.with_suffix(".toml")
            if path.name == "config.toml":
                raise ErasekitError("'config.toml' is the name of a run's own settings; give the file another name.")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_toml(path, {"app": {k: v for k, v in s.items() if v not in (None, "")}})
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}"
        return f"Settings saved to `{path}`."

    def load_settings(self, file_name):
        import gradio as gr

        from erasekit.erase.engine import read_config

        try:
            path = jobs.safe_path(self.root, file_name or "settings.toml", "settings file")
            tables = read_config(path)
            values = page_values(tables, path)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return [gr.skip()] * len(KEYS) + [f"**Error:** {page_words(err)}"]
        return [values.get(k, gr.skip()) if k in values else gr.skip() for k in KEYS] + [f"Settings loaded from `{path}`."]

    def load_pool_file(self, path):
        """ResAlign's pool table from a pool TOML file (a relative path: under the output root), and a
        sentence under the button; a bad file leaves the table as it is."""
        import gradio as gr

        from trainer.pool import read_pool_file

        try:
            table = read_pool_file(path, self.root)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return gr.skip(), f"**Error:** {page_words(err)}"
        n = len(table["data"])
        return table, (f"The table now holds the {n} simulated fine-tune{'s' if n != 1 else ''} of `{path}`; Start "
                       "trains with the table as it is then.")

    def job_status(self, job_id: int = 0) -> dict:
        job = jobs.get(job_id) if job_id else jobs.current()
        if job is None:
            return {"id": 0, "state": "none"}
        return {"id": job.id, "kind": job.kind, "state": job.state, "step": job.step, "total": job.total,
                "message": job.message, "run": Path(job.run_dir).name if job.run_dir else "",
                "text": job.describe(), "result": _plain(job.result)}

    def poll(self, seen, run_name):
        """The page's view of jobs and the run on screen, every second (:func:`trainer.view.poll`)."""
        from trainer import view

        return view.poll(self, seen, run_name)

    def build(self):
        from trainer.page import build_page

        return build_page(self)


def _renamed(asked: str, path: Path) -> str:
    """A sentence when the exported file's name is not the name typed (characters a file name cannot
    have were replaced); "" when it is."""
    asked = asked.strip()
    asked = asked[: -len(".safetensors")] if asked.endswith(".safetensors") else asked
    if asked == path.stem:
        return ""
    return (f" **Saved as `{path.name}`**: the name '{asked}' has characters a file name here cannot have; "
            f"look for `{path.stem}` in the LoRA list.")


def folder_architecture(base: str):
    """The architecture of a diffusers folder from its configs and its UNet's safetensors headers,
    without loading a weight (Detect runs in the page's request thread): the toy model from its
    UNet config; another model from the UNet's tensor shapes (:func:`erasekit.checkpoints.detect_architecture`),
    or its config where it has no .safetensors weights; SDXL's text widths from its encoders' configs."""
    from erasekit import checkpoints

    index = _json_file(base, "model_index.json")
    if index is None:
        raise ErasekitError(f"The folder '{base}' is not a diffusers model (no model_index.json).")
    unet = _json_file(base, os.path.join("unet", "config.json")) or {}
    width = unet.get("cross_attention_dim")
    if index.get("_class_name") == "ToyPipeline":
        if not isinstance(width, int) or isinstance(width, bool):
            raise ErasekitError(f"The toy model '{base}' has no cross_attention_dim in unet/config.json; make it again.")
        return checkpoints.toy(width)
    files = sorted(Path(base, "unet").glob("*.safetensors")) if os.path.isdir(os.path.join(base, "unet")) else []
    shapes = {}
    for f in files:
        shapes.update(checkpoints.read_header(str(f), "UNet weights file")[0])
    if shapes:
        arch = checkpoints.detect_architecture(shapes, base)
    elif isinstance(width, int) and not isinstance(width, bool):
        arch = checkpoints.sdxl() if unet.get("addition_embed_type") == "text_time" else \
            checkpoints.sd_v2(width) if unet.get("use_linear_projection") else checkpoints.sd_v1(width)
    else:
        raise ErasekitError(f"The folder '{base}' has no UNet this page can read (unet/ with a config.json and "
                            ".safetensors weights); pick a Stable Diffusion model in diffusers layout.")
    if arch.name.startswith("sdxl"):
        widths = [(_json_file(base, os.path.join(te, "config.json")) or {}).get("hidden_size")
                  for te in ("text_encoder", "text_encoder_2")]
        if all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            arch = checkpoints.sdxl(tuple(widths))
    return arch


def _json_file(base: str, name: str) -> dict | None:
    """A model folder's JSON file as a dict; None where it is missing; a sentence where it is not JSON."""
    import json

    path = os.path.join(base, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise ErasekitError(f"The file '{path}' cannot be read as JSON ({err}); the model folder is incomplete or "
                            "corrupt.") from None
    if not isinstance(value, dict):
        raise ErasekitError(f"The file '{path}' is not a JSON object; the model folder is incomplete or corrupt.")
    return value


def page_values(tables: dict, path) -> dict:
    """The page's fields from a settings file: its ``[app]`` table (what Save settings writes), else a
    run's ``[train]``, ``[<method>]`` and ``[data]``. A value of the wrong type for its field (text in a
    number, a list, "yes" for a tick box) is refused with one sentence; an ``[app]`` key that is no
    field of the page is refused too (a typo would be dropped silently)."""
    from erasekit.erase.state import shown_value

    app = tables.get("app")
    if app is not None and not isinstance(app, dict):
        raise ErasekitError(f"'app' in '{path}' must be a table ([app]), not {shown_value(app)}.")
    if app:
        unknown = sorted(set(app) - set(KEYS))
        if unknown:
            raise ErasekitError(f"Unknown setting '{unknown[0]}' in [app] of '{path}'; the page's settings are "
                                f"{', '.join(KEYS)}.")
        values, table = app, "[app]"
    else:  # a run's config.toml: [data] sample_steps is the data's sampling (the page's data_steps)
        from erasekit.erase.methods import METHODS

        def table_of(name):
            return tables.get(name) if isinstance(tables.get(name), dict) else {}

        data = table_of("data")
        values = {k: v for k, v in data.items() if k != "sample_steps"}
        for method in METHODS:  # a run has one method's table; ResAlign's beta is the page's resalign_beta
            values.update({FIELD_OF_SETTING.get((method, k), k): v for k, v in table_of(method).items()})
        values.update(table_of("train"))
        if "sample_steps" in data:
            values["data_steps"] = data["sample_steps"]
        table = "[train], " + ", ".join(f"[{m}]" for m in METHODS) + " or [data]"
    defaults = {k: d for k, _, d in FIELDS}
    for key in KEYS:
        if key == "pool" and key in values:  # rows (Save settings) or a pool file's path (a run's [resalign])
            from trainer.pool import table_of_setting

            values = {**values, "pool": table_of_setting(values["pool"], f"The setting 'pool' in {table} of '{path}'")}
        elif key in values:
            _check_page_value(key, values[key], defaults[key], table, path)
    return values


def _check_page_value(key, value, default, table, path) -> None:
    from erasekit.erase.state import shown_value

    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif key in INT_KEYS:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, int | float):
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        ok = ok and value == value and abs(value) != float("inf")
    else:
        ok, expected = isinstance(value, str), "text"
    if not ok:
        raise ErasekitError(f"The setting '{key}' in {table} of '{path}' must be {expected}, not {shown_value(value)}.")


def _plain(value):
    """A job result without arrays (what /job_status returns)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("gallery", "grid")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)

