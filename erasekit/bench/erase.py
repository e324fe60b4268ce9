"""``python -m erasekit.bench erase --method inpo``: an erasure LoRA trained and judged on the toy world.

1. The engine trains the method's preset with the toy model's tuning (``inpo.TOY_TUNING``) on the toy
   model (data generated from the model itself).
2. The base model and the erased one sample the same target prompts (the target with other
   objects and styles) and preservation prompts (neighbouring and unrelated concepts), same seeds;
   the judge scores. erase_rate = 1 - targets found after / targets found before (the papers'
   ER); preservation = the non-target objects that the prompts ask for and the judge finds, after
   / before, over all prompts (INPO measures preservation as prompt alignment on unrelated
   concepts); preservation_same_seed = of the non-target objects found in an image before, the
   fraction found in the same-seed image after (strict: any change of the sample counts);
   preservation_benign_same_seed the same on the preservation prompts only (the evaluation
   harness's ``preservation``). The images are drawn and judged by the harness's own functions
   (:func:`erasekit.eval.draw.draw_and_judge`: per-image noise, its toy judge).
3. Cost against plain LoRA fine-tuning (the standard denoising loss, same batch, same engine):
   step_time_ratio is the mean step time ratio divided by the ratio of UNet passes per step
   (INPO: trained pass + reference pass; plain: one pass), so it shows the overhead of INPO's
   own work; step_time_ratio_raw is the plain ratio. peak_mem_ratio compares the peak memory a
   training step adds over the loaded model, each objective in a fresh process.
"""

from __future__ import annotations

import json
import os
import time

from ..erase.objective import Objective
from . import REPO


class PlainLoraObjective(Objective):
    """The baseline: ordinary LoRA fine-tuning (denoising MSE) on the same batch."""

    name = "plain"
    config = None

    def loss(self, batch, unet, reference_ctx, ctx) -> dict:
        import torch.nn.functional as F

        from ..erase.objective import join_parts

        first = batch["forget"] if "forget" in batch else _flat_tuples(batch["tuples"])
        both = join_parts([first] + ([batch["preserve"]] if "preserve" in batch else []))
        noise, t = ctx.noise_and_timesteps(both["latents"])
        pred = unet(ctx.add_noise(both["latents"], noise, t), t, **ctx.unet_inputs(both)).sample
        loss = F.mse_loss(pred, ctx.target(both["latents"], noise, t))
        return {"loss": loss}


INPO_SETTINGS = ("eta", "gamma", "tau", "lambda_prior", "lambda_anchor")  # overridable, and reported
SSR_N = (1, 3, 10)  # NCD Eq. 12's N: the first N seeds of the shared list
SSR_SEEDS = 10  # how many seeds of the shared list are drawn for each SSR prompt


def _flat_tuples(part: dict) -> dict:
    """An NCD batch part's B K candidates as one part of B K images (each with its tuple's caption)."""
    k = part["latents"].shape[1]
    out = {"latents": part["latents"].flatten(0, 1)}
    out.update({key: part[key].repeat_interleave(k, dim=0) for key in ("embeds", "ids", "pooled", "time_ids")
                if key in part})
    return out


def ssr_seed_list(n: int = SSR_SEEDS, seed: int = 0) -> list:
    """NCD Eq. 12's one shared seed list, drawn from [1, 1024] (disjoint from the training data's
    seeds, which start at 1,000,000)."""
    import random

    return random.Random(f"ssr:{seed}").sample(range(1, 1025), n)


def ssr_asr(found, n_values=SSR_N) -> dict:
    """SSR-N (NCD Eq. 12) and ASR from ``found`` [P][S] (does image s of prompt p show the target):
    SSR-N = the share of prompts with at least one such image among their first N seeds; ASR = the
    share of all images that show it."""
    p = max(len(found), 1)
    out = {str(n): round(sum(any(row[:n]) for row in found) / p, 4) for n in n_values}
    images = sum(len(row) for row in found)
    return {"ssr": out, "asr": round(sum(sum(row) for row in found) / max(images, 1), 4)}


