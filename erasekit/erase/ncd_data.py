"""NCD's training data (seed 000, A.2): five-tuples (T_h, I_s, I_h1..3), and a preserve set.

- Harmful images I_h1..3: the base model's own draws of a target prompt T_h, each confirmed by the
  detector (the toy judge finds the target). The paper draws seeds 1-3 of SDXL; here the seeds come
  from a range (4,000,000 up) disjoint from every evaluation seed (the benchmarks use 0-1024).
- Safe image I_s: img2img of a fourth confirmed draw (the paper's seed-4 image) under T_s, T_h with the
  target replaced by the anchor concept (the paper: a GPT-4 rewrite that keeps the context), kept only
  where the judge no longer finds the target and finds the anchor. The anchor defaults to the toy
  concept's safe counterpart ("red circle" -> "green circle", what the trainer page suggests).
- Or the user's pairs: a folder of ``name.png`` (shows the concept) with ``name_safe.png`` (the same
  picture without it), optional ``name_2.png`` / ``name_3.png`` (more harmful pictures of the prompt;
  missing ones repeat ``name.png``) and ``name.txt`` (the prompt; default the target).
- Scores (Eq. 11) and harm scores (NCD-HA, Eq. 19-20) from the detector: safety score 1 where the judge
  does not find the target, else 0; harm score the share of the image the target covers (user pairs: 1).
- The preserve set (only used by ``lambda_prior``, beyond the paper) as INPO's (:mod:`.data`).

Tensors (CPU): latents [N, K, C, h, w] with candidate 0 the safe image, the prompt's embeddings
[N, L, D] and ids [N, L], scores and harm [N, K]; cached in a safetensors file keyed on the inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import ErasekitError
from .data import (
    DataConfig,
    ImageSet,
    _generate,
    _pick,
    _preserve_plan,
    build_preserve_set,
    data_key,
    make_image_set,
    resolve_concept,
)

HARMFUL = 3  # A.2: I_h1..3
IMG2IMG_STRENGTH = 0.9  # toy model, "red circle" -> "green circle", 16 draws: 0.7 kept the red in 8, 0.8 in 3, 0.9 in 2


@dataclass
class NcdDataConfig(DataConfig):
    """:class:`~.data.DataConfig` with NCD's own settings; ``forget_images`` counts tuples here."""

    anchor: str = ""  # what the target becomes in the safe prompt; default: the toy concept's safe counterpart
    img2img_strength: float = IMG2IMG_STRENGTH  # how far the safe image is redrawn from the harmful one (1: anew)


