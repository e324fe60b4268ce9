"""Does an erasure LoRA stop real ComfyUI from drawing the concept? The toy judge counts.

    python -m tools.erase_check_comfy LORA.safetensors --target "red circle" --prompts 40 --json

For each prompt (the target alone and with other objects and styles, and preservation prompts
that never name it; the same prompt sets as ``python -m erasekit.bench erase``) one ComfyUI
graph samples the same seed twice: Load Erasure LoRA at strength 0 (the base model) and at 1.
The graph is what a user builds (loader -> Load Erasure LoRA -> CLIPTextEncode -> KSampler ->
VAEDecode), run by ComfyUI's own executor on the CPU. Prints one JSON line:
``comfyui_targets_before`` / ``_after`` (fraction of target prompts whose image shows the target),
``comfyui_erase_rate`` (1 - after / before, on the images that showed it before) and
``comfyui_preservation`` (the non-target objects the prompts ask for that the judge finds, after /
before) and ``comfyui_preservation_same_seed`` (of the non-target objects in an image before, the
fraction in the same-seed image after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from tools import REPO


def check(lora: str, target: str, model: str | None = None, prompts: int = 40, steps: int = 25, cfg: float = 3.0,
          sampler: str = "euler_ancestral", seed: int = 0, comfy=None, log=print) -> dict:
    """``comfy``: a running :class:`tools.comfy_headless.HeadlessComfy` (default: start one)."""
    import numpy as np
    import torch
    from PIL import Image

    from erasekit.bench.erase import erase_counts, judge_found
    from erasekit.toyworld.concepts import concept_prompts
    from erasekit.toyworld.vocab import parse_concept
    from tools.comfy_headless import HeadlessComfy
    from tools.graphs import lora_before_after_graph

    concept = parse_concept(target)
    model = model or os.path.join(REPO, "models", "toy")
    comfy = comfy or HeadlessComfy()
    shutil.copytree(model, os.path.join(comfy.work_dir, "models", "diffusers", "erase-check-base"), dirs_exist_ok=True)
    dest = os.path.join(comfy.work_dir, "models", "loras", os.path.basename(lora))
    if not (os.path.exists(dest) and os.path.samefile(lora, dest)):  # already in ComfyUI's loras folder
        shutil.copy(lora, dest)
    target_prompts, benign = concept_prompts(concept, prompts, prompts, seed)
    found = {}
    for kind, plist in (("target", target_prompts), ("benign", benign)):
        before, after = [], []
        for i, p in enumerate(plist):
            out = comfy.run(lora_before_after_graph("erase-check-base", os.path.basename(lora), p, seed * 100_003 + i, steps, cfg, sampler))
            imgs = [np.asarray(Image.open(comfy.output_path(out[k]["images"][0])).convert("RGB")) for k in ("9", "19")]
            b, a = judge_found([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in imgs], concept)
            before.append(b), after.append(a)
        found[kind] = (before, after)
        log(f"{kind}: {len(plist)} prompts judged")
    c = erase_counts(found, {"target": target_prompts, "benign": benign})
    n = len(target_prompts)
    return {"comfyui_prompts": n, "comfyui_preserve_prompts": len(benign),
            "comfyui_sampler": f"{sampler}, normal, {steps} steps, cfg {cfg}",
            "comfyui_targets_before": round(c["drawn_before"] / n, 4),
            "comfyui_targets_after": round(sum(a[0] for a in found["target"][1]) / n, 4),
            "comfyui_erase_rate": round(1 - c["still"] / max(c["drawn_before"], 1), 4),
            "comfyui_preservation": round(c["asked_after"] / max(c["asked_before"], 1), 4),
            "comfyui_preservation_same_seed": round(c["kept"] / max(c["total"], 1), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lora")
    ap.add_argument("--target", default="red circle")
    ap.add_argument("--model", default=None, help="diffusers folder (default: the bundled toy model)")
    ap.add_argument("--prompts", type=int, default=40, help="target prompts and as many preservation prompts")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    r = check(a.lora, a.target, a.model, a.prompts, a.steps, a.cfg, a.sampler, log=log)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