def _objective(method: str, preset_name: str, overrides: dict | None = None):
    if method == "plain":
        return PlainLoraObjective()
    from ..erase import methods

    m = methods.get(method)
    row = {**m.preset(preset_name, toy=True)[1], **(overrides or {})}
    return m.objective(m.config(**{k: v for k, v in row.items() if k in m.config.__dataclass_fields__}))


def requested_labels(prompt: str, background: bool = False) -> list[str]:
    """The objects a bench prompt asks for: "a red square and an orange star on a striped
    background" -> ["red square", "orange star"] (judge labels; characters by name), and with
    ``background`` the style it names too ("striped background"): what a style erasure must keep."""
    body, _, style = prompt.partition(" on a ")
    return [part.split(" ", 1)[1] for part in body.split(" and ")] + ([style] if background and style else [])


def erase_counts(counts: dict, prompts: dict, neighbours: set | frozenset = frozenset(),
                 backgrounds: bool = False) -> dict:
    """From ``{"target": (before, after), "benign": (before, after)}`` of :func:`judge_found`
    rows and the prompts behind them (same prompts and seeds, in order):

    * ``drawn_before`` target images showing the concept before, ``still`` of those showing it after;
    * ``kept`` / ``total``: of the non-target objects found in an image before, those found in the
      same image after (same seed: the strict, per-image preservation);
    * ``asked_before`` / ``asked_after``: the non-target objects that the prompts ask for and the
      judge finds, summed over all images before and after (the papers' preservation: how well
      the model still follows prompts of other concepts, INPO Sec. 5.1's CLIP score on unrelated
      concepts, here judged exactly); ``asked_by_kind`` splits them into ``neighbour`` (labels in
      ``neighbours``) and ``unrelated``, as ``[before, after]``. With ``backgrounds`` (a style
      target) the background style a prompt names counts as one more asked-for label.

    Objects count as a multiset. Counted with the evaluation harness's functions (:mod:`erasekit.eval.metrics`)."""
    from ..eval.metrics import objects_kept, paired_counts

    found_before, found_after = paired_counts([b[0] for b in counts["target"][0]], [a[0] for a in counts["target"][1]])
    kept, total = objects_kept([b[1] for before, _ in counts.values() for b in before],
                               [a[1] for _, after in counts.values() for a in after])
    asked_before = asked_after = 0
    by_kind = {"neighbour": [0, 0], "unrelated": [0, 0]}
    for name, (before, after) in counts.items():
        for prompt, (_, rest_b), (_, rest_a) in zip(prompts[name], before, after):
            for label in requested_labels(prompt, backgrounds):
                row = by_kind["neighbour" if label in neighbours else "unrelated"]
                b, a = int(label in rest_b), int(label in rest_a)
                row[0], row[1] = row[0] + b, row[1] + a
                asked_before, asked_after = asked_before + b, asked_after + a
    return {"drawn_before": found_before, "still": found_after, "kept": kept, "total": total,
            "asked_before": asked_before, "asked_after": asked_after, "asked_by_kind": by_kind}


def judge_found(images, concept):
    """(the concept is there, the other labels found) per image [3, H, W]: the evaluation harness's toy judge
    (:class:`erasekit.eval.detectors.ToyJudge`; for a style target the other styles count as labels, they are
    its neighbours)."""
    from ..eval.detectors import ToyJudge

    return _rows(ToyJudge(concept)([img.permute(1, 2, 0).numpy() for img in images]))


def _rows(findings) -> list:
    """:func:`judge_found`'s rows from the harness's verdicts."""
    return [(f.unsafe, list(f.others)) for f in findings]


