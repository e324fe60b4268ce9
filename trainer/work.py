"""The trainer app's jobs: what each button starts, as ``fn(job)`` for :func:`trainer.jobs.submit`.

Each goes through the CLI's own functions (:func:`trainer.__main__.prepare`, ``run_training``,
``run_guideline``) with the page's settings turned into CLI arguments (:func:`train_argv`), so
the page and ``python -m trainer`` resolve a run identically.

* :func:`data_job`: the chosen method's data (INPO's forget and preserve sets, as a gallery with the
  masks overlaid; NCD's tuples), through the method registry;
* :func:`train_job`: an erasure LoRA (INPO, NCD, ResAlign), resumable;
* :func:`guideline_job`: DAG guideline tokens (a guideline embedding for Detect-and-Guide);
* :func:`check_job`: the same seeds before / after (the LoRA, or Detect-and-Guide with the
  embedding), judged on the toy model.
"""

from __future__ import annotations

import json
from pathlib import Path

from erasekit.errors import ErasekitError
from trainer.jobs import Job
from trainer.runner import writing_run
from trainer.runs import (
    find_guideline,
    find_lora,
    guideline_path,
    save_image,
    write_check_rows,
    write_gallery,
    write_review_images,
)


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
    from trainer.fields import FLAG_OF, METHOD_FIELDS

    method = s.get("method") or "inpo"
    own = METHOD_FIELDS.get(method, ())
    flags = ("steps", "lr", "rank", "alpha", "batch_size", "grad_accum", "seed", "eta", "gamma", "tau", "lambda_prior",
             "forget_images", "images_per_concept", "neighbours", "unrelated", "checkpoint_every", "sample_every",
             "optimizer", "mixed_precision", "targets", "name", "threads", "forget_dir", "mask_from", "guideline",
             "beta", "lambda_pair", "pair_reduce", "harm_weights", "img2img_strength", "anchor",
             "resalign_beta", "iterations", "configs", "pool", "init_lora", "harm_loss")
    for key in flags:
        value = s.get(key)
        if value is None or value == "" or (any(key in f for f in METHOD_FIELDS.values()) and key not in own):
            continue  # another method's setting
        if key == "harm_loss" and value == "preset":
            continue  # the preset's harm loss
        if key in ("steps", "rank", "batch_size", "grad_accum", "seed", "forget_images", "images_per_concept",
                   "neighbours", "unrelated", "checkpoint_every", "sample_every", "threads", "iterations", "configs"):
            value = int(value)
        argv += [f"--{FLAG_OF.get(key, key).replace('_', '-')}", str(value)]
    for key in ("gradient_checkpointing", "cpu") + (("nca",) if "nca" in own else ()):
        if s.get(key):
            argv.append(f"--{key.replace('_', '-')}")
    stop = s.get("stop_when_erased")  # unticked is sent too: off, even where the preset has it on
    if stop or (stop is False and not resume):
        argv.append("--stop-when-erased" if stop else "--no-stop-when-erased")
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
    """Generate (or load) the forget / preserve sets of a run, with the run folder locked; the result
    is the gallery's files (``<run>/gallery/``) and a summary: a finished job keeps no image."""

    def fn(job: Job):
        with writing_run(run_dir, "data", job.log):
            return make_data(job, settings, run_dir)

    return fn


def data_method(settings: dict) -> str:
    """The method whose data the data step makes: the one chosen, or INPO's sets for the guideline
    tokens (they draw their own images when trained)."""
    from erasekit.erase.methods import METHODS

    method = settings.get("method") or "inpo"
    return method if method in METHODS else "inpo"


def prepare_data(job: Job, settings: dict, run_dir: Path, check_fresh: bool = False):
    """``(args, prep)``: the CLI's arguments for the settings and :func:`trainer.runner.prepare`'s
    model, target and configs (the model loaded once, for the data and a training after it)."""
    from trainer.arguments import build_parser
    from trainer.runner import prepare

    argv = train_argv({**settings, "method": data_method(settings)}, run_dir, config=write_extra_config(run_dir, settings))
    args = build_parser().parse_args(argv)
    job.log(f"loading the base model {args.base or 'models/toy'}")
    return args, prepare(args, log=job.log, with_data=False, check_fresh=check_fresh)