@dataclass
class NcdData:
    target: str
    latents: object  # [N, K, C, h, w]: candidate 0 safe, 1..K-1 harmful
    embeds: object  # [N, L, D] the base text encoder's output for T_h
    ids: object  # [N, L]
    scores: object  # [N, K] safety scores (1: the detector finds no target)
    harm: object  # [N, K] harm scores (NCD-HA's ranking)
    prompts: list
    safe_prompts: list
    pooled: object = None  # [N, P] SDXL
    time_ids: object = None  # [N, 6] SDXL
    preserve: ImageSet | None = None
    preserved: list = field(default_factory=list)
    key: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx) -> dict:
        part = {k: getattr(self, k)[idx] for k in ("latents", "embeds", "ids", "scores", "harm")}
        for key in ("pooled", "time_ids"):
            if getattr(self, key) is not None:
                part[key] = getattr(self, key)[idx]
        return part

    def harmful_set(self) -> ImageSet:
        """The harmful candidates (1..K-1 of every tuple) as an image set under their prompts: the target's
        images where a method needs them one by one (ResAlign's fine-tuning set)."""
        k = self.latents.shape[1] - 1
        rep = {key: None if getattr(self, key) is None else getattr(self, key).repeat_interleave(k, dim=0)
               for key in ("embeds", "ids", "pooled", "time_ids")}
        return ImageSet(self.latents[:, 1:].flatten(0, 1), rep["embeds"], rep["ids"],
                        [p for p in self.prompts for _ in range(k)], None, rep["pooled"], rep["time_ids"])

    def sample(self, generator, batch_size: int) -> dict:
        """``{"tuples": part, "preserve": part}``: ``batch_size`` tuples and as many preserve images."""
        out = {"tuples": self.take(_pick(len(self), batch_size, generator))}
        if self.preserve is not None and len(self.preserve):
            out["preserve"] = self.preserve.take(_pick(len(self.preserve), batch_size, generator))
        return out

    def save(self, path: str) -> str:
        from ..checkpoints import save_file_atomic

        tensors = {f"tuples.{k}": v.contiguous() for k, v in self.take(slice(None)).items()}
        meta = {"target": self.target, "prompts": self.prompts, "safe_prompts": self.safe_prompts,
                "preserved": self.preserved, "key": self.key}
        if self.preserve is not None:
            tensors.update({f"preserve.{k}": v for k, v in self.preserve.take(slice(None)).items()})
            meta["preserve_prompts"] = self.preserve.prompts
        return save_file_atomic(tensors, path, {"erasekit.ncd_data": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> NcdData | None:
        """The cached tuples, or None where the file holds another kind of data (INPO's sets)."""
        from ..checkpoints import load_file

        tensors, meta = load_file(path, "data cache")
        if "erasekit.ncd_data" not in meta:
            return None
        meta = json.loads(meta["erasekit.ncd_data"])
        t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("tuples.")}
        preserve = ImageSet.from_tensors(tensors, "preserve", meta.get("preserve_prompts"))
        return cls(meta["target"], t["latents"], t["embeds"], t["ids"], t["scores"], t["harm"], meta["prompts"],
                   meta["safe_prompts"], t.get("pooled"), t.get("time_ids"), preserve, meta["preserved"], meta["key"])


def build_ncd_data(components, target: str, config: DataConfig | None = None, *, log=print,
                   progress=None) -> NcdData:
    """Five-tuples for erasing ``target`` from ``components`` (see the module docstring), loaded from
    ``config.cache`` where it was made from the same inputs.

    ``progress(done, total)``: images made so far (a float: a batch reports as its sampling goes) out of
    the images to make, 1 + 3 per tuple (a prompt's draws count as if it made a tuple; the judge may then
    drop it, and the count does not go back), then the preserve images; not called for a cached set.

    Raises ErasekitError with one sentence when the model is not the toy model and no pairs are given,
    the folder holds no pair, or no tuple survives the judge."""
    config = config if isinstance(config, NcdDataConfig) else NcdDataConfig(**vars(config or DataConfig()))
    key = data_key(components, target, config, extra=("ncd",))
    if config.cache and os.path.isfile(config.cache):
        data = NcdData.load(config.cache)
        if data is not None and data.key == key:
            log(f"data: {len(data)} tuples, {len(data.preserve or ())} preserve images from {config.cache}")
            return data
    toy = components.is_toy
    concept = resolve_concept(target) if toy else None
    drawn = 0 if config.forget_dir or concept is None else config.forget_images * (HARMFUL + 1)
    total = drawn + (0 if config.preserve_dir else len(_preserve_plan(concept, config)[1]))
    reported = [0.0]

    def tick(offset):  # images ``done`` of a pass whose first image is image ``offset`` of ``total``
        def report(done):
            reported[0] = max(reported[0], min(total, offset + done))
            progress(reported[0], total)

        return None if progress is None else report

    if config.forget_dir:
        images, scores, harm, prompts, safe_prompts, sizes = _read_pairs(components, config.forget_dir, target)
    elif concept is None:
        raise ErasekitError(
            "NCD learns from pictures of the concept paired with the same pictures without it; only the toy model can "
            f"draw and judge them itself. For this model pass --forget-dir with pairs: name.png (shows '{target}'), "
            "name_safe.png (the same picture without it), optionally name_2.png / name_3.png (more pictures of "
            "the prompt) and name.txt (the prompt).")
    else:
        images, scores, harm, prompts, safe_prompts = _generate_tuples(components, concept, config, log, tick(0))
        sizes = None
    n, k = len(prompts), images.shape[0] // max(len(prompts), 1)
    flat = make_image_set(components, images, [p for p in prompts for _ in range(k)],
                          sizes=[s for s in sizes for _ in range(k)] if sizes else None)
    take = slice(None, None, k)  # one caption per tuple
    data = NcdData(target, flat.latents.view(n, k, *flat.latents.shape[1:]), flat.embeds[take], flat.ids[take], scores,
                   harm, prompts, safe_prompts, None if flat.pooled is None else flat.pooled[take],
                   None if flat.time_ids is None else flat.time_ids[take], key=key)
    data.preserve, data.preserved = build_preserve_set(components, concept, config, tick(drawn))
    log(f"data: {n} tuples of '{target}' (1 safe + {k - 1} harmful images each), {len(data.preserve or ())} "
        f"preserve images of {len(data.preserved)} concepts")
    if config.cache:
        data.save(config.cache)
    return data


def anchor_of(concept, anchor: str = "") -> str:
    """The anchor phrase (no article): ``anchor`` as given, or the toy concept's safe counterpart."""
    text = (anchor or concept.safe_rewrite().text).strip()
    for article in ("a ", "an ", "the "):
        if text.lower().startswith(article):
            return text[len(article):].strip()
    return text


def safe_prompt(prompt: str, concept, anchor: str) -> str:
    """T_s: T_h with the target's words replaced by the anchor's, the rest kept ("a red circle and a
    blue star" -> "a green circle and a blue star")."""
    if concept.text not in prompt:
        raise ErasekitError(f"The prompt '{prompt}' does not name '{concept.text}', so it has no safe rewrite; "
                            "give prompts that name the concept.")
    return prompt.replace(concept.text, anchor)


def _generate_tuples(components, concept, config: NcdDataConfig, log, progress=None):
    """Toy model: tuples of 1 safe + 3 harmful images, judged. Returns images [N K, 3, H, W], scores and
    harm [N, K], prompts and safe prompts. ``progress(images)``: the images of the tuples kept so far,
    a chunk being drawn counting as if each prompt it still needs made one."""
    import torch

    from ..toyworld.concepts import concept_mask, concept_prompts
    from ..toyworld.judge import judge
    from ..toyworld.vocab import parse_concept

    anchor = anchor_of(concept, config.anchor)
    try:
        anchor_concept = parse_concept(anchor)
    except ValueError:
        anchor_concept = None  # free text: only the target's absence is checked
    n, need = config.forget_images, HARMFUL + 1
    candidates = config.forget_prompts or concept_prompts(concept, n * config.max_tries, 0, config.seed)[0]
    candidates = [candidates[i % len(candidates)] for i in range(n * config.max_tries)]
    draws_per_prompt = need + 1  # one spare: a prompt is kept when `need` of its draws show the target

    def judged(image):
        mask = concept_mask(judge(image.permute(1, 2, 0).numpy()), concept)
        return float(mask.mean())  # harm score: the share of the image the target covers (0: absent)

    tuples, tried, drawn, confirmed = [], 0, 0, 0
    while len(tuples) < n and tried < len(candidates):
        chunk = candidates[tried:tried + 2 * (n - len(tuples))]
        base = 4_000_000 + config.seed * 100_003
        prompts = [p for p in chunk for _ in range(draws_per_prompt)]
        seeds = [base + (tried + i) * draws_per_prompt + j for i in range(len(chunk)) for j in range(draws_per_prompt)]
        found, expect, count = len(tuples), min(len(chunk), n - len(tuples)), len(prompts)
        on_draw = None if progress is None else (lambda done, found=found, expect=expect, count=count: progress(
            need * (found + expect * done / count)))
        images = _generate(components, prompts, seeds, config, on_draw)
        drawn += len(images)
        ready = []
        for i, prompt in enumerate(chunk):
            rows = [(img, judged(img)) for img in images[i * draws_per_prompt:(i + 1) * draws_per_prompt]]
            hits = [(img, h) for img, h in rows if h > 0][:need]
            confirmed += len(hits)
            if len(hits) == need:
                ready.append((prompt, tried + i, hits))
        tried += len(chunk)
        if not ready:
            continue
        # I_s: img2img of the fourth confirmed draw under T_s; kept where the target is gone and the anchor there
        safe_texts = [safe_prompt(p, concept, anchor) for p, _, _ in ready]
        from ..dag.sampling import sample

        sources = torch.stack([hits[-1][0] for _, _, hits in ready])
        safe_seeds = [5_000_000 + config.seed * 100_003 + idx for _, idx, _ in ready]
        safe = torch.cat([sample(components, safe_texts[s:s + config.batch], safe_seeds[s:s + config.batch],
                                 steps=config.sample_steps, cfg=config.sample_cfg,
                                 init_images=sources[s:s + config.batch], strength=config.img2img_strength).images
                          for s in range(0, len(ready), config.batch)])
        for (prompt, _, hits), text, img in zip(ready, safe_texts, safe):
            j = judge(img.permute(1, 2, 0).numpy())
            if concept_mask(j, concept).any() or (anchor_concept is not None and not anchor_concept.matches(j)):
                continue
            tuples.append((prompt, text, img, hits[:HARMFUL]))
        if progress is not None:
            progress(need * min(n, len(tuples)))
    tuples = tuples[:n]
    log(f"data: {drawn} draws of {tried} prompts, {confirmed} showed '{concept.text}'; {len(tuples)} tuples kept "
        f"(safe image: img2img at strength {config.img2img_strength} to '{anchor}', judged)")
    if not tuples:
        raise ErasekitError(
            f"No NCD tuple of '{concept.text}' survived the judge ({drawn} draws of {tried} prompts, {confirmed} showed the "
            f"concept): either the model does not draw it, or img2img to '{anchor}' kept it; raise --max-tries or the "
            "img2img strength, pick another anchor, or supply pairs with --forget-dir.")
    images = torch.stack([img for _, _, safe, hits in tuples for img in [safe] + [h for h, _ in hits]])
    harm = torch.tensor([[0.0] + [h for _, h in hits] for *_, hits in tuples])
    scores = (harm == 0).float()
    return images, scores, harm, [t[0] for t in tuples], [t[1] for t in tuples]


def _read_pairs(components, folder: str, target: str):
    """The user's pairs (see the module docstring): images [N K, 3, S, S], scores, harm, prompts, safe
    prompts (the captions: the user's safe picture has no caption of its own), SDXL size ids."""
    import re

    import torch

    from .images import IMAGE_EXTENSIONS, read_folder

    pictures = read_folder(components, folder, masks=False, caption=target)
    files = {f.lower(): f for f in os.listdir(folder)}
    names = sorted(f for low, f in files.items() if low.endswith(IMAGE_EXTENSIONS)
                   and not os.path.splitext(low)[0].endswith("_mask"))  # read_folder's order
    index = {os.path.splitext(name)[0].lower(): i for i, name in enumerate(names)}
    stems = [s for s in index if not s.endswith("_safe") and not re.search(r"_[23]$", s)]
    pairs = [s for s in stems if s + "_safe" in index]
    if not pairs:
        raise ErasekitError(f"The folder '{folder}' holds no NCD pair: put each picture of the concept as name.png "
                            "beside the same picture without it as name_safe.png.")
    images, sizes, prompts = [], [], []
    for stem in pairs:
        harmful = [index[stem]] + [index[f"{stem}_{j}"] for j in (2, 3) if f"{stem}_{j}" in index]
        rows = [index[stem + "_safe"]] + [harmful[i % len(harmful)] for i in range(HARMFUL)]
        images += [pictures.images[i] for i in rows]
        sizes += [pictures.sizes[index[stem]]]
        prompts.append(pictures.captions[index[stem]])
    scores = torch.tensor([[1.0] + [0.0] * HARMFUL] * len(pairs))
    harm = 1 - scores
    return torch.stack(images), scores, harm, prompts, list(prompts), sizes
