"""ResAlign's data and starting point: the simulated fine-tuning set D_FT (B.4: benign images plus some of
the target's) and "harden this LoRA" (an existing erasure LoRA copied into the trained adapter)."""

from __future__ import annotations

from ..errors import ErasekitError


def finetune_set(components, data, cfg, seed: int = 0):
    """D_FT (B.4) for a ``ResAlignConfig``: benign images plus ``finetune_target_share`` of forget images (NCD's
    tuples: of their harmful candidates). On the toy model
    the benign ones are rendered scenes without the target (seeds far from the benchmarks'); else
    the images of ``finetune_dir`` (with .txt captions)."""
    from .data import ImageSet, make_image_set

    n = int(cfg.finetune_images)
    harmful = data.forget if hasattr(data, "forget") else data.harmful_set()  # NCD's tuples: their harmful candidates
    n_target = min(int(round(n * cfg.finetune_target_share)), len(harmful)) if n else 0
    toy = components.is_toy
    if cfg.finetune_dir:
        from .images import read_folder

        images, _, prompts, _, sizes = read_folder(components, cfg.finetune_dir, masks=False, caption="")
        benign = make_image_set(components, images, prompts, sizes=sizes)
    elif toy:
        benign = _rendered_benign(components, data.target, n - n_target, seed)
    else:
        raise ErasekitError("ResAlign needs fine-tuning images for this model: set finetune_dir to a folder of "
                            "images (with .txt captions) like those users would fine-tune on.")
    if not n_target:
        return benign
    idx = list(range(n_target))
    target = harmful.take(idx)
    keys = ("latents", "embeds", "ids", "pooled", "time_ids")
    import torch

    cat = {k: torch.cat([getattr(benign, k), target[k]]) for k in keys if getattr(benign, k) is not None and k in target}
    return ImageSet(cat["latents"], cat["embeds"], cat["ids"], list(benign.prompts) + [harmful.prompts[i] for i in idx],
                    None, cat.get("pooled"), cat.get("time_ids"))


def _rendered_benign(components, target: str, n: int, seed: int):
    """n rendered toy scenes in which ``target`` does not appear (exact labels: no judge needed)."""
    import torch

    from ..toyworld.scenes import upscale_for_display
    from .data import make_image_set

    scenes = benign_scenes(target, n, 7_000_000 + seed)  # the benchmarks draw from other seeds
    images = torch.stack([torch.from_numpy(upscale_for_display(s.image)).permute(2, 0, 1).float() / 255 for s in scenes])
    return make_image_set(components, images, [s.caption for s in scenes])


def benign_scenes(target: str, n: int, seed: int) -> list:
    """n toy scenes (``toyworld.scenes.Scene``) drawn from ``seed`` in which ``target`` does not appear."""
    import numpy as np

    from ..toyworld.concepts import concept_mask
    from ..toyworld.scenes import SceneSampler
    from .data import resolve_concept

    concept = resolve_concept(target)
    rng, scenes = np.random.default_rng(seed), []
    sampler = SceneSampler()
    while len(scenes) < n:
        s = sampler.sample(rng)
        if not concept_mask(s, concept).any():
            scenes.append(s)
    return scenes


def lora_layout(path: str) -> dict:
    """The ``targets`` and ``rank`` a run needs to continue an erasure LoRA file ("harden this LoRA"):
    its UNet layers as peft module-name suffixes (the part after ``transformer_blocks.<i>.``, else the
    whole name) and its rank. Refused with one sentence when the file has no UNet layers or mixes ranks."""
    import re

    from ..lora_io import load_lora

    lora, _ = load_lora(path)
    layers = {k.removeprefix("unet."): w for k, w in lora.items() if k.startswith("unet.")}
    if not layers:
        raise ErasekitError(f"The LoRA '{path}' changes no UNet layer; ResAlign hardens UNet erasure LoRAs.")
    ranks = sorted({w.rank for w in layers.values()})
    if len(ranks) > 1:
        raise ErasekitError(f"The LoRA '{path}' mixes ranks {ranks}; ResAlign continues a LoRA of one rank.")
    suffixes = sorted({re.split(r"transformer_blocks\.\d+\.", name)[-1] for name in layers})
    return {"targets": ",".join(suffixes), "rank": ranks[0]}


def load_into(path: str, trainable: dict, train_config) -> int:
    """Copy an erasure LoRA file (kohya or PEFT) into the trainable adapter, as the same weight
    change at this run's scale (alpha / rank); the ranks and layers must be the run's own."""
    from ..lora_io import load_lora

    lora, _ = load_lora(path)
    scale = (train_config.alpha or train_config.rank) / train_config.rank
    layers = sorted({k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in trainable if ".lora_A." in k})
    wanted = {f"unet.{name}" for name in layers}
    theirs = {k for k in lora if k.startswith("unet.")}
    if theirs != wanted:
        missing, extra = sorted(wanted - theirs)[:2], sorted(theirs - wanted)[:2]
        raise ErasekitError(f"The LoRA '{path}' changes other layers than this run trains (missing {missing}, extra "
                            f"{extra}); set --targets to the layers it was trained on.")
    import torch

    with torch.no_grad():
        for name in layers:
            w = lora[f"unet.{name}"]
            a, b = trainable[f"unet.{name}.lora_A.default.weight"], trainable[f"unet.{name}.lora_B.default.weight"]
            if w.rank != a.shape[0]:
                raise ErasekitError(f"The LoRA '{path}' has rank {w.rank}, this run {a.shape[0]}; set --rank {w.rank}.")
            a.copy_(w.down.reshape(a.shape).to(a))
            b.copy_((w.up * (w.alpha / w.rank) / scale).reshape(b.shape).to(b))
    return len(layers)