def make_data(job: Job, settings: dict, run_dir: Path, prep: dict | None = None) -> dict:
    """The data step's work (the run folder locked by the caller): the chosen method's data
    (:meth:`erasekit.erase.methods.Method.build_data`: INPO's forget and preserve sets, NCD's tuples),
    with images done / total as they are drawn, the review images (forget images with masks) and the
    gallery with its summary. ``prep``: the prepared run (:func:`prepare_data`), else made here."""
    from erasekit.erase.methods import get

    method = get(data_method(settings))
    if prep is None:
        _, prep = prepare_data(job, settings, run_dir)
    job.log(f"generating {method.name.upper()}'s data for '{prep['target']}'")
    data = method.build_data(prep["components"], prep["target"], prep["data_config"], log=job.log,
                             progress=lambda done, total: job.set_progress(done, total, unit="images"),
                             method_config=prep["method_config"])
    if hasattr(data, "forget"):  # forget / preserve sets (INPO, ResAlign)
        forget = decode_latents(prep["components"], data.forget.latents)  # once: for the review and the gallery
        write_review_images(run_dir, [_uint8(img) for img in forget], data.key)
        summary = (f"{len(data.forget)} forget images of '{data.target}' and {len(data.preserve or ())} preserve "
                   f"images of {len(data.preserved)} concepts ({', '.join(data.preserved)}).")
        items = data_gallery(prep["components"], data, forget)
    else:  # NCD's tuples: no masks to review
        summary = (f"{len(data)} tuples of '{data.target}' (a safe picture and {data.latents.shape[1] - 1} of the "
                   f"concept each) and {len(data.preserve or ())} preserve images of {len(data.preserved)} concepts"
                   f"{' (' + ', '.join(data.preserved) + ')' if data.preserved else ''}.")
        items = tuple_gallery(prep["components"], data)
    gallery = write_gallery(run_dir, items, summary)
    return {"gallery": gallery, "summary": summary}


