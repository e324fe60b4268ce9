"""Background jobs of the trainer app: one at a time, in a queue, cancellable, visible after a reload.

The Gradio page (:mod:`trainer.app`) never trains itself: it submits a job here and polls
:func:`current`. A job is a function ``fn(job)`` run on one worker thread; it reports with
``job.log(...)`` / ``job.set_progress(...)`` and stops between two steps when ``job.cancel`` (a
``threading.Event``) is set. Jobs live in a module-level registry, so a browser reload (a new
session) sees the running job, its progress and its log.

The work itself is the engine's, through the same functions the CLI uses
(:func:`trainer.__main__.run_training`), plus data generation, the before/after check and the
export: :func:`data_job`, :func:`train_job`, :func:`check_job`, :func:`export_lora`.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from erasekit.errors import ErasekitError

_ids = itertools.count(1)
_lock = threading.Lock()
JOBS: dict[int, Job] = {}  # every job of this process, by id
_queue: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None


@dataclass
class Job:
    kind: str  # "data" | "train" | "check"
    title: str
    fn: object
    run_dir: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | done | cancelled | error
    step: int = 0
    total: int = 0
    message: str = ""  # one sentence: the error, or how it ended
    lines: list = field(default_factory=list)
    result: object = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    finished: float = 0.0
    version: int = 0  # bumped on every change, so the page re-renders only what changed

    def log(self, text: str) -> None:
        self.lines.append(f"[{time.strftime('%H:%M:%S')}] {text}")
        del self.lines[:-300]
        self.version += 1

    def set_progress(self, step: int, total: int, text: str | None = None) -> None:
        self.step, self.total = step, total
        if text:
            self.log(text)
        self.version += 1

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def describe(self) -> str:
        """One line a person reads: what, how far, how it ended."""
        what = f"{self.title} (job {self.id})"
        if self.state == "queued":
            return f"Waiting: {what}."
        if self.state == "running":
            pct = f" step {self.step}/{self.total}" if self.total else ""
            return f"Running: {what}{pct}, {time.time() - self.started:.0f} s."
        if self.state == "error":
            return f"Error in {what}: {self.message}"
        return f"{self.state.capitalize()}: {what}" + (f": {self.message}" if self.message else ".")


def submit(kind: str, title: str, fn, run_dir: str = "") -> Job:
    """Queue ``fn(job)``; jobs run one at a time, in order."""
    global _worker
    job = Job(kind, title, fn, str(run_dir))
    with _lock:
        JOBS[job.id] = job
        _queue.put(job)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="erasekit-trainer-jobs", daemon=True)
            _worker.start()
    return job


def _work() -> None:
    while True:
        job = _queue.get()
        if job.cancel.is_set():
            job.state, job.message = "cancelled", "stopped before it started"
            job.version += 1
            continue
        job.state, job.started = "running", time.time()
        job.version += 1
        try:
            job.result = job.fn(job)
            if job.state == "running":
                job.state = "cancelled" if job.cancel.is_set() else "done"
        except ErasekitError as err:
            job.state, job.message = "error", str(err)
            job.log(f"error: {err}")
        except Exception as err:  # noqa: BLE001 - shown as one sentence, the trace goes to the log
            job.state, job.message = "error", one_sentence(err)
            job.log(traceback.format_exc())
        finally:
            job.finished = time.time()
            job.version += 1


def one_sentence(err: BaseException) -> str:
    """A sentence for an unexpected error (out of memory gets its own advice)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return ("The device ran out of memory; lower the batch size or rank, turn on gradient checkpointing "
                "or mixed precision, and try again.")
    return f"Unexpected {type(err).__name__}: {text} (details in the log)."


def current() -> Job | None:
    """The running job, else the one waiting longest, else the last one that ran."""
    with _lock:
        jobs = list(JOBS.values())
    for state in ("running", "queued"):
        found = [j for j in jobs if j.state == state]
        if found:
            return min(found, key=lambda j: j.id)
    return max(jobs, key=lambda j: j.id) if jobs else None


