"""Measure the toy model with the judge: `python -m erasekit.toyworld eval --json`.

Prints one JSON object. Every figure names the sampler it was measured with:

* `judge_accuracy`: the judge alone, on held-out rendered scenes (exact object labels and style).
* `prompt_following_single` / `_pair`: fraction of generated images in which the judge finds every
  object the prompt asks for (`exact` also requires nothing else: no stray objects).
* `prompt_following_by_cfg`: single-object following at CFG 1.5, 3, 5 and 7.5 (the main CFG's
  entry is `prompt_following_single`; the others use one image per prompt).
* `style_following`: the judged background style equals the prompt's.
* `word_cam_iou`: DAAM-style word maps on the generated single-object images: the cross-attention
  probabilities of the colour and shape words (conditional branch, heads averaged, summed over
  the 8x8 and 4x4 layers and all steps), upsampled to 32x32, min-max normalised, thresholded at
  0.5, IoU against the judged mask of the requested object.

Prompts are captions of held-out scenes (`scenes.caption_for`, all phrasings), drawn from seeds
no training step uses. Sampling uses the diffusers pipeline and schedulers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

CFG_SWEEP = (1.5, 3.0, 5.0, 7.5)
EVAL_SEED = 0xE7A1  # numpy SeedSequence([EVAL_SEED, ...]) streams: disjoint from training's integer seeds


@dataclass
class EvalConfig:
    model: str | None = None
    prompts: int | None = None  # per prompt set; default 100 (quick: 6)
    seeds: int | None = None  # images per prompt; default 2 (quick: 1)
    quick: bool = False
    steps: int | None = None  # default 25 (quick: 4)
    eta: float | None = None  # DDIM eta; default 1.0 (ancestral, like ComfyUI's euler_a)
    cfg: float | None = None  # guidance of the main figures; default 3.0
    scheduler: str | None = None  # "ddim" (default), "euler_a", "ddpm"
    clip_sample: int | None = None  # None: as in the model's scheduler config
    thresholding: int | None = None  # Imagen dynamic thresholding (DDIM / DDPM)
    sample_max_value: float | None = None  # its largest s; None: as in the model's scheduler config
    guidance_below: int | None = None  # CFG only at timesteps t < this (limited-interval guidance)
    judge_scenes: int | None = None  # default 500 (quick: 40)
    only: str | None = None  # comma-separated metric names
    threads: int = 2
    batch: int = 64

    def resolved(self) -> EvalConfig:
        q = self.quick
        return EvalConfig(
            model=self.model, quick=q, threads=self.threads, batch=self.batch, only=self.only,
            prompts=self.prompts or (6 if q else 100), seeds=self.seeds or (1 if q else 2),
            steps=self.steps or (4 if q else 25), eta=1.0 if self.eta is None else self.eta,
            cfg=self.cfg or 3.0, scheduler=self.scheduler or "ddim", clip_sample=self.clip_sample,
            thresholding=self.thresholding, sample_max_value=self.sample_max_value,
            guidance_below=self.guidance_below, judge_scenes=self.judge_scenes or (40 if q else 500))


# ----------------------------------------------------------------------------- prompt sets
def _rng(*key):
    return np.random.default_rng([EVAL_SEED, *key])


def prompt_set(kind: str, n: int) -> list[dict]:
    """n prompts: {"prompt", "objects": [(colour, shape)], "style", "mentions_style"}.

    kind "single": one plain object, cycling through every colour x shape; "pair": two different
    plain objects; "style": one object on each style in turn, the caption always naming it.
    """
    from . import scenes as S
    from . import vocab as V

    combos = [(c, s) for c in V.COLOURS for s in V.SHAPES]
    out = []
    for i in range(n):
        rng = _rng({"single": 1, "pair": 2, "style": 3}[kind], i)
        if kind == "single":
            objects = [combos[(i * 7) % len(combos)]]  # 7 is coprime with 40: visits all combos
        else:
            first = combos[int(rng.integers(len(combos)))]
            second = first
            while second == first:
                second = combos[int(rng.integers(len(combos)))]
            objects = [first, second] if kind == "pair" else [first]
        if kind == "style":
            style = V.STYLES[i % len(V.STYLES)]
        else:
            style = "plain" if rng.random() < 0.5 else V.STYLES[1 + int(rng.integers(len(V.STYLES) - 1))]
        caption = S.caption_for(objects, style, rng)
        while kind == "style" and not any(w in caption.split() for w in
                                          (V.STYLE_NOUNS[style], V.STYLE_ADJECTIVES[style])):
            caption = S.caption_for(objects, style, rng)  # plain is named only half of the time
        out.append({"prompt": caption, "objects": objects, "style": style})
    return out


# ----------------------------------------------------------------------------- sampling
def make_scheduler(pipe, cfg: EvalConfig):
    """The sampler of `cfg` built from the model's scheduler config, and its description."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler

    base = dict(pipe.scheduler.config)
    clip = bool(base.get("clip_sample", False)) if cfg.clip_sample is None else bool(cfg.clip_sample)
    thresh = bool(base.get("thresholding", False)) if cfg.thresholding is None else bool(cfg.thresholding)
    if cfg.sample_max_value is not None:
        base["sample_max_value"] = cfg.sample_max_value
    if cfg.scheduler == "ddim":
        sched = DDIMScheduler.from_config(base, clip_sample=clip, thresholding=thresh)
        desc = f"ddim eta={cfg.eta:g}, {cfg.steps} steps"
    elif cfg.scheduler == "ddpm":
        sched = DDPMScheduler.from_config(base, clip_sample=clip, thresholding=thresh)
        desc = f"ddpm, {cfg.steps} steps"
    elif cfg.scheduler == "euler_a":
        sched, clip, thresh = EulerAncestralDiscreteScheduler.from_config(base), False, False
        desc = f"euler_a, {cfg.steps} steps"
    else:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}: ddim, euler_a or ddpm")
    desc += (", x0 clip (noise from the clipped x0)" if cfg.scheduler == "ddim" else ", x0 clip") if clip else ", no x0 clip"
    desc += f", dynamic thresholding (s <= {base.get('sample_max_value', 1.0):g})" if thresh else ""
    desc += f", guidance only at t < {cfg.guidance_below}" if cfg.guidance_below is not None else ""
    return sched, desc