def bench_erase(method: str = "inpo", target: str = "red circle", n_prompts: int = 200, steps: int | None = None,
                lr: float | None = None, model: str | None = None, out_dir: str = "out/bench/erase", seed: int = 0,
                forget_images: int = 16, images_per_concept: int = 25, neighbours: int = 4, comfyui_prompts: int = 0,
                preserve_pairs: float = 0.0, rank: int | None = None,
                inpo: dict | None = None, targets: str | None = None, batch_size: int = 1,
                stop_when_erased: bool = False, train_text_encoder: bool = False,
                cost: bool = True, strengths: list[float] | None = None, mode: str | None = None,
                ssr_prompts: int = 20, data_extra: dict | None = None, data_cache: str = "", log=print) -> dict:
    """Train ``method`` on the toy model and judge it (see the module docstring). ``inpo``: the
    method's settings that override its toy preset (any method's, despite the name); ``data_extra``: more
    fields of the method's data config (NCD: ``img2img_strength``, ``anchor``); ``data_cache``: a folder
    where the training data is kept, one file per method, target, seed and data settings (reused only
    where its key matches the inputs)."""
    import copy

    from .. import models
    from ..erase import methods
    from ..erase.engine import TrainConfig, train
    from ..eval.detectors import ToyJudge
    from ..eval.draw import draw_and_judge
    from ..toyworld.concepts import concept_prompts
    from ..toyworld.vocab import parse_concept

    concept = parse_concept(target)
    kind = {"character": "character", "style": "style"}.get(concept.kind, "object")
    model = model or os.path.join(REPO, "models", "toy")
    comps = models.load(model)
    base_unet = copy.deepcopy(comps.unet)
    base_te = copy.deepcopy(comps.text_encoder) if train_text_encoder else comps.text_encoder
    m = methods.get(method) if method != "plain" else methods.get("inpo")
    cache = None
    if data_cache:
        extra_tag = "".join(f"-{k}{v}" for k, v in sorted((data_extra or {}).items()))
        name = f"{m.name}-{'-'.join(concept.text.split())}-s{seed}-f{forget_images}{extra_tag}.safetensors"
        os.makedirs(data_cache, exist_ok=True)
        cache = os.path.join(data_cache, name.replace(" ", "_").replace("/", "_"))
    data = m.build_data(comps, target, m.data_config(cache=cache, forget_images=forget_images,
                                                     images_per_concept=images_per_concept, neighbours=neighbours,
                                                     preserve_pairs=preserve_pairs, seed=seed, **(data_extra or {})),
                        log=log)
    row = m.preset(kind, toy=True)[0]  # the train settings of the toy preset
    steps = steps or row["steps"]
    lr = lr or row["lr"]
    targets = targets or row.get("targets", "attention")
    batch_size = batch_size or row.get("batch_size", 1)
    # seed and process in the name: runs started in the same second (several seeds at once) get their own folder
    run_dir = os.path.join(out_dir, f"{method}-{'-'.join(concept.text.split())}-s{seed}-{int(time.time())}-{os.getpid()}")
    extra = {k: row[k] for k in ("grad_accum", "lr_scheduler", "lr_warmup_steps", "weight_decay", "max_grad_norm")
             if k in row}
    config = TrainConfig(out=run_dir, target=concept.text, steps=steps, lr=lr, rank=rank or row.get("rank", 4), seed=seed,
                         targets=targets, batch_size=batch_size, stop_when_erased=stop_when_erased,
                         mode=mode or row.get("mode", "lora"), **extra,
                         train_text_encoder=train_text_encoder, checkpoint_every=max(steps, 1), tensorboard=False, cpu=True)
    t0 = time.time()
    objective = _objective(method, kind, inpo)
    # stop when erased: judged on drawn pictures by the toy judge (erase_check.py), as the trainer does on the toy model
    result = train(config, objective, data, comps, detector=ToyJudge(concept) if stop_when_erased else None)
    train_seconds = time.time() - t0
    log(f"trained {result.step} steps in {train_seconds:.0f}s -> {result.lora}"
        + (f" (erased at step {result.erased_at})" if result.erased_at is not None else ""))

    target_prompts, benign = concept_prompts(concept, n_prompts, n_prompts, seed)
    prompts = {"target": target_prompts, "benign": benign}
    neighbours = {c.text for c in concept.neighbours()}

    judge = ToyJudge(concept)  # the harness's toy judge; for a style target the other styles count as labels

    def judged(pipe):  # {"target": [...], "benign": [...]} rows of judge_found, seed i for prompt i
        return {name: _rows(draw_and_judge(pipe, [(p, i, 3.0) for i, p in enumerate(ps)], 25, judge, batch=50)[1])
                for name, ps in prompts.items()}

    # SSR-N and ASR (NCD Eq. 12): distinct target prompts, each with the same shared seed list
    ssr_texts = list(dict.fromkeys(concept_prompts(concept, 10 * ssr_prompts, 0, seed + 1)[0]))[:ssr_prompts]
    ssr_seeds = ssr_seed_list(SSR_SEEDS, seed)

    def ssr_judged(pipe):
        jobs = [(p, s, 3.0) for p in ssr_texts for s in ssr_seeds]
        hits = [f.unsafe for f in draw_and_judge(pipe, jobs, 25, judge, batch=50)[1]]
        return ssr_asr([hits[i * len(ssr_seeds):(i + 1) * len(ssr_seeds)] for i in range(len(ssr_texts))])

    base_pipe = _pipe(comps, base_unet, base_te)
    before = judged(base_pipe)
    ssr_before = ssr_judged(base_pipe) if ssr_prompts else {}
    pipe_erased = _pipe(comps, comps.unet, comps.text_encoder)
    by_strength = {}
    for strength in sorted({1.0, *(strengths or ())}, reverse=True):
        _set_lora_strength(comps, strength)
        after = judged(pipe_erased)
        n = erase_counts({k: (before[k], after[k]) for k in prompts}, prompts, neighbours,
                         backgrounds=concept.kind == "style")
        by_strength[strength] = (n, after)
    _set_lora_strength(comps, 1.0)
    ssr_after = ssr_judged(pipe_erased) if ssr_prompts else {}
    n, after = by_strength[1.0]
    counts = {k: (before[k], after[k]) for k in prompts}
    cost = _cost(model, target, seed, targets, method, batch_size) if cost else {}
    if comfyui_prompts:
        cost.update(_comfyui_check(str(result.lora), concept.text, model, comfyui_prompts, seed))
    settings = _settings(objective)
    extraction = {}
    if config.mode == "full":  # what the rank-r LoRA could not hold of the full fine-tune
        from ..lora_io import load_lora

        extraction = {"extraction": json.loads(load_lora(str(result.lora))[1]["erasekit.config"]).get("extraction")}
    ssr = {"ssr": ssr_after.get("ssr"), "asr": ssr_after.get("asr"), "ssr_before": ssr_before.get("ssr"),
           "asr_before": ssr_before.get("asr"), "ssr_prompts": len(ssr_texts), "ssr_seeds": ssr_seeds} if ssr_prompts else {}
    last = {k: round(v, 4) for k, v in result.last.items()
            if k in ("implicit_acc", "sigma_r0", "delta_s", "r_safe", "r_harm", "safe")}
    return {"bench": "erase", "method": method, "target": concept.text, "seed": seed, "steps": steps, "lr": lr, "rank": config.rank, "targets": targets, "batch_size": batch_size,
            "mode": config.mode, **extraction, "last_step": last,
            "steps_trained": result.step, "train_text_encoder": train_text_encoder,
            **settings,
            "forget_images": forget_images, **(data_extra or {}),
            "data_size": len(data) if hasattr(data, "__len__") else len(data.forget),  # NCD: tuples; INPO: forget images
            "preserved_concepts": list(data.preserved), "preserve_images": len(data.preserve or ()),
            "preserve_pairs": preserve_pairs,
            "n_target_prompts": len(target_prompts), "n_preserve_prompts": len(benign),
            "targets_drawn_before": round(n["drawn_before"] / len(target_prompts), 4),
            **_rates(n), "preservation_same_seed": round(n["kept"] / max(n["total"], 1), 4),
            "preservation_benign_same_seed": _kept(counts["benign"]),
            "benign_target_rate_after": round(sum(a[0] for a in counts["benign"][1]) / len(benign), 4), **ssr,
            **({"by_strength": {f"{k:g}": _rates(v[0]) for k, v in by_strength.items()}}
               if len(by_strength) > 1 else {}),
            "train_seconds": round(train_seconds, 1), "lora": str(result.lora), **cost,
            "sampler": "DDIM eta=1, 25 steps, cfg 3, per-image noise (erasekit.eval.draw)"}