def latest(kind: str) -> Job | None:
    with _lock:
        found = [j for j in JOBS.values() if j.kind == kind]
    return max(found, key=lambda j: j.id) if found else None


def get(job_id: int) -> Job | None:
    return JOBS.get(int(job_id))


def cancel(job_id: int | None = None) -> Job | None:
    """Ask a job (default: the current one) to stop after its current step."""
    job = get(job_id) if job_id else current()
    if job is not None and job.active:
        job.cancel.set()
        job.log("stop requested: stopping after the current step")
    return job


def busy_with(run_dir) -> Job | None:
    """The active job writing into ``run_dir``, if any."""
    target = os.path.realpath(run_dir)
    with _lock:
        jobs = list(JOBS.values())
    return next((j for j in jobs if j.active and j.run_dir and os.path.realpath(j.run_dir) == target), None)


def wait(job: Job, timeout: float = 600) -> Job:
    end = time.time() + timeout
    while job.active and time.time() < end:
        time.sleep(0.05)
    return job


# ----------------------------------------------------------------------------- safe paths


def safe_path(root, user: str, what: str = "output folder") -> Path:
    """``user`` resolved inside ``root``; ``..`` and any path outside ``root`` are refused with a sentence."""
    root = Path(root).resolve()
    text = (user or "").strip()
    if not text:
        raise ErasekitError(f"The {what} is empty; give a name such as 'red-circle'.")
    if ".." in Path(text).parts or "\x00" in text:
        raise ErasekitError(f"The {what} '{text}' contains '..'; give a folder inside '{root}'.")
    path = (Path(text) if os.path.isabs(text) else root / text).resolve()
    if path != root and root not in path.parents:
        raise ErasekitError(f"The {what} '{text}' is outside '{root}'; every file is written under that folder.")
    return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-") or "concept"


# ----------------------------------------------------------------------------- the work


def train_argv(s: dict, out: str, resume: bool = False, config: str | None = None) -> list:
    """The CLI's argument list for the app's settings ``s`` (so both resolve settings identically)."""
    argv = ["train", "--method", s.get("method") or "inpo", "--out", str(out)]
    if s.get("target"):
        argv += ["--target", s["target"]]
    if s.get("base"):
        argv += ["--base", str(s["base"])]
    if s.get("preset"):
        argv += ["--preset", s["preset"]]
    if config:
        argv += ["--config", str(config)]
    if resume:
        argv.append("--resume")
    flags = ("steps", "lr", "rank", "alpha", "batch_size", "grad_accum", "seed", "eta", "gamma", "tau", "lambda_prior",
             "forget_images", "images_per_concept", "neighbours", "unrelated", "checkpoint_every", "sample_every",
             "optimizer", "mixed_precision", "targets", "name", "threads", "forget_dir")
    for key in flags:
        value = s.get(key)
        if value is None or value == "":
            continue
        if key in ("steps", "rank", "batch_size", "grad_accum", "seed", "forget_images", "images_per_concept",
                   "neighbours", "unrelated", "checkpoint_every", "sample_every", "threads"):
            value = int(value)
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for key in ("gradient_checkpointing", "cpu"):
        if s.get(key):
            argv.append(f"--{key.replace('_', '-')}")
    return argv


def write_extra_config(run_dir: Path, s: dict) -> str | None:
    """Settings with no CLI flag (preview and data sampling, the preserve list) as a --config TOML."""
    from erasekit.erase.engine import write_config

    train = {k: s[k] for k in ("sample_steps",) if s.get(k)}
    data = {}
    if s.get("data_steps"):
        data["sample_steps"] = int(s["data_steps"])
    if s.get("preserve_prompts"):
        data["preserve_prompts"] = list(s["preserve_prompts"])
    if s.get("sample_prompts"):
        train["sample_prompts"] = list(s["sample_prompts"])
    if not (train or data):
        return None
    folder = run_dir / "app"
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, {"train": train, "data": data})
    return str(folder / "config.toml")


