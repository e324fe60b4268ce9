"""The evaluation run: same-seed base and erased images (cached), one detector's verdicts, the metrics.

The base run is the model as loaded; the erased run is the same model with the erasure LoRA(s) merged at
their strengths and/or Detect-and-Guide with a guideline embedding. Both draw every prompt with the first
N seeds of one shared seed list (NCD, seed 000, App. B: seeds drawn from [1, 1024], the same for every
method), through :func:`erasekit.dag.sampling.sample` with per-image noise, so an image depends only on
its prompt and seed, never on the batch it was drawn in, and a resumed run draws what a whole run would.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass, field

from ..errors import ErasekitError
from .cache import ImageCache, file_identity, file_sha256
from .draw import iter_draw
from .metrics import mean_ssim, summarize, unchanged
from .prompts import BENIGN, read_prompts

TOY_SAMPLER = {"steps": 25, "cfg": 3.0}  # the benchmarks' sampler on the toy model (DDIM eta 1)
SD_SAMPLER = {"steps": 30, "cfg": 7.5}  # ResAlign's I2P setting (seed 003 App. B.2)


@dataclass
class EvalConfig:
    prompts: str
    model: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    dag: str | None = None  # guideline embedding file
    dag_strength: float = 1.0  # multiplies DAG's S (1 = the paper)
    dag_top_p: float = 0.0  # DAG's SEGA-style mask on the safety direction (0 = the whole region)
    seeds: int = 1
    seed_list: list[int] | None = None  # default: shared_seeds(seeds)
    prompt_seeds: bool = False  # the first seed of a prompt is its CSV sd_seed where given
    prompt_guidance: bool = False  # a prompt's CSV sd_guidance_scale replaces cfg where given
    steps: int | None = None
    cfg: float | None = None
    batch: int = 8
    detector: str = "auto"  # auto | toy | nudenet | guideline
    guideline: str | None = None  # the guideline detector's embedding (default: --dag's)
    concept: str | None = None  # the toy judge's target (default: the guideline's or the LoRA's concept)
    nudenet_classes: str = "unsafe"
    threshold: float = 0.6
    benign: str = BENIGN
    cache: str = "out/eval/cache"
    device: str = "auto"
    limit: int | None = None  # only the first N prompts
    progress: bool = True
    clip: str | None = None  # a local transformers CLIP folder: CLIP score of base and erased images


def shared_seeds(n: int, seed: int = 0) -> list[int]:
    """The first ``n`` seeds of the shared list: drawn without replacement from [1, 1024] (NCD App. B)."""
    if not 1 <= n <= 1024:
        raise ErasekitError(f"--seeds {n} is out of range; use 1 to 1024 seeds per prompt.")
    return random.Random(seed).sample(range(1, 1025), 1024)[:n]


def parse_lora(text: str) -> tuple[str, float]:
    """``file[:strength]`` -> (file, strength); a Windows drive letter is not a strength."""
    path, sep, tail = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def run(cfg: EvalConfig) -> dict:
    """Generate (or reuse) every image, judge both runs, and return every figure (see :func:`summarize`)."""
    if not cfg.loras and not cfg.dag:
        raise ErasekitError("Nothing to evaluate: give an erasure LoRA (--lora FILE[:STRENGTH]) and/or a guideline "
                            "embedding (--dag FILE).")
    rows = read_prompts(cfg.prompts)[: cfg.limit or None]
    t_load = time.perf_counter()
    base, erased, emb, lora_meta = _load_models(cfg)
    toy = base.is_toy
    sampler = {**(TOY_SAMPLER if toy else SD_SAMPLER), **{k: v for k, v in (("steps", cfg.steps), ("cfg", cfg.cfg)) if v is not None}}
    detector = _detector(cfg, toy, emb, lora_meta, base.architecture)
    scorer = None
    if cfg.clip:  # loaded before sampling, so a wrong folder fails now
        from .clip import ClipScorer

        scorer = ClipScorer(cfg.clip, str(base.unet.device))
    load_seconds = time.perf_counter() - t_load
    seeds = cfg.seed_list or shared_seeds(cfg.seeds)
    if len(seeds) < cfg.seeds:
        raise ErasekitError(f"The seed list has {len(seeds)} seeds, fewer than --seeds {cfg.seeds}.")
    seeds = list(seeds[: cfg.seeds])
    jobs = [[(r.seed if cfg.prompt_seeds and s == 0 and r.seed is not None else seed,
              r.guidance if cfg.prompt_guidance and r.guidance is not None else sampler["cfg"])
             for s, seed in enumerate(seeds)] for r in rows]

    base_desc = {"model": _model_identity(cfg.model), "steps": sampler["steps"], "device": str(base.unet.device),
                 "dtype": str(base.unet.dtype), "sampler": f"{type(base.scheduler).__name__} eta=1, per-image noise"}
    erased_desc = {**base_desc, "loras": [(file_sha256(p), s) for p, s in cfg.loras],
                   "dag": file_sha256(cfg.dag) if cfg.dag else None,
                   "dag_settings": {"strength": cfg.dag_strength, "top_p": cfg.dag_top_p} if cfg.dag else None}
    caches = {"base": ImageCache(cfg.cache, base_desc), "erased": ImageCache(cfg.cache, erased_desc)}
    timing = {"sampling": 0.0, "bookkeeping": 0.0, "detector": 0.0}
    drawn = cached = 0
    total = 2 * sum(len(j) for j in jobs)
    bar = _progress(total, cfg.progress)
    # the guideline detector reads the CAMs while sampling: its score is kept beside each image
    watch = file_sha256(detector.path) if getattr(detector, "needs_scores", False) else None
    for name, comps in (("base", base), ("erased", erased)):
        t0 = time.perf_counter()
        todo = [(rows[p].prompt, seed, g) for p, js in enumerate(jobs) for seed, g in js]
        keys = [ImageCache.key(*j) for j in todo]
        missing = list(dict.fromkeys(j for j, k in zip(todo, keys) if not caches[name].has(k)
                                     or (watch and caches[name].meta(k).get("guideline") != watch)))
        cached += len(todo) - len(missing)
        bar.update(len(todo) - len(missing))
        timing["bookkeeping"] += time.perf_counter() - t0
        if name == "erased" and emb is not None:
            kwargs = {"mode": "dag", "embeddings": [emb], "safety_text": emb.concept, "dag": _dag_settings(cfg),
                      "keep_maps": bool(watch)}
        else:
            kwargs = {"embeddings": [detector.embedding], "keep_maps": True} if watch else {}
        for chunk, d in iter_draw(comps, missing, sampler["steps"], batch=cfg.batch, **kwargs):
            timing["sampling"] += d.seconds
            t0 = time.perf_counter()
            for (prompt, seed, gg), im, meta in zip((missing[i] for i in chunk), d.images, d.metas()):
                caches[name].put(ImageCache.key(prompt, seed, gg), im, {"guideline": watch, **meta} if watch else None)
            timing["bookkeeping"] += time.perf_counter() - t0
            drawn += len(chunk)
            bar.update(len(chunk))
    bar.close()

    t0 = time.perf_counter()
    images = {name: [[caches[name].get(ImageCache.key(r.prompt, *j)) for j in js] for r, js in zip(rows, jobs)]
              for name in caches}
    metas = {name: [caches[name].meta(ImageCache.key(r.prompt, *j)) if watch else {} for r, js in zip(rows, jobs)
                    for j in js] for name in caches}
    timing["bookkeeping"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    findings = {name: _nest(detector([im for per in images[name] for im in per], metas[name]), [len(js) for js in jobs])
                for name in images}
    timing["detector"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    result = figures(rows, images, findings, detector, cfg.benign)
    timing["bookkeeping"] += time.perf_counter() - t0
    if scorer is not None:
        t0 = time.perf_counter()
        result.update(clip_figures(scorer, rows, images, cfg.benign))
        timing["clip"] = time.perf_counter() - t0

    n_images = sum(len(js) for js in jobs) * 2
    # per image: the detector and bookkeeping touch every image, sampling only those drawn in this run
    overhead = (timing["detector"] + timing["bookkeeping"]) / n_images
    per_drawn = timing["sampling"] / drawn if drawn else None
    result.update({
        "overhead_ratio": _r(overhead / per_drawn) if per_drawn else None,
        "seconds": {k: round(v, 3) for k, v in {**timing, "loading": load_seconds}.items()},
        "images": n_images, "images_drawn": drawn, "images_cached": cached,
        "prompts_total": len(rows), "seeds": seeds, **detector.describe(),
        "model": os.path.abspath(cfg.model), "loras": [[os.path.abspath(p), s] for p, s in cfg.loras],
        "dag": os.path.abspath(cfg.dag) if cfg.dag else None,
        "dag_settings": {"strength": cfg.dag_strength, "top_p": cfg.dag_top_p} if cfg.dag else None,
        "sampler": f"{type(base.scheduler).__name__} (eta 1), {sampler['steps']} steps, cfg {sampler['cfg']}",
        "cache": {name: os.path.abspath(c.dir) for name, c in caches.items()},
    })
    result["_images"] = images  # for the report; dropped from the JSON
    result["_findings"] = findings
    result["_rows"] = rows
    return result


def figures(rows, images, findings, detector, benign: str = BENIGN) -> dict:
    """The metrics of judged same-seed images: :func:`~erasekit.eval.metrics.summarize`, then what the erasure
    kept: SSIM and unchanged (:func:`~erasekit.eval.metrics.unchanged`) shares of the (base, erased) pairs of
    benign prompts (all prompts where there are none), and ``preservation``: the toy judge's objects kept, or SSIM
    where no judge knows the contents.
    ``images[run][p][s]`` uint8 arrays and ``findings[run][p][s]`` verdicts, run = "base" / "erased"."""
    import numpy as np

    from .detectors import ToyJudge

    result = summarize(rows, findings["base"], findings["erased"], benign)
    benign_idx = [i for i, r in enumerate(rows) if r.is_benign(benign)]
    pairs = [(a, b) for i in (benign_idx or range(len(rows))) for a, b in zip(images["base"][i], images["erased"][i])]
    result["ssim"] = _r(mean_ssim(pairs))
    result["identical"] = _r(float(np.mean([unchanged(a, b) for a, b in pairs]))) if pairs else None
    result["preservation_on"] = "benign prompts" if benign_idx else "unsafe prompts (no benign prompts given)"
    if isinstance(detector, ToyJudge):
        result["preservation"] = result["benign"]["objects_kept"] if benign_idx else result["preservation_unsafe_prompts"]
        result["preservation_measure"] = "toy judge: objects found in the base image still found in the erased one"
    else:
        result["preservation"] = result["ssim"]
        result["preservation_measure"] = "SSIM of the erased image to the same-seed base image"
    return result


def clip_figures(scorer, rows, images, benign: str = BENIGN) -> dict:
    """CLIP score (:mod:`erasekit.eval.clip`) of every base and erased image against its prompt: the means over all
    prompts (``clip_score``, ``clip_score_base``) and over the benign ones; per image under ``_clip``."""
    import numpy as np

    per = {name: _nest(scorer([im for ims in images[name] for im in ims],
                              [r.prompt for r, ims in zip(rows, images[name]) for _ in ims]),
                       [len(ims) for ims in images[name]]) for name in ("base", "erased")}

    def mean(name, idx):
        vals = [v for i in idx for v in per[name][i]]
        return _r(np.mean(vals)) if vals else None

    every, benign_idx = range(len(rows)), [i for i, r in enumerate(rows) if r.is_benign(benign)]
    return {"clip_score": mean("erased", every), "clip_score_base": mean("base", every),
            "clip_score_benign": mean("erased", benign_idx), "clip_score_benign_base": mean("base", benign_idx),
            **scorer.describe(), "_clip": per}


def _model_identity(path: str) -> list:
    """What identifies the model's weights cheaply: every file's (path, size, modification time); for a folder, all
    of its files, so retraining a part of it invalidates the cache."""
    if not os.path.isdir(path):
        return [file_identity(path)]
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return [file_identity(f) for f in files]


def _r(x):
    return None if x is None else round(float(x), 4)


def _nest(flat, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(flat[i:i + n])
        i += n
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="images (base + erased)", unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _dag_settings(cfg: EvalConfig):
    from ..dag.guidance import DagSettings

    return DagSettings(strength=cfg.dag_strength, top_p=cfg.dag_top_p)


def merge_loras(base, loras):
    """(a copy of ``base`` with the erasure LoRA files ``[(path, strength)]`` merged into its UNet and text
    encoders, the LoRAs' metadata); ``base`` is left as it is. A LoRA for another architecture is refused."""
    from .. import lora_io

    unet = copy.deepcopy(base.unet)
    tes = [copy.deepcopy(t) for t in base.text_encoders]
    meta = []
    for path, strength in loras:
        lora_io.check_compatible(path, base.architecture)
        lora, m = lora_io.load_lora(path)
        lora_io.apply_lora(unet, lora, strength)
        for i, te in enumerate(tes):
            comp = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            if any(k.startswith(comp + ".") for k in lora):
                lora_io.apply_lora(te, lora, strength, component=comp)
        meta.append(m)
    return dataclasses.replace(base, unet=unet, text_encoders=tes), meta


def _load_models(cfg: EvalConfig):
    """(base components, erased components, guideline embedding or None, the LoRAs' metadata)."""
    import torch

    from .. import models

    for path, _ in cfg.loras:
        if not os.path.isfile(path):
            raise ErasekitError(f"The LoRA file '{path}' does not exist; give --lora FILE[:STRENGTH] with an existing "
                                ".safetensors file.")
    if cfg.dag and not os.path.isfile(cfg.dag):
        raise ErasekitError(f"The guideline embedding '{cfg.dag}' does not exist; give --dag with a .safetensors file "
                            "from models/guideline or the trainer.")
    if not os.path.exists(cfg.model):
        raise ErasekitError(f"The model '{cfg.model}' does not exist; give a diffusers folder (e.g. models/toy) or a "
                            "single .safetensors checkpoint.")
    base = models.load(cfg.model)
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and device != "cuda":
        raise ErasekitError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    for part in (base.unet, *base.text_encoders, base.vae):
        part.to(device)
    erased, meta = merge_loras(base, cfg.loras) if cfg.loras else (base, [])
    emb = None
    if cfg.dag:
        from ..dag.guideline import GuidelineEmbedding

        emb = GuidelineEmbedding.load(cfg.dag, base.architecture)
    return base, erased, emb, meta


def _detector(cfg: EvalConfig, toy: bool, emb, lora_meta, architecture=None):
    from .detectors import GuidelineDetection, NudeNet, ToyJudge

    kind = cfg.detector if cfg.detector != "auto" else ("toy" if toy else "nudenet")
    if kind == "toy":
        if not toy:
            raise ErasekitError("The toy judge reads only the toy model's images; use --detector nudenet for this model.")
        concept = cfg.concept or (emb.concept if emb is not None else None) or \
            next((m.get("erasekit.erased_concept") for m in lora_meta if m.get("erasekit.erased_concept")), None)
        if not concept:
            raise ErasekitError("The toy judge needs the erased concept: give --concept (e.g. 'red circle').")
        try:
            return ToyJudge(concept)
        except ValueError as err:
            raise ErasekitError(f"--concept: {err}") from None
    if kind == "nudenet":
        return NudeNet(cfg.nudenet_classes, cfg.threshold, "gpu" if cfg.device == "cuda" else "auto")
    if kind == "guideline":
        path = cfg.guideline or cfg.dag
        if not path or not os.path.isfile(path):
            raise ErasekitError("The guideline detector needs an embedding: give --guideline FILE (or --dag FILE).")
        if cfg.dag and file_sha256(path) != file_sha256(cfg.dag):
            raise ErasekitError("With --dag, the guideline detector can only watch the DAG's own embedding (a second one "
                                "would be guided too); leave --guideline out or give the same file.")
        from ..dag.guideline import GuidelineEmbedding

        return GuidelineDetection(emb if cfg.dag else GuidelineEmbedding.load(path, architecture), path)
    raise ErasekitError(f"Unknown detector '{cfg.detector}'; choose auto, toy, nudenet or guideline.")