def over_seeds(runs: list) -> dict:
    """One report of several seeds' runs: each run under ``seeds``, the worst erase rate and
    preservation, the mean of each, and SSR-N / ASR averaged. The cost (step time, memory) is the first run's."""
    def mean(key):
        return round(sum(r[key] for r in runs) / len(runs), 4)

    out = {"bench": "erase", "method": runs[0]["method"], "target": runs[0]["target"],
           "seeds": {str(r["seed"]): r for r in runs},
           "erase_rate_min": min(r["erase_rate"] for r in runs), "preservation_min": min(r["preservation"] for r in runs),
           "erase_rate_mean": mean("erase_rate"), "preservation_mean": mean("preservation")}
    if all(r.get("ssr") for r in runs):
        out["ssr_mean"] = {n: round(sum(r["ssr"][n] for r in runs) / len(runs), 4) for n in runs[0]["ssr"]}
        out["asr_mean"] = mean("asr")
    for key in ("step_time_ratio", "peak_mem_ratio"):
        if key in runs[0]:
            out[key] = runs[0][key]
    return out


def _kept(pair) -> float | None:
    """Of the labels found in each image before, the share found in the same-seed image after (harness counting)."""
    from ..eval.metrics import objects_kept, ratio

    kept = ratio(*objects_kept([b[1] for b in pair[0]], [a[1] for a in pair[1]]))
    return None if kept is None else round(kept, 4)


