"""`make demo`: the pack in real ComfyUI on the bundled toy model, pictures in out/demo/.

For each prompt, a ComfyUI graph (Load Diffusers Model -> Capture Cross-Attention -> KSampler ->
VAE Decode -> Cross-Attention Heatmap) runs headless on the CPU; the demo then writes, per
prompt, the image and the heatmap of the prompt's target words side by side, and one sheet
with all of them (out/demo/demo.png). Detect-and-Guide joins this demo when it lands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPTS = [  # (prompt, words whose attention is shown)
    ("a red circle and a blue square", "red circle"),
    ("a green star on a striped background", "green star"),
    ("a yellow triangle and a purple ring", "purple ring"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "out", "demo"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    from PIL import Image

    from tools.comfy_headless import HeadlessComfy
    from tools.graphs import attention_graph

    comfy = HeadlessComfy(os.path.join(a.out, "comfyui"))
    model = "toy"
    if not os.path.isfile(os.path.join(REPO, "models", "toy", "model_index.json")):
        from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

        print("models/toy is not there yet: running on a randomly initialised toy model (expect noise).")
        model = "toy-untrained"
        save_toy_pipeline(build_toy_pipeline(seed=0), os.path.join(comfy.work_dir, "models", "diffusers", model))
    rows, report = [], []
    for i, (prompt, words) in enumerate(PROMPTS):
        graph = attention_graph(model, prompt, words, size=128, steps=a.steps, sampler="euler_ancestral", seed=i, cfg=a.cfg)
        out = comfy.run(graph)
        image, heat = (Image.open(comfy.output_path(out[n]["images"][0])).convert("RGB") for n in ("9", "10"))
        pair = Image.new("RGB", (image.width * 2 + 8, image.height), "white")
        pair.paste(image, (0, 0)), pair.paste(heat, (image.width + 8, 0))
        path = os.path.join(a.out, f"prompt{i}.png")
        pair.save(path)
        rows.append(pair)
        report.append({"prompt": prompt, "words": words, "file": path})
    sheet = Image.new("RGB", (rows[0].width, sum(r.height + 8 for r in rows)), "white")
    for i, r in enumerate(rows):
        sheet.paste(r, (0, i * (r.height + 8)))
    sheet_path = os.path.join(a.out, "demo.png")
    sheet.save(sheet_path)
    summary = {"model": model, "sampler": f"euler_ancestral, {a.steps} steps, cfg {a.cfg}", "images": report,
               "sheet": sheet_path, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"\nOpen {sheet_path}: left, the image ComfyUI sampled; right, where the model attended to the words.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
