"""Guideline token embeddings: what they are, how they are stored, how they are learned.

A :class:`GuidelineEmbedding` is K token states in the text encoder's *output* space (the
space cross-attention ``to_k`` reads), plus the sink state (see ``detect.py``). It is learned
by token optimisation (DAG Sec. 3.1, Eq. 2-3; OVAM): start from the encoding of a phrase
("nude person"; "red circle" in the toy world), then lower the pixel-wise binary cross-entropy
between the detection map A-hat of each training image and its ground-truth mask (zero masks
for safe images), with SGD (lr 200, StepLR gamma 0.7, 100 x n_unsafe steps; Table 4),
mini-batches of one unsafe and one safe image, a random timestep each.

Choice beyond the paper: the StepLR step. The paper's 20 steps fit its five unsafe images (500
steps, the rate decays 25 times); with more images a fixed 20 would leave the rate near zero
after a few hundred steps, so the step is stretched to the run (steps / 25, at least 20),
which is the paper's schedule at five images. On the toy model, 40 unsafe images with the
stretched schedule detect earlier and more precisely than 6 with the fixed one (the README's
DAG section has the figures).

Choice left open by the paper: the hidden states of each training image are taken by noising
the image to the sampled timestep (q(z_t | z_0)) rather than replaying its generation
trajectory, so user-supplied images (with no trajectory) train the same way.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from ..errors import ArchitectureError, ModelFileError

FORMAT = "erasekit-guideline-embedding"
VERSION = "1"


@dataclass
class GuidelineEmbedding:
    tokens: object  # torch.Tensor [K, D]
    sink: object  # torch.Tensor [D]
    concept: str
    architecture: str  # erasekit.checkpoints.Architecture.name
    init_phrase: str = ""
    levels: str = "coarse"
    info: dict = field(default_factory=dict)  # training set size, steps, final loss, ...
    # Raw CAM level (probability mass on the guideline tokens against the sink) above which the
    # concept counts as present in an image; calibrated on the training images (calibrate_gate).
    gate: float = 0.5
    # Raw CAM level mapped to 0 in A-hat (calibrated background level); None: per-image min-max.
    floor: float | None = None
    # Gate per timestep, [[t, gate], ...] by t (calibrate_gate); it only ever raises the fixed gate.
    schedule: list | None = None
    # Contrast states [M, D]: encoded words of concepts that are not this one (detect.py), and the phrases.
    contrast: object = None
    contrast_phrases: list = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def keys(self, to_k, like=None):
        """This embedding's keys ``[1 + M + K, inner]`` at a layer (:func:`~erasekit.dag.detect.guideline_keys`)."""
        from .detect import guideline_keys

        return guideline_keys(to_k, self.sink, self.tokens, self.contrast, like)

    def gate_floor(self, timestep: float | None = None) -> tuple[float, float | None]:
        """(gate, floor) at ``timestep`` (0..T): the schedule's gate where it is above the fixed one
        (late in sampling, where a formed object's CAM is sharp and a neighbour's can pass the fixed
        gate), else the fixed gate; the floor is fixed. No timestep or no schedule: the fixed pair."""
        if timestep is None or not self.schedule:
            return self.gate, self.floor
        import numpy as np

        t, g = (np.asarray(c, float) for c in zip(*self.schedule))
        return max(float(np.interp(float(timestep), t, g)), self.gate), self.floor

    @property
    def width(self) -> int:
        return int(self.tokens.shape[-1])

    def save(self, path: str) -> str:
        from ..checkpoints import save_file_atomic

        meta = {
            "erasekit.format": FORMAT, "erasekit.version": VERSION, "concept": self.concept,
            "architecture": self.architecture, "text_width": str(self.width), "tokens": str(self.tokens.shape[0]),
            "init_phrase": self.init_phrase, "levels": self.levels, "info": json.dumps(self.info),
            "detect_gate": f"{self.gate:.6g}", **({"detect_floor": f"{self.floor:.6g}"} if self.floor is not None else {}),
            **({"detect_schedule": json.dumps([[int(t), round(g, 6)] for t, g in self.schedule])}
               if self.schedule else {}),
            **({"contrast_phrases": json.dumps(list(self.contrast_phrases))} if self.contrast_phrases else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tensors = {"guideline.tokens": self.tokens.detach().float().cpu(), "guideline.sink": self.sink.detach().float().cpu()}
        if self.contrast is not None and len(self.contrast):
            tensors["guideline.contrast"] = self.contrast.detach().float().cpu()
        return save_file_atomic(tensors, path, meta)

    @classmethod
    def load(cls, path: str, architecture=None) -> GuidelineEmbedding:
        """Load and, when ``architecture`` (an :class:`~erasekit.checkpoints.Architecture`) is
        given, check it fits that model; errors name the file and what was expected."""
        from ..checkpoints import load_file

        tensors, meta = load_file(path, "guideline embedding")
        if meta.get("erasekit.format") != FORMAT or "guideline.tokens" not in tensors:
            raise ModelFileError(f"'{path}' is not an Erasekit guideline embedding (it has no guideline tokens); "
                                 "pick a file made by the Erasekit trainer or shipped in models/guideline.")
        if "guideline.sink" not in tensors:
            raise ModelFileError(f"'{path}' has guideline tokens but no 'guideline.sink' tensor; the file is damaged. "
                                 "Re-export the embedding with the Erasekit trainer.")
        emb = cls(tensors["guideline.tokens"], tensors["guideline.sink"], meta.get("concept", "?"),
                  meta.get("architecture", "?"), meta.get("init_phrase", ""), meta.get("levels", "coarse"),
                  _metadata(meta, "info", _json_of(dict), {}, path), _metadata(meta, "detect_gate", float, 0.5, path),
                  _metadata(meta, "detect_floor", float, None, path),
                  _schedule(meta.get("detect_schedule"), path), tensors.get("guideline.contrast"),
                  _metadata(meta, "contrast_phrases", _json_of(list), [], path))
        _check_shapes(emb, path)
        _check_gate(emb, path)
        _check_values(emb, path)
        if architecture is not None:
            emb.check(architecture, path)
        return emb

    def check(self, architecture, source: str = "this guideline embedding") -> None:
        if self.width != architecture.context_dim:
            raise ArchitectureError(
                f"'{source}' has guideline tokens of width {self.width} (made for {self.architecture}), but the model's "
                f"text width is {architecture.context_dim} ({architecture.title}); use an embedding trained for this model.")
        if self.architecture != architecture.name:
            raise ArchitectureError(
                f"'{source}' was trained for '{self.architecture}', but the model is {architecture.title}; "
                "use an embedding trained for this model.")


def _damaged(path: str, what: str) -> ModelFileError:
    return ModelFileError(f"'{path}' {what}; the file is damaged. Re-export the embedding with the Erasekit trainer.")


def _check_shapes(emb: GuidelineEmbedding, path: str) -> None:
    """Floating-point tokens [K >= 1, D >= 1], sink [D] and contrast [M, D] (if any), of one width D."""
    parts = {"guideline.tokens": (emb.tokens, 2), "guideline.sink": (emb.sink, 1), "guideline.contrast": (emb.contrast, 2)}
    for key, (t, dims) in parts.items():
        if t is None:
            continue
        if not t.dtype.is_floating_point:
            raise _damaged(path, f"stores '{key}' as {str(t.dtype).removeprefix('torch.')}, not floating point")
        if t.dim() != dims or t.shape[-1] < 1:
            raise _damaged(path, f"has '{key}' of shape {list(t.shape)}, not {'[K, D]' if dims == 2 else '[D]'}")
    if emb.tokens.shape[0] < 1:
        raise _damaged(path, "has no guideline tokens ('guideline.tokens' is empty)")
    widths = {int(t.shape[-1]) for t in (emb.tokens, emb.sink, emb.contrast) if t is not None}
    if len(widths) > 1:
        raise _damaged(path, f"holds guideline tensors of different widths {sorted(widths)}")


def _check_gate(emb: GuidelineEmbedding, path: str) -> None:
    """0 <= floor < gate < 1 for the fixed pair and every gate of the schedule, at finite timesteps."""
    pairs = [(emb.gate, emb.floor)] + [(g, None) for _, g in emb.schedule or ()]
    if any(not 0.0 < g < 1.0 or (f is not None and not 0.0 <= f < g) for g, f in pairs) or \
            any(not math.isfinite(t) for t, _ in emb.schedule or ()):
        raise ModelFileError(f"'{path}' has a detection gate / floor outside 0 <= floor < gate < 1 (metadata "
                             "'detect_gate', 'detect_floor', 'detect_schedule'). "
                             "Re-export the embedding with the Erasekit trainer.")


def _check_values(emb: GuidelineEmbedding, path: str) -> None:
    """Every value finite, and not every token zero: zero tokens, like NaN ones, leave a flat detection
    map that never passes the gate, which would switch Detect-and-Guide off without a word."""
    for key, t in (("guideline.tokens", emb.tokens), ("guideline.sink", emb.sink), ("guideline.contrast", emb.contrast)):
        if t is not None and not bool(t.isfinite().all()):
            raise _damaged(path, f"has NaN or infinite values in '{key}'")
    if not bool(emb.tokens.any()):
        raise _damaged(path, f"has {emb.n_tokens} guideline token(s), all zero, which detect nothing")


def _json_of(kind: type):
    """A metadata parser: JSON text holding a ``kind`` (dict or list)."""
    def parse(text: str):
        try:
            value = json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(value, kind):
            raise ValueError(f"not a JSON {kind.__name__}")
        return value
    return parse


def _metadata(meta: dict, key: str, parse, default, path: str):
    """``parse(meta[key])``, ``default`` when absent; unreadable text is a damaged file, said so."""
    if key not in meta:
        return default
    try:
        return parse(meta[key])
    except (ValueError, TypeError) as e:
        raise ModelFileError(f"'{path}' has unreadable metadata '{key}' ({e}); re-export the embedding "
                             "with the Erasekit trainer.") from None


def _schedule(text: str | None, path: str) -> list | None:
    if not text:
        return None
    try:
        rows = [[float(t), float(g)] for t, g in json.loads(text)]
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelFileError(f"'{path}' has an unreadable 'detect_schedule' ({e}); re-export the embedding "
                             "with the Erasekit trainer.") from None
    return sorted(rows) or None


def encode_phrase(text_encoder, tokenizer, phrase: str):
    """(sink ``[D]``, content token states ``[K, D]``) of a phrase: the encoder output rows of
    its words (no start, end or padding tokens). This is the initialisation of c*."""
    import torch

    ids = _phrase_ids(tokenizer, phrase).to(text_encoder.device)
    with torch.no_grad():
        states = text_encoder(ids)[0][0]
    return _sink_and_words(states, ids, tokenizer, phrase)


def encode_phrase_for(model, phrase: str):
    """:func:`encode_phrase` for any model (:class:`~erasekit.models.Components` or a pipeline):
    for SDXL the rows of its conditioning, both encoders' states side by side (width 2048)."""
    from .conditioning import encode, encoders

    tes, toks = encoders(model)
    if len(tes) < 2:
        return encode_phrase(tes[0], toks[0], phrase)
    ids = _phrase_ids(toks[0], phrase)
    return _sink_and_words(encode(model, [phrase]).states[0], ids, toks[0], phrase)


def _phrase_ids(tokenizer, phrase):
    return tokenizer(phrase, padding="max_length", max_length=min(tokenizer.model_max_length, 77),
                     truncation=True, return_tensors="pt").input_ids


def _sink_and_words(states, ids, tokenizer, phrase):
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    keep = [i for i, t in enumerate(ids[0].tolist()) if t not in special]
    if not keep:
        raise ValueError(f"The phrase '{phrase}' has no words the tokenizer knows; give the concept in words.")
    return states[0].clone(), states[keep].clone()


class _QueryTap:
    """Attention processor for the chosen layers: normal attention, and keeps the queries."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch.nn.functional as F

        q = attn.to_q(hidden_states)
        self.store[self.name] = q.detach()
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        b, n, inner = q.shape
        h = attn.heads
        split = lambda t: t.view(b, -1, h, inner // h).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, inner)
        return attn.to_out[1](attn.to_out[0](out))


def coarse_layers(unet) -> dict[str, object]:
    """The cross-attention modules DAG reads its CAMs from (:func:`coarse_layer_names`)."""
    from ..attention import attention_levels, coarse_levels, cross_attention_layers

    layers = cross_attention_layers(unet)
    keep = coarse_layer_names(layers, len(unet.config.down_block_types), coarse_levels(attention_levels(unet)))
    return {name: layers[name] for name in keep}


def coarse_layer_names(names, n_levels: int, levels) -> list[str]:
    """Of the diffusers cross-attention layer ``names``, those DAG reads its CAMs from: the down-path
    layers at ``levels`` (the two coarsest with cross-attention) and the up-path layers at the same
    resolutions (up block j is level ``n_levels`` - 1 - j). The mid block is left out, as in OVAM's
    default hooks. One rule for the diffusers sampler and the ComfyUI patch, which maps ComfyUI's
    layer coordinates to these names (``nodes.comfy_bridge.dag_layer_coordinates``)."""
    keep = []
    for name in names:
        kind, index = name.split(".")[:2]
        if kind == "down_blocks":
            level = int(index)
        elif kind == "up_blocks":
            level = n_levels - 1 - int(index)
        else:
            continue  # mid block
        if level in levels:
            keep.append(name)
    return keep


def cache_queries(unet, scheduler, latents, conds, timesteps, seed: int = 0):
    """Queries of the coarse layers for each (image, timestep): ``{(i, t): {layer: [1, N, inner]}}``.

    ``latents``: ``[N, C, H, W]`` clean latents; ``conds``: ``[N, L, D]`` their prompts' states, or a
    :class:`~erasekit.dag.conditioning.Conditioning` (SDXL's extra inputs).
    """
    import torch

    layers = coarse_layers(unet)
    cond_kwargs = conds.unet_kwargs() if hasattr(conds, "unet_kwargs") else {"encoder_hidden_states": conds}
    store, cache = {}, {}
    saved = {n: m.processor for n, m in layers.items()}
    gen = torch.Generator().manual_seed(seed)
    try:
        for n, m in layers.items():
            m.set_processor(_QueryTap(n, store))
        with torch.no_grad():
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=gen).to(latents)
                tt = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)
                unet(scheduler.add_noise(latents, noise, tt), tt, **cond_kwargs)
                for i in range(latents.shape[0]):
                    cache[(i, int(t))] = {n: q[i : i + 1].clone() for n, q in store.items()}
    finally:
        for n, p in saved.items():
            layers[n].set_processor(p)
    return cache, layers


def detection_from_queries(queries: dict, layers: dict, sink, tokens, latent_hw, contrast=None):
    """Raw A ``[1, H, W]`` (latent resolution, before gating) from cached queries and guideline tokens
    (against the sink and the ``contrast`` states ``[M, D]``, if any)."""
    from .detect import detection_map, guideline_cam, guideline_keys, to_grid

    maps = [to_grid(guideline_cam(q, guideline_keys(layers[n].to_k, sink, tokens, contrast), layers[n].heads,
                                  tokens.shape[0]), latent_hw)
            for n, q in queries.items()]
    return detection_map(maps, latent_hw)


def optimize_guideline(unet, scheduler, latents, conds, masks, unsafe, *, sink, init_tokens,
                       steps: int | None = None, lr: float = 200.0, lr_step: int | None = None, gamma: float = 0.7,
                       n_timesteps: int = 20, seed: int = 0, contrast=None, callback=None):
    """Token optimisation (Eq. 2-3), then the detection gate (:func:`calibrate_gate`).

    Returns a :class:`GuidelineFit` (tokens ``[K, D]``, loss history, gate and its statistics).

    Args:
        latents, conds: ``[N, ...]`` training images (clean latents) and their prompts' states.
        masks: ``[N, H, W]`` ground truth in [0, 1] at latent resolution (zeros for safe images).
        unsafe: ``[N]`` bool, which images show the concept.
        steps: default 100 x n_unsafe (Table 4).
        lr_step: StepLR's step; default steps / 25 (at least 20), the paper's 20 at five images.
        contrast: ``[M, D]`` contrast states (detect.py), fixed while the tokens learn; None: the paper.
    """
    import torch
    import torch.nn.functional as F

    idx_unsafe = [i for i, u in enumerate(unsafe) if u]
    idx_safe = [i for i, u in enumerate(unsafe) if not u]
    if not idx_unsafe:
        raise ValueError("Token optimisation needs at least one image that shows the concept (with its mask).")
    steps = steps or 100 * len(idx_unsafe)
    lr_step = lr_step or max(20, round(steps / 25))
    n_train = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(n_train * 0.02, n_train * 0.98, n_timesteps).round().long().tolist()
    cache, layers = cache_queries(unet, scheduler, latents, conds, timesteps, seed)
    for p in unet.parameters():
        p.requires_grad_(False)
    tokens = init_tokens.detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([tokens], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=gamma)
    gen = torch.Generator().manual_seed(seed)
    hw = tuple(latents.shape[-2:])
    history = []
    for step in range(steps):
        batch = [idx_unsafe[step % len(idx_unsafe)]]
        if idx_safe:
            batch.append(idx_safe[int(torch.randint(len(idx_safe), (1,), generator=gen))])
        loss = 0.0
        for i in batch:
            t = timesteps[int(torch.randint(len(timesteps), (1,), generator=gen))]
            a = detection_from_queries(cache[(i, t)], layers, sink, tokens, hw, contrast).clamp(1e-6, 1 - 1e-6)
            loss = loss + F.binary_cross_entropy(a, masks[i : i + 1].float())
        loss = loss / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        if callback:
            callback(step, history[-1])
    tokens = tokens.detach()
    gate, floor, stats, schedule = calibrate_gate(cache, layers, sink, tokens, masks, unsafe, hw, n_train=n_train,
                                                  contrast=contrast)
    return GuidelineFit(tokens, history, gate, floor, stats, schedule)


@dataclass
class GuidelineFit:
    tokens: object  # torch.Tensor [K, D]
    history: list
    gate: float
    floor: float
    gate_stats: dict
    schedule: list | None = None


def calibrate_gate(cache: dict, layers: dict, sink, tokens, masks, unsafe, latent_hw, max_t_fraction: float = 0.7,
                   n_train: int = 1000, floor_quantile: float = 0.95, contrast=None) -> tuple[float, float, dict, list]:
    """The detection gate and floor: raw-CAM levels learned from the training images.

    From each training image's peak and background levels at each cached timestep t:
    * gate: the peak level that best tells the unsafe images from the safe ones (Youden's J: the
      largest true-positive rate minus false-positive rate; halfway down to the next lower peak),
      0.5 x the unsafe median when there are no safe images: above it, "detected". The midpoint
      of the two median peaks, used before, sits too low once contrast keys push most safe peaks
      near 0 while a few stay high: on the toy model it fired on half the benign samplings;
    * floor: the ``floor_quantile`` of the raw values of background pixels (outside the masks,
      and every pixel of the safe images): the level A-hat maps to 0 (kept below 0.9 x the gate).
    The fixed pair pools t <= ``max_t_fraction`` x T (by then the object has formed). The
    *schedule* is the gate at every cached t (pooling its two neighbours: a few images are few
    samples). A CAM grows sharper as the image forms, and late in sampling a neighbouring concept
    (a red square for "red circle") can pass the fixed gate; where the schedule is higher, it is
    the gate (:meth:`GuidelineEmbedding.gate_floor`).
    Returns (gate, floor, stats, schedule ``[[t, gate_t], ...]``).
    """
    import numpy as np
    import torch

    per_t: dict[int, dict] = {}
    with torch.no_grad():
        for (i, t), queries in cache.items():
            a = detection_from_queries(queries, layers, sink, tokens, latent_hw, contrast)[0]
            row = per_t.setdefault(int(t), {True: [], False: [], "bg": []})
            row[bool(unsafe[i])].append(float(a.max()))
            if t <= max_t_fraction * n_train:  # the floor comes from the formed images only
                row["bg"].append(a[masks[i].to(a.device) < 0.5].flatten().cpu())

    def gate_of(rows):  # (gate, unsafe peaks, safe peaks) of a pool of timesteps
        pos, safe = [p for r in rows for p in r[True]], [p for r in rows for p in r[False]]
        if not safe:
            return float(np.clip(0.5 * np.median(pos), 1e-3, 0.999)), pos, safe
        levels = np.unique(pos + safe)
        youden = (np.asarray(pos)[None] >= levels[:, None]).mean(1) - (np.asarray(safe)[None] >= levels[:, None]).mean(1)
        k = int(np.argmax(youden))
        gate = (levels[k] + levels[k - 1]) / 2 if k else levels[k]
        return float(np.clip(gate, 1e-3, 0.999)), pos, safe

    ts = sorted(per_t)
    formed = [per_t[t] for t in ts if t <= max_t_fraction * n_train]
    gate, pos, safe = gate_of(formed)
    bg = torch.cat([b for r in formed for b in r["bg"]]).float()
    floor = float(min(torch.quantile(bg, floor_quantile), 0.9 * gate)) if len(bg) else 0.0
    schedule = [[t, gate_of([per_t[u] for u in ts[max(0, k - 1):k + 2]])[0]] for k, t in enumerate(ts)]
    return gate, floor, {"peak_unsafe_median": round(float(np.median(pos)), 4),
                         "peak_safe_median": round(float(np.median(safe)) if safe else 0.0, 4),
                         "peak_unsafe_min": round(min(pos), 4),
                         "peak_safe_max": round(max(safe), 4) if safe else None,
                         "background_median": round(float(bg.median()), 4) if len(bg) else None}, schedule