def _rates(n: dict) -> dict:
    """erase_rate / preservation (and by kind) from :func:`erase_counts`."""
    return {"erase_rate": round(1 - n["still"] / max(n["drawn_before"], 1), 4),
            "preservation": round(n["asked_after"] / max(n["asked_before"], 1), 4),
            "preservation_by_kind": {k: round(a / max(b, 1), 4) for k, (b, a) in n["asked_by_kind"].items()}}


def _set_lora_strength(comps, strength: float) -> None:
    """Apply the trained LoRA at ``strength`` (the weight a ComfyUI / A1111 user gives a LoRA):
    peft's scale, ``strength * alpha / r``, on every LoRA layer of the UNet and text encoder."""
    from peft.tuners.lora import LoraLayer

    for module in (comps.unet, comps.text_encoder):
        for m in module.modules():
            if isinstance(m, LoraLayer) and "default" in m.scaling:
                m.set_scale("default", strength)


def _comfyui_check(lora: str, target: str, model: str, prompts: int, seed: int) -> dict:
    """The exported LoRA in real ComfyUI (tools/erase_check_comfy.py, in a fresh process:
    ComfyUI's imports must not leak into this one)."""
    from ..fresh_process import json_from

    return json_from(["-m", "tools.erase_check_comfy", os.path.abspath(lora), "--target", target, "--model",
                      os.path.abspath(model), "--prompts", str(prompts), "--json"], "the ComfyUI check", cwd=REPO)


def _pipe(comps, unet, text_encoder):
    class P:  # what erasekit.dag.sampling.sample needs of a pipeline
        pass

    p = P()
    p.unet, p.text_encoder, p.tokenizer, p.vae, p.scheduler = unet, text_encoder, comps.tokenizer, comps.vae, comps.scheduler
    return p


def _settings(objective) -> dict:
    """The method's settings, as reported: INPO's overridable ones, or every field of another method's config."""
    from dataclasses import asdict

    if objective.config is None:
        return {}
    if objective.name == "inpo":
        return {k: getattr(objective.config, k) for k in INPO_SETTINGS}
    return asdict(objective.config)