def data_job(settings: dict, run_dir: Path):
    """Generate (or load) the forget / preserve sets of a run; the result is a gallery."""

    def fn(job: Job):
        from trainer.__main__ import build_parser, prepare

        run_dir.mkdir(parents=True, exist_ok=True)
        args = build_parser().parse_args(train_argv(settings, run_dir, config=write_extra_config(run_dir, settings)))
        job.log(f"loading the base model {args.base or 'models/toy'}")
        prep = prepare(args, log=job.log, with_data=False, check_fresh=False)
        data_config = prep["data_config"]
        job.set_progress(0, 1, f"generating the forget and preserve sets of '{prep['target']}'")
        from erasekit.erase.data import build_erase_data

        data = build_erase_data(prep["components"], prep["target"], data_config, log=job.log)
        job.set_progress(1, 1)
        return {"gallery": data_gallery(prep["components"], data), "summary":
                f"{len(data.forget)} forget images of '{data.target}' and {len(data.preserve or ())} preserve images "
                f"of {len(data.preserved)} concepts ({', '.join(data.preserved)})."}

    return fn


def data_gallery(components, data, limit: int = 24) -> list:
    """(image uint8 [H, W, 3], caption) pairs: forget images with the mask overlaid in red, then preserve images."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def decode(latents):
        vae = components.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
        return ((x.float().cpu() + 1) / 2).clamp(0, 1)

    out = []
    n = min(len(data.forget), limit // 2 or 1)
    images = decode(data.forget.latents[:n])
    masks = data.forget.masks[:n] if data.forget.masks is not None else torch.ones(n, 1, 1, 1)
    masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="nearest")
    red = torch.tensor([1.0, 0.1, 0.1])[None, :, None, None]
    shown = images * (1 - 0.45 * masks) + red * 0.45 * masks
    for img, prompt in zip(shown, data.forget.prompts[:n]):
        out.append(((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), f"forget: {prompt} (mask in red)"))
    if data.preserve is not None and len(data.preserve):
        m = min(len(data.preserve), limit - len(out))
        for img, prompt in zip(decode(data.preserve.latents[:m]), data.preserve.prompts[:m]):
            out.append(((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), f"preserve: {prompt}"))
    return out


def train_job(settings: dict, run_dir: Path, resume: bool = False):
    def fn(job: Job):
        from trainer.__main__ import build_parser, run_training

        run_dir.mkdir(parents=True, exist_ok=True)
        extra = None if resume else write_extra_config(run_dir, settings)
        argv = train_argv({} if resume else settings, run_dir, resume=resume, config=extra)
        if resume and settings.get("steps"):
            argv += ["--steps", str(int(settings["steps"]))]
        if resume and settings.get("threads"):
            argv += ["--threads", str(int(settings["threads"]))]
        args = build_parser().parse_args(argv)
        job.log("python -m trainer " + " ".join(a if " " not in a else repr(a) for a in argv))

        def progress(step, total, terms):
            job.set_progress(step, total)
            if step == 1 or step == total or step % max(1, total // 20) == 0:
                job.log(f"step {step}/{total}: " + ", ".join(f"{k} {terms[k]:.4f}" for k in ("loss", "inpo", "prior", "delta_s")
                                                            if k in terms))

        result = run_training(args, progress=progress, cancel=job.cancel, log=job.log)
        if result.status == "cancelled":
            job.state, job.message = "cancelled", f"stopped at step {result.step}; Resume continues from the checkpoint"
        else:
            job.message = f"the erasure LoRA is {result.lora}" if result.lora else f"done at step {result.step}"
        job.log(job.message)
        return {"lora": str(result.lora) if result.lora else None, "step": result.step, "status": result.status}

    return fn


def check_job(run_dir: Path, seeds: int = 4, steps: int = 20, cfg: float = 3.0):
    """Before / after images (same seeds) on target, neighbour and unrelated prompts, judged on the toy model."""

    def fn(job: Job):
        import copy

        import numpy as np

        from erasekit import lora_io, models
        from erasekit.dag.sampling import sample
        from erasekit.erase.engine import read_config

        lora_path = find_lora(run_dir)
        if lora_path is None:
            raise ErasekitError(f"The run '{run_dir.name}' has no exported LoRA yet; train it to the end first.")
        cfg_file = read_config(run_dir / "config.toml")
        train = cfg_file.get("train", {})
        target, base = train.get("target", ""), train.get("base", "")
        job.log(f"loading {base} and {lora_path.name}")
        comps = models.load(base)
        toy = comps.architecture is not None and comps.architecture.name == "toy"
        prompts = check_prompts(target, toy)
        lora, _ = lora_io.load_lora(str(lora_path))
        seed_list = list(range(int(seeds)))
        flat_p = [p for _, p, _ in prompts for _ in seed_list]
        flat_s = seed_list * len(prompts)
        job.set_progress(0, 2, f"sampling {len(flat_p)} images with the base model")
        before = sample(comps, flat_p, flat_s, steps=int(steps), cfg=cfg).images
        if job.cancel.is_set():
            return None
        after_unet = copy.deepcopy(comps.unet)
        lora_io.apply_lora(after_unet, lora)
        if comps.text_encoder is not None and any(k.startswith("text_encoder.") for k in lora):
            te = copy.deepcopy(comps.text_encoder)
            lora_io.apply_lora(te, lora, component="text_encoder")
            comps.text_encoders = [te] + comps.text_encoders[1:]
        comps.unet = after_unet
        job.set_progress(1, 2, "sampling the same seeds with the LoRA applied")
        after = sample(comps, flat_p, flat_s, steps=int(steps), cfg=cfg).images
        job.set_progress(2, 2)
        rows = []
        if toy:
            from erasekit.toyworld.judge import judge
            from erasekit.toyworld.vocab import parse_concept

            n = len(seed_list)
            for i, (role, prompt, concept) in enumerate(prompts):
                c = parse_concept(concept)
                count = [sum(c.matches(judge(imgs[i * n + j].permute(1, 2, 0).numpy())) for j in range(n))
                         for imgs in (before, after)]
                rows.append([role, prompt, concept, f"{count[0]}/{n}", f"{count[1]}/{n}"])
        else:
            rows = [[role, prompt, concept, "-", "-"] for role, prompt, concept in prompts]
        grid = check_grid(before, after, len(prompts), len(seed_list))
        return {"grid": (grid * 255).round().astype(np.uint8), "rows": rows, "lora": str(lora_path)}

    return fn


def check_prompts(target: str, toy: bool) -> list:
    """[(role, prompt, concept judged)] for the check: the target, a neighbour and an unrelated concept."""
    if not toy:
        return [("target", target, target), ("unrelated", "a landscape", "a landscape")]
    from erasekit.erase.data import preserve_concepts, resolve_concept

    concept = resolve_concept(target)
    near, far = preserve_concepts(concept, 1, 1)

    def prompt(c):
        return c.text if c.kind == "character" else (f"a red circle on a {c.text}" if c.kind == "style" and c.style != "plain"
                                                     else f"a {c.text}")

    target_prompt = prompt(concept) if concept.kind != "style" else f"a blue square on a {concept.text}"
    return [("target", target_prompt, concept.text), ("neighbour", prompt(near), near.text),
            ("unrelated", prompt(far), far.text)]


def check_grid(before, after, rows: int, cols: int):
    """[rows * cols, 3, H, W] x 2 -> one image: before on the left, after on the right, a gap between."""
    import torch

    _, c, h, w = before.shape
    gap = max(4, w // 8)

    def panel(images):
        return images.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)

    white = torch.ones(rows * h, gap, c)
    return torch.cat([panel(before), white, panel(after)], dim=1).numpy()


def find_lora(run_dir: Path) -> Path | None:
    """The run's exported LoRA (the newest .safetensors beside config.toml, the data cache aside)."""
    files = [p for p in Path(run_dir).glob("*.safetensors") if p.name != "data.safetensors"]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def architecture_from_lora(lora: dict, meta: dict):
    """The base-model family of a LoRA file (for re-saving it), from its metadata and a layer's width."""
    from erasekit import checkpoints

    name = meta.get("ss_base_model_version", "")
    widths = [int(w.down.shape[1]) for k, w in lora.items() if k.startswith("unet.") and k.endswith("attn2.to_k")]
    width = widths[0] if widths else None
    if name == "toy":
        return checkpoints.toy(width or 64)
    if name == "sd_v2":
        return checkpoints.sd_v2(width or 1024)
    if name.startswith("sdxl"):
        return checkpoints.sdxl()
    return checkpoints.sd_v1(width or 768)


