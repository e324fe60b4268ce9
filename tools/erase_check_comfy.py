"""Does an erasure LoRA stop real ComfyUI from drawing the concept? The toy judge counts.

    python tools/erase_check_comfy.py LORA.safetensors --target "red circle" --prompts 40 --json

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def graph(model_name: str, lora_name: str, prompt: str, seed: int, steps: int, cfg: float, sampler: str) -> dict:
    """Two branches over one loader: LoRA strength 0 (outputs "9") and 1 (outputs "19")."""
    g = {"1": {"class_type": "ErasekitLoadDiffusersModel", "inputs": {"model_name": model_name}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}}
    for strength, base in ((0.0, 0), (1.0, 10)):
        def n(i, base=base):
            return str(base + i)

        g[n(30)] = {"class_type": "ErasekitLoadErasureLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": strength,
            "strength_clip": strength}}
        g[n(2)] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": [n(30), 1]}}
        g[n(3)] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [n(30), 1]}}
        g[n(6)] = {"class_type": "KSampler", "inputs": {
            "model": [n(30), 0], "positive": [n(2), 0], "negative": [n(3), 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0}}
        g[n(7)] = {"class_type": "VAEDecode", "inputs": {"samples": [n(6), 0], "vae": ["1", 2]}}
        g[n(9)] = {"class_type": "SaveImage", "inputs": {"images": [n(7), 0], "filename_prefix": f"s{strength:g}"}}
    return g


def check(lora: str, target: str, model: str | None = None, prompts: int = 40, steps: int = 25, cfg: float = 3.0,
          sampler: str = "euler_ancestral", seed: int = 0, comfy=None, log=print) -> dict:
    """``comfy``: a running :class:`tools.comfy_headless.HeadlessComfy` (default: start one)."""
    import numpy as np
    import torch
    from PIL import Image

    from erasekit.bench_dag import concept_prompts
    from erasekit.bench_erase import _judge_found, erase_counts
    from erasekit.toyworld.vocab import parse_concept
    from tools.comfy_headless import HeadlessComfy

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
            out = comfy.run(graph("erase-check-base", os.path.basename(lora), p, seed * 100_003 + i, steps, cfg, sampler))
            imgs = [np.asarray(Image.open(comfy.output_path(out[k]["images"][0])).convert("RGB")) for k in ("9", "19")]
            b, a = _judge_found([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in imgs], concept)
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