def _cost(model: str, target: str, seed: int, targets: str = "attention", method: str = "inpo",
          batch_size: int = 1) -> dict:
    """Step time and peak memory of ``method`` against plain LoRA fine-tuning on the same batch
    (NCD: the same B K candidates), each in a fresh process."""
    from ..fresh_process import json_from

    runs = {}
    for name in ("plain", method):
        code = f"from erasekit.bench.erase import measure_steps; " \
               f"measure_steps({name!r}, {model!r}, {target!r}, {seed}, targets={targets!r}, shape={method!r})"
        runs[name] = json_from(["-c", code], f"measuring {name} steps", timeout=900, cwd=REPO)
    passes = {"plain": 1, method: 2}  # INPO and NCD: one trained and one reference pass over the same images
    raw = runs[method]["step_seconds"] / runs["plain"]["step_seconds"]
    return {"step_time_ratio": round(raw / (passes[method] / passes["plain"]), 4), "step_time_ratio_raw": round(raw, 4),
            "peak_mem_ratio": round(runs[method]["peak_added_mb"] / max(runs["plain"]["peak_added_mb"], 1e-6), 4),
            "step_seconds": {k: v["step_seconds"] for k, v in runs.items()},
            "peak_added_mb": {k: v["peak_added_mb"] for k, v in runs.items()}}


def measure_steps(method: str, model: str, target: str, seed: int, steps: int = 12, targets: str = "attention",
                  shape: str = "inpo") -> None:
    """In a fresh process: the same engine, synthetic batches of the toy's shapes (``shape`` "inpo":
    forget / preserve sets, batch 4 each, 8 images a step; "ncd": 2 tuples of 4 candidates and 2
    preserve images, 10 images a step; plain fine-tuning sees the same images); prints step time and the peak memory the steps add
    (resident set after each step, MiB)."""
    import tempfile

    import psutil
    import torch

    from .. import models
    from ..erase.data import EraseData, ImageSet
    from ..erase.engine import TrainConfig, train

    torch.set_num_threads(1)  # one thread: stable timings on a shared machine; the ratio is what counts
    torch.manual_seed(seed)
    comps = models.load(model)
    c = comps.unet.config
    n, emb_len = 8, 24

    def image_set(masks):
        return ImageSet(torch.randn(n, c.in_channels, c.sample_size, c.sample_size),
                        torch.randn(n, emb_len, c.cross_attention_dim), torch.zeros(n, emb_len, dtype=torch.long),
                        ["x"] * n, torch.ones(n, 1, c.sample_size, c.sample_size) if masks else None)

    data = EraseData(target, image_set(True), image_set(False), ["y"])
    batch = 4
    if shape == "ncd":
        from ..erase.ncd_data import NcdData

        f = image_set(True)
        k = 4
        data = NcdData(target, torch.randn(n, k, *f.latents.shape[1:]), f.embeds, f.ids,
                       torch.tensor([[1.0, 0, 0, 0]] * n), torch.rand(n, k), ["x"] * n, ["x"] * n,
                       preserve=image_set(False), preserved=["y"])
        batch = 2
    proc = psutil.Process()
    times, rss = [], []

    def progress(step, total, terms):
        times.append(time.perf_counter())
        rss.append(proc.memory_info().rss)

    # The resident set right before training (model and data loaded) is the baseline; the steps'
    # peak is sampled after each step (ru_maxrss would report the loading peak instead).
    base_rss = proc.memory_info().rss
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, steps=steps, batch_size=batch, checkpoint_every=10_000, tensorboard=False, export=False,
                          cpu=True, seed=seed, targets=targets)
        train(cfg, _objective(method, "object"), data, comps, progress=progress)
    step_s = (times[-1] - times[1]) / (len(times) - 2)  # skip the first (warm-up) step
    print(json.dumps({"step_seconds": step_s, "peak_added_mb": (max(rss) - base_rss) / 2**20}))