def generate(pipe, prompts: list[str], seeds: list[int], cfg: EvalConfig, guidance: float,
             store: AttentionStore | None = None) -> np.ndarray:
    """uint8 [N, 128, 128, 3], one image per (prompt, seed), in batches of `cfg.batch`."""
    import torch

    images = []
    kwargs = {"eta": cfg.eta} if cfg.scheduler == "ddim" else {}
    first, interval = guidance, {}
    if cfg.guidance_below is not None:
        first, interval = limited_interval(pipe, cfg.steps, guidance, cfg.guidance_below)
    for i in range(0, len(prompts), cfg.batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + cfg.batch]]
        out = pipe(prompts[i:i + cfg.batch], num_inference_steps=cfg.steps, guidance_scale=first,
                   generator=gens, output_type="np", **kwargs, **interval).images
        images.append(np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8))
        if store is not None:
            store.flush()
    return np.concatenate(images)


def limited_interval(pipe, steps: int, guidance: float, below: int):
    """Guidance in a limited interval (Kynkaanniemi et al., NeurIPS 2024): the guidance scale at
    timesteps t < ``below``, none above (at high noise, where the toy model's guided predictions
    overshoot). Returns the first step's scale and the pipeline's ``callback_on_step_end``, which
    sets the next step's. "None" is a scale of 1 + 1e-6, not 1: at exactly 1 the pipeline drops
    its unconditional half mid-run, while its text embeddings stay doubled."""
    import copy

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    scale = lambda t: guidance if t < below else 1.0 + 1e-6  # noqa: E731

    def next_scale(p, i, t, kwargs):
        if i + 1 < len(ts):
            p._guidance_scale = scale(ts[i + 1])
        return kwargs

    return scale(ts[0]), {"callback_on_step_end": next_scale}


