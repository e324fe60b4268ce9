"""Does Detect-and-Guide in real ComfyUI erase what the benchmark says it does? The toy judge counts.

    python -m tools.dag_check_comfy --target "red circle" --prompts 60 --json

For each prompt (the same target and benign prompt sets as ``python -m erasekit.bench dag``) one
ComfyUI graph samples the same seed twice, plainly and through the Detect-and-Guide node at its
defaults (what a user drags in; ``example_workflows/detect_and_guide_side_by_side.json``), run by
ComfyUI's own executor on the CPU. Prints one JSON line with ``comfyui_erase_rate`` and
``comfyui_preservation`` (as the benchmark defines them) and ``comfyui_benign_identical``
(benign images bit-identical to plain sampling). The diffusers benchmark and this check share
the maths but not the plumbing (ComfyUI's attention patches, samplers, x0-space hook), so a gap
between them is a bug in one of the two paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from tools import REPO


def check(target: str, guideline: str, model: str | None = None, prompts: int = 60, steps: int = 20, cfg: float = 5.0,
          sampler: str = "euler_ancestral", strength: float = 1.0, comfy=None, log=print) -> dict:
    """``guideline``: a .safetensors file; ``comfy``: a running :class:`tools.comfy_headless.HeadlessComfy`
    (default: start one). Defaults are the example workflow's sampler settings."""
    import numpy as np
    from PIL import Image

    from erasekit.bench.dag import erase_and_preservation
    from erasekit.toyworld.concepts import concept_prompts
    from erasekit.toyworld.judge import judge
    from erasekit.toyworld.vocab import parse_concept
    from tools.comfy_headless import HeadlessComfy
    from tools.graphs import dag_graph

    concept = parse_concept(target)
    model = model or os.path.join(REPO, "models", "toy")
    comfy = comfy or HeadlessComfy()
    shutil.copytree(model, os.path.join(comfy.work_dir, "models", "diffusers", "dag-check-base"), dirs_exist_ok=True)
    gdir = os.path.join(comfy.work_dir, "models", "guideline")
    os.makedirs(gdir, exist_ok=True)
    name = "dag-check-" + os.path.basename(guideline)
    shutil.copy(guideline, os.path.join(gdir, name))
    target_prompts, benign = concept_prompts(concept, prompts, prompts)
    judged, identical = {}, []
    for kind, plist in (("target", target_prompts), ("benign", benign)):
        plain, guided = [], []
        for i, p in enumerate(plist):
            out = comfy.run(dag_graph("dag-check-base", p, name, steps=steps, sampler=sampler, seed=i, cfg=cfg,
                                      strength=strength))
            a, b = (np.asarray(Image.open(comfy.output_path(out[n]["images"][0])).convert("RGB")) for n in ("9", "19"))
            plain.append(judge(a)), guided.append(judge(b))
            if kind == "benign":
                identical.append(bool(np.array_equal(a, b)))
        judged[kind] = (plain, guided)
        log(f"{kind}: {len(plist)} prompts judged")
    erase, kept = erase_and_preservation(concept, *judged["target"])
    drawn = sum(concept.matches(j) for j in judged["target"][0])
    return {"comfyui_prompts": len(target_prompts), "comfyui_benign_prompts": len(benign),
            "comfyui_sampler": f"{sampler}, normal, {steps} steps, cfg {cfg}", "comfyui_strength": strength,
            "comfyui_targets_drawn_plain": round(drawn / max(len(target_prompts), 1), 4),
            "comfyui_erase_rate": erase, "comfyui_preservation": kept,
            "comfyui_benign_identical": round(float(np.mean(identical)), 4) if identical else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="red circle")
    ap.add_argument("--guideline", default=os.path.join(REPO, "models", "guideline", "toy-red-circle.safetensors"))
    ap.add_argument("--model", default=None, help="diffusers folder (default: the bundled toy model)")
    ap.add_argument("--prompts", type=int, default=60, help="target prompts and as many benign prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--sampler", default="euler_ancestral")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    print(json.dumps(check(a.target, a.guideline, a.model, a.prompts, a.steps, a.cfg, a.sampler, a.strength, log=log)))


if __name__ == "__main__":
    main()