def export_lora(run_dir: Path, dest_dir: Path, name: str, description: str = "", license: str = "") -> Path:
    """Copy the run's LoRA to ``dest_dir/<name>.safetensors`` with the user's title, description and
    license in its metadata and model card (``<name>.md`` beside it)."""
    import json

    from erasekit import lora_io

    src = find_lora(run_dir)
    if src is None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no exported LoRA yet; train it to the end first.")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip("-.")
    if not clean:
        raise ErasekitError("The LoRA name is empty; give a file name such as 'erase-red-circle'.")
    clean = clean[: -len(".safetensors")] if clean.endswith(".safetensors") else clean
    lora, meta = lora_io.load_lora(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads(meta.get("erasekit.config", "{}"))
        preserved = json.loads(meta.get("erasekit.preserved", "[]"))
    except ValueError:
        config, preserved = {}, []
    return Path(lora_io.save_lora(
        lora, str(dest_dir / f"{clean}.safetensors"), architecture_from_lora(lora, meta),
        erased_concept=meta.get("erasekit.erased_concept", ""), method=meta.get("erasekit.method", ""),
        preserved=preserved, config=config, title=clean, description=description.strip() or None,
        license=license.strip() or None, base_model=meta.get("ss_sd_model_name", "")))


# ----------------------------------------------------------------------------- runs


def list_runs(root) -> list:
    """[name, target, steps done / total, status, LoRA] for every run folder under ``root``."""
    import json

    from erasekit.erase.engine import latest_checkpoint, read_config

    rows = []
    root = Path(root)
    if not root.is_dir():
        return rows
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg_path = d / "config.toml"
        has_data = (d / "data.safetensors").is_file()
        if not cfg_path.is_file() and not has_data:
            continue
        try:
            train = read_config(cfg_path).get("train", {}) if cfg_path.is_file() else {}
        except ErasekitError:
            train = {}
        done = 0
        metrics = d / "metrics.jsonl"
        if metrics.is_file():
            lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if lines:
                try:
                    done = json.loads(lines[-1]).get("step", 0)
                except ValueError:
                    done = len(lines)
        lora = find_lora(d)
        job = busy_with(d)
        errors = [j for j in JOBS.values() if j.run_dir and os.path.realpath(j.run_dir) == os.path.realpath(d)]
        last = max(errors, key=lambda j: j.id) if errors else None
        if job is not None:
            status = f"{job.state} ({job.kind})"
        elif last is not None and last.state == "error":
            status = "error: " + last.message
        elif lora is not None:
            status = "done"
        elif latest_checkpoint(d) is not None:
            status = f"stopped at step {done} (resumable)"
        elif has_data and not metrics.is_file():
            status = "data ready"
        else:
            status = "not started"
        rows.append([d.name, train.get("target", ""), f"{done}/{train.get('steps', '?')}", status,
                     lora.name if lora else ""])
    return rows


def read_metrics(run_dir) -> list:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def latest_preview(run_dir) -> Path | None:
    files = sorted((Path(run_dir) / "samples").glob("step-*.png"))
    return files[-1] if files else None