class AttentionStore:
    """Word maps of one sampling run: `current[name]` sums [B, Q, K] over the steps of the batch
    being sampled; `flush()` (after each batch) moves it to `done[name]` (a list of batches)."""

    def __init__(self, cfg_batches: bool = True):
        self.cfg_batches = cfg_batches  # batches are [uncond, cond] (guidance > 1)
        self.current: dict = {}
        self.done: dict = {}

    def flush(self):
        for k, v in self.current.items():
            self.done.setdefault(k, []).append(v)
        self.current = {}

    def maps(self) -> dict:
        """layer name -> [N, Q, K] for all images in order."""
        import torch

        return {k: torch.cat(v) for k, v in self.done.items()}


class CrossAttentionRecorder:
    """attn2 processor that computes the attention probabilities explicitly (like diffusers'
    `AttnProcessor`) and adds the conditional half's head-averaged probabilities [B/2, Q, K] to
    `store.current[name]`. Installed on cross-attention layers only."""

    def __init__(self, store: AttentionStore, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, q_len, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*heads, Q, d]
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # [B*heads, Q, K]
        mean = probs.view(b, attn.heads, q_len, -1).mean(1)  # [B, Q, K]
        cond = mean[b // 2:] if self.store.cfg_batches else mean  # CFG batches are [uncond, cond]
        cur = self.store.current
        cur[self.name] = cur.get(self.name, 0) + cond.detach().float()
        out = attn.batch_to_head_dim(probs @ value)  # [B, Q, heads*d]
        return attn.to_out[1](attn.to_out[0](out))


def word_cam_ious(maps: dict, token_ids, objects, judgements, colour_ids: dict, shape_ids: dict) -> dict:
    """IoU per image of the (colour + shape) word map with the judged mask of the object.

    maps: layer name -> [N, Q, K] summed probabilities; token_ids [N, K]. Returns
    {"all": [...], "8x8": [...], "4x4": [...]} (images whose object the judge did not find skip).
    """
    import torch
    import torch.nn.functional as F

    res = {"all": [], "8x8": [], "4x4": []}
    for i, ((colour, shape), j) in enumerate(zip(objects, judgements)):
        found = [o for o in j.objects if o.character is None and o.colour == colour and o.shape == shape]
        if not found:
            continue
        ids = token_ids[i].tolist()
        pos = [ids.index(colour_ids[colour]), ids.index(shape_ids[shape])]
        per_res: dict[str, torch.Tensor] = {}
        for m in maps.values():
            side = int(round(m.shape[1] ** 0.5))
            word = m[i][:, pos].sum(-1).view(1, 1, side, side)
            up = F.interpolate(word, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
            per_res[f"{side}x{side}"] = per_res.get(f"{side}x{side}", 0) + up
        per_res["all"] = sum(v for k, v in per_res.items())
        mask = torch.from_numpy(found[0].mask)
        for k, v in per_res.items():
            v = (v - v.min()) / (v.max() - v.min() + 1e-8)
            pred = v >= 0.5
            if k in res:
                res[k].append(float((pred & mask).sum() / (pred | mask).sum()))
    return res


# ----------------------------------------------------------------------------- metrics
def judge_accuracy(n: int) -> dict:
    """The judge on n held-out rendered scenes at display size (128x128)."""
    from .judge import exact_match, judge
    from .scenes import SceneSampler, upscale_for_display

    sampler = SceneSampler()
    ok = objects_ok = style_ok = 0
    for i in range(n):
        scene = sampler.sample(_rng(9, i))
        j = judge(upscale_for_display(scene.image))
        ok += exact_match(scene, j)
        objects_ok += scene.items() == j.items()
        style_ok += scene.background == j.background
    return {"value": round(ok / n, 4), "objects": round(objects_ok / n, 4), "style": round(style_ok / n, 4),
            "n": n, "sampler": "none (rendered scenes, 1-3 objects, characters, styles)"}


def follow(pipe, prompts: list[dict], cfg: EvalConfig, guidance: float, seeds: int,
           store: AttentionStore | None = None):
    """Generate `seeds` images per prompt and judge them. Returns (images, judgements, rows)."""
    from .judge import judge

    rows = [p for p in prompts for _ in range(seeds)]
    seed_list = [1000 * k + i for i in range(len(prompts)) for k in range(seeds)]
    images = generate(pipe, [r["prompt"] for r in rows], seed_list, cfg, guidance, store)
    return images, [judge(im) for im in images], rows


def score(judgements, rows) -> dict:
    hit = exact = style = 0
    for j, r in zip(judgements, rows):
        want = sorted(f"{c} {s}" for c, s in r["objects"])
        have = [o.label for o in j.objects]
        found = all(w in have for w in want)
        hit += found
        exact += found and sorted(have) == want
        style += j.background == r["style"]
    n = len(rows)
    return {"value": round(hit / n, 4), "exact": round(exact / n, 4), "style": round(style / n, 4), "n_images": n}


def evaluate(cfg: EvalConfig) -> dict:
    """All metrics (or those in `cfg.only`) as one JSON-able dict."""
    import torch

    from . import vocab as V
    from .model import load_toy_pipeline

    cfg = cfg.resolved()
    torch.set_num_threads(cfg.threads)
    only = set(cfg.only.split(",")) if cfg.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    t0 = time.time()
    result: dict = {}
    if want("judge_accuracy"):
        result["judge_accuracy"] = judge_accuracy(cfg.judge_scenes)

    pipe = load_toy_pipeline(cfg.model)
    pipe.scheduler, desc = make_scheduler(pipe, cfg)
    result["model"] = str(cfg.model or "models/toy")
    sampler = lambda g: f"{desc}, cfg {g:g}"  # noqa: E731
    base = {"n_prompts": cfg.prompts, "seeds": cfg.seeds}

    single = prompt_set("single", cfg.prompts)
    if want("prompt_following_single") or want("word_cam_iou"):
        store = AttentionStore(cfg_batches=cfg.cfg > 1)
        originals = dict(pipe.unet.attn_processors)
        pipe.unet.set_attn_processor({k: CrossAttentionRecorder(store, k) if ".attn2." in k else v
                                      for k, v in originals.items()})
        try:
            _, judged, rows = follow(pipe, single, cfg, cfg.cfg, cfg.seeds, store)
        finally:
            pipe.unet.set_attn_processor(originals)
        result["prompt_following_single"] = {**score(judged, rows), **base, "sampler": sampler(cfg.cfg)}
        tok = pipe.tokenizer([r["prompt"] for r in rows], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        vocab = pipe.tokenizer.get_vocab()
        ious = word_cam_ious(store.maps(), tok.input_ids, [r["objects"][0] for r in rows],
                             judged, {c: vocab[c] for c in V.COLOURS}, {s: vocab[s] for s in V.SHAPES})
        result["word_cam_iou"] = {
            "value": round(float(np.mean(ious["all"])), 4) if ious["all"] else None,
            "by_resolution": {k: round(float(np.mean(v)), 4) for k, v in ious.items() if v and k != "all"},
            "n_images": len(ious["all"]), "sampler": sampler(cfg.cfg),
            "note": "colour+shape words, cond branch, heads averaged, all steps, 8x8+4x4 layers, min-max, >=0.5"}
    if want("prompt_following_pair"):
        _, judged, rows = follow(pipe, prompt_set("pair", cfg.prompts), cfg, cfg.cfg, cfg.seeds)
        result["prompt_following_pair"] = {**score(judged, rows), **base, "sampler": sampler(cfg.cfg)}
    if want("prompt_following_by_cfg"):
        by_cfg = {}
        for g in CFG_SWEEP:
            if g == cfg.cfg and "prompt_following_single" in result:
                by_cfg[f"{g:g}"] = result["prompt_following_single"]
                continue
            # one image per prompt at the other scales keeps the default eval near 10 minutes
            _, judged, rows = follow(pipe, single, cfg, g, 1)
            by_cfg[f"{g:g}"] = {**score(judged, rows), **base, "seeds": 1, "sampler": sampler(g)}
        result["prompt_following_by_cfg"] = by_cfg
    if want("style_following"):
        _, judged, rows = follow(pipe, prompt_set("style", cfg.prompts), cfg, cfg.cfg, 1)
        s = score(judged, rows)
        result["style_following"] = {"value": s["style"], "objects_found": s["value"], "n_prompts": cfg.prompts,
                                     "seeds": 1, "sampler": sampler(cfg.cfg)}
    result["seconds"] = round(time.time() - t0, 1)
    return result