def decode_latents(components, latents, chunk: int = 16):
    """Images ``[N, 3, H, W]`` in [0, 1] (CPU) from latents, through the model's VAE, a chunk at a time."""
    import torch

    vae = components.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    with torch.no_grad():
        for s in range(0, len(latents), chunk):
            x = vae.decode(latents[s : s + chunk].to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
            out.append(((x.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)


def _uint8(img):
    """``[3, H, W]`` in [0, 1] -> uint8 ``[H, W, 3]``."""
    return (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")


def data_gallery(components, data, forget_images, limit: int = 24) -> list:
    """(image uint8 [H, W, 3], caption) pairs: forget images (decoded already, ``[N, 3, H, W]``)
    with the mask outlined, then preserve images."""
    import torch
    import torch.nn.functional as F

    out = []
    n = min(len(data.forget), limit // 2 or 1)
    images = forget_images[:n]
    masks = data.forget.masks[:n] if data.forget.masks is not None else torch.ones(n, 1, 1, 1)
    masks = F.interpolate(masks.float(), size=images.shape[-2:], mode="nearest")
    for img, prompt in zip(outline_masks(images, masks), data.forget.prompts[:n]):
        out.append((_uint8(img), f"forget: {prompt} (mask outlined)"))
    if data.preserve is not None and len(data.preserve):
        m = min(len(data.preserve), limit - len(out))
        for img, prompt in zip(decode_latents(components, data.preserve.latents[:m]), data.preserve.prompts[:m]):
            out.append((_uint8(img), f"preserve: {prompt}"))
    return out


def tuple_gallery(components, data, limit: int = 24) -> list:
    """(image uint8 [H, W, 3], caption) pairs of NCD's tuples (:class:`erasekit.erase.ncd_data.NcdData`):
    each tuple's safe picture, then its pictures of the concept, then preserve images."""
    k = data.latents.shape[1]
    n = min(len(data), max(1, limit // (2 * k)))
    images = decode_latents(components, data.latents[:n].flatten(0, 1))
    out = []
    for i in range(n):
        out.append((_uint8(images[i * k]), f"safe: {data.safe_prompts[i]}"))
        out += [(_uint8(images[i * k + j]), f"concept {j}/{k - 1}: {data.prompts[i]}") for j in range(1, k)]
    if data.preserve is not None and len(data.preserve):
        m = min(len(data.preserve), limit - len(out))
        for img, prompt in zip(decode_latents(components, data.preserve.latents[:m]), data.preserve.prompts[:m]):
            out.append((_uint8(img), f"preserve: {prompt}"))
    return out


def outline_masks(images, masks):
    """``images`` [N, 3, H, W] with each mask's edge drawn: white just inside it, black just outside,
    so it shows on any colour of concept (a red tint vanished on a red circle). Inside stays as drawn;
    outside is dimmed a little so the masked part stands out. A whole-image mask gets its frame."""
    import torch
    import torch.nn.functional as F

    m = (masks[:, :1] >= 0.5).float()
    w = max(1, images.shape[-1] // 64)  # the line's width: visible in a gallery thumbnail
    padded = F.pad(m, (w, w, w, w), value=0.0)  # the image's border counts as outside
    eroded = 1 - F.max_pool2d(1 - padded, 2 * w + 1, 1, 0)
    dilated = F.max_pool2d(m, 2 * w + 1, 1, w)
    inner, outer = m - eroded, dilated - m
    shown = images * (m + (1 - m) * 0.6)
    shown = shown * (1 - inner) + inner  # white
    return shown * (1 - outer) + torch.zeros_like(shown) * outer  # black


# the terms a training's log line shows, where the method logs them: INPO's, NCD's (its implicit accuracy and
# sigma(r_0)), ResAlign's per outer step (harm before / after the simulated fine-tune, the hypergradient's norm,
# the divergence guard's count)
LOGGED = ("loss", "inpo", "mod", "pair", "prior", "delta_s", "implicit_acc", "sigma_r0", "harm", "harm_star",
          "hyper_norm", "guard")


COUNTS = ("guard",)  # logged as floats (the engine averages over accumulation), shown as counts


def _figure(key: str, value) -> str:
    return f"{float(value):g}" if key in COUNTS else f"{float(value):.4f}"


def with_pool_file(settings: dict, run_dir: Path) -> dict:
    """The settings with ResAlign's pool table (``pool_rows``, checked by Start) written as the run's
    ``pool.toml`` (:func:`erasekit.erase.resalign.write_pool`) and that file as the ``pool`` setting."""
    if settings.get("method") != "resalign" or settings.get("pool_rows") is None:
        return settings
    from erasekit.erase.resalign import pool_rows, write_pool

    path = run_dir / "pool.toml"
    write_pool(path, pool_rows(settings["pool_rows"], "The ResAlign pool table"))
    return {**settings, "pool": str(path)}


def train_job(settings: dict, run_dir: Path, resume: bool = False):
    """INPO on the run (resumed from its last checkpoint with ``resume``), with the run folder locked
    from the first file written on (its settings in ``<run>/app/config.toml``)."""

    def fn(job: Job):
        with writing_run(run_dir, "training", job.log):
            return _train(job)

    def _train(job: Job):
        from trainer.arguments import build_parser
        from trainer.runner import run_training

        prep = None
        if resume:
            argv = train_argv({}, run_dir, resume=True)
            if settings.get("steps"):
                argv += ["--steps", str(int(settings["steps"]))]
            if settings.get("threads"):
                argv += ["--threads", str(int(settings["threads"]))]
            if settings.get("stop_when_erased") is not None:
                argv.append("--stop-when-erased" if settings["stop_when_erased"] else "--no-stop-when-erased")
            args = build_parser().parse_args(argv)
        else:
            # the data step's own work first, on the model loaded for the training: the page counts the
            # images as they are drawn and shows them in step 3 (data already made for these settings, by
            # Generate data or the CLI, is read from the run's cache); the training then reads the same data
            # ResAlign's pool table as the run's pool.toml first: prepare reads the method's settings, pool too
            run_settings = with_pool_file(settings, run_dir)
            args, prep = prepare_data(job, run_settings, run_dir, check_fresh=True)
            make_data(job, run_settings, run_dir, prep)
            argv = train_argv(run_settings, run_dir, config=write_extra_config(run_dir, run_settings))
        job.log("python -m trainer " + " ".join(a if " " not in a else repr(a) for a in argv))

        def progress(step, total, terms):
            job.set_progress(step, total)
            if step == 1 or step == total or step % max(1, total // 20) == 0:
                job.log(f"step {step}/{total}: " + ", ".join(f"{k} {_figure(k, terms[k])}" for k in LOGGED if k in terms))

        result = run_training(args, progress=progress, cancel=job.cancel, log=job.log, prep=prep)
        if result.status == "cancelled":
            job.state, job.message = "cancelled", f"stopped at step {result.step}; Resume continues from the checkpoint"
        else:
            job.message = f"the erasure LoRA is {result.lora}" if result.lora else f"done at step {result.step}"
            if result.erased_at is not None:
                job.message += f" (the concept counted as erased at step {result.erased_at}; training stopped there)"
        job.log(job.message)
        return {"lora": str(result.lora) if result.lora else None, "step": result.step, "status": result.status}

    return fn


def guideline_argv(s: dict, out: Path) -> list:
    """The CLI's ``guideline`` arguments for the app's settings: the forget-images field is the
    number of images of the concept; the safe set is the CLI's default (``--safe-images``)."""
    argv = ["guideline", "--target", s["target"], "--out", str(out)]
    for flag, key in (("--base", "base"), ("--steps", "steps"), ("--seed", "seed"), ("--threads", "threads"),
                      ("--forget-dir", "forget_dir"), ("--images", "forget_images")):
        if s.get(key) not in (None, ""):
            argv += [flag, str(s[key])]
    return argv


def guideline_job(settings: dict, run_dir: Path):
    """DAG guideline tokens for the run's concept (Sec. 3.1): the embedding Detect-and-Guide detects with.
    The loss goes to ``metrics.jsonl`` (the page's plot) and the settings to ``config.toml``."""

    def fn(job: Job):
        with writing_run(run_dir, "guideline tokens", job.log):
            return _guideline(job)

    def _guideline(job: Job):
        from erasekit.erase.engine import write_config
        from trainer.arguments import build_parser
        from trainer.runner import run_guideline

        out = guideline_path(run_dir, settings["target"])
        argv = guideline_argv(settings, out)
        args = build_parser().parse_args(argv)
        job.log("python -m trainer " + " ".join(a if " " not in a else repr(a) for a in argv))
        metrics = run_dir / "metrics.jsonl"
        metrics.write_text("", encoding="utf-8")
        total_steps = args.steps or 100 * args.images
        write_config(run_dir, {"train": {"method": "guideline", "target": settings["target"],
                                         "base": str(args.base or settings.get("base") or ""), "steps": total_steps,
                                         "seed": args.seed}})
        lines = []

        def progress(step, total, loss):
            lines.append(json.dumps({"step": step + 1, "loss": loss}))
            job.set_progress(step + 1, total)
            if step + 1 == total or (step + 1) % 20 == 0:
                with metrics.open("a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
                lines.clear()
            if step == 0 or step + 1 == total or (step + 1) % max(1, total // 10) == 0:
                job.log(f"step {step + 1}/{total}: pixel BCE {loss:.4f}")

        emb, path = run_guideline(args, progress=progress, log=job.log)
        job.message = (f"the guideline embedding is {path} (detection gate {emb.gate:.3f}); Check shows Detect-and-Guide "
                       "with it, Export copies it where ComfyUI's Load Guideline Embedding finds it")
        job.log(job.message)
        return {"guideline": str(path), "gate": emb.gate}

    return fn


def check_job(run_dir: Path, seeds: int = 4, steps: int = 20, cfg: float = 3.0, strength: float = 1.0):
    """Before / after images (same seeds) on target, neighbour and unrelated prompts, judged on the
    toy model; the grid is written to ``<run>/check.png``. After = with the run's erasure LoRA at ``strength`` (a LoRA loader's weight), or (a
    guideline run) with Detect-and-Guide at ``strength`` using the run's guideline embedding and the
    concept as the safety text."""

    def fn(job: Job):
        import numpy as np

        from erasekit import models
        from erasekit.dag.sampling import sample
        from erasekit.erase.engine import read_config

        train = read_config(run_dir / "config.toml").get("train", {}) if (run_dir / "config.toml").is_file() else {}
        guideline = train.get("method") == "guideline"
        made = find_guideline(run_dir) if guideline else find_lora(run_dir)
        if made is None:
            raise ErasekitError(f"The run '{run_dir.name}' has no {'guideline embedding' if guideline else 'exported LoRA'} "
                                "yet; train it to the end first.")
        target, base = train.get("target", ""), train.get("base", "")
        job.log(f"loading {base} and {made.name}")
        comps = models.load(base)
        toy = comps.is_toy
        prompts = check_prompts(target, toy)
        seed_list = list(range(int(seeds)))
        flat_p = [p for _, p, _ in prompts for _ in seed_list]
        flat_s = seed_list * len(prompts)
        n = len(flat_p)

        def on_step(offset):  # the two passes as one count of images (a pass's images move together)
            return lambda done, total: job.set_progress(offset + n * done / total, 2 * n, unit="images")

        job.log(f"sampling {n} images with the base model")
        before = sample(comps, flat_p, flat_s, steps=int(steps), cfg=cfg, on_step=on_step(0)).images
        if job.cancel.is_set():
            return None
        if guideline:
            from erasekit.dag.guidance import DagSettings
            from erasekit.dag.guideline import GuidelineEmbedding

            emb = GuidelineEmbedding.load(str(made), comps.architecture)
            job.log("sampling the same seeds with Detect-and-Guide")
            after = sample(comps, flat_p, flat_s, steps=int(steps), cfg=cfg, mode="dag", embeddings=[emb],
                           safety_text=target, dag=DagSettings(strength=float(strength)), on_step=on_step(n)).images
        else:
            _apply_lora(comps, made, float(strength))
            job.log(f"sampling the same seeds with the LoRA applied at strength {float(strength):g}")
            after = sample(comps, flat_p, flat_s, steps=int(steps), cfg=cfg, on_step=on_step(n)).images
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
        path = save_image(run_dir / "check.png", (grid * 255).round().astype(np.uint8))
        write_check_rows(run_dir, rows)  # a reloaded page shows the run's last check from its folder
        report = None
        if toy:  # the same images as the evaluation harness's page (erasekit.eval), counted its way
            from .check_report import write_check_report

            report = write_check_report(run_dir, prompts, seed_list, before, after, target=target, model=base,
                                        made=made, strength=float(strength), guideline=guideline,
                                        sampler=f"{type(comps.scheduler).__name__}, {int(steps)} steps, cfg {cfg:g}")
            job.log(f"report: {report}")
        return {"grid": str(path), "rows": rows, "file": str(made), "report": str(report) if report else None}

    return fn


def _apply_lora(comps, path: Path, strength: float = 1.0) -> None:
    """Put a LoRA file, at ``strength``, into copies of the UNet (and text encoder) of ``comps``."""
    import copy

    from erasekit import lora_io

    lora, _ = lora_io.load_lora(str(path))
    unet = copy.deepcopy(comps.unet)
    lora_io.apply_lora(unet, lora, strength)
    if comps.text_encoder is not None and any(k.startswith("text_encoder.") for k in lora):
        te = copy.deepcopy(comps.text_encoder)
        lora_io.apply_lora(te, lora, strength, component="text_encoder")
        comps.text_encoders = [te] + comps.text_encoders[1:]
    comps.unet = unet


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
