"""Thumbnails of the pack's ComfyUI templates: ``example_workflows/<name>.jpg``, what ComfyUI's
Templates dialog shows beside a custom node's ``<name>.json`` (its front end asks for
``/api/workflow_templates/<pack folder>/<name>.jpg``).

Each picture is the template's own output: the workflow run in real ComfyUI (this process, no
server) on the bundled toy model with the shipped guideline embedding, images side by side with a
caption. The LoRA template needs an erasure LoRA (``--lora``: e.g. the trainer's export of
"red circle"); without one its thumbnail is left as it is.

    python -m tools.template_thumbnails --lora runs/erase-red-circle/erase-red-circle-inpo.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from tools import REPO

FOLDER = os.path.join(REPO, "example_workflows")
# the images each template saves, left to right, with what they show
PANELS = {
    "erasure_lora_before_after": [("9", "before (LoRA at 0)"), ("19", "after (LoRA at 1)")],
    "detect_and_guide": [("19", "Detect-and-Guide"), ("21", "what it detected")],
    "detect_and_guide_side_by_side": [("9", "plain"), ("19", "Detect-and-Guide")],
}
SIZE = 512  # square: the dialog's cards crop to a square


def compose(images: list, captions: list):
    """One SIZE x SIZE picture: the images side by side, each with its caption under it."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (SIZE, SIZE), (24, 24, 27))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=22)
    gap = 12
    side = (SIZE - gap * (len(images) + 1)) // len(images)
    top = (SIZE - side) // 2 - 16
    for i, (img, caption) in enumerate(zip(images, captions)):
        x = gap + i * (side + gap)
        canvas.paste(img.convert("RGB").resize((side, side), Image.NEAREST), (x, top))
        width = draw.textlength(caption, font=font)
        draw.text((x + (side - width) / 2, top + side + 10), caption, fill=(240, 240, 240), font=font)
    return canvas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", help="an erasure LoRA of 'red circle' for erasure_lora_before_after")
    ap.add_argument("--model", default=os.path.join(REPO, "models", "toy"))
    a = ap.parse_args(argv)

    from PIL import Image

    from tools.comfy_headless import HeadlessComfy
    from tools.workflows import ui_to_api

    comfy = HeadlessComfy()
    shutil.copytree(a.model, os.path.join(comfy.work_dir, "models", "diffusers", "toy"), dirs_exist_ok=True)
    written = {}
    for name, panels in PANELS.items():
        with open(os.path.join(FOLDER, f"{name}.json")) as f:
            graph = ui_to_api(json.load(f), comfy.nodes.NODE_CLASS_MAPPINGS)
        loras = [n for n in graph.values() if n["class_type"] == "ErasekitLoadErasureLoRA"]
        if loras:
            if not a.lora:
                print(f"skipped {name}: it needs --lora", file=sys.stderr)
                continue
            shutil.copyfile(a.lora, os.path.join(comfy.work_dir, "models", "loras", loras[0]["inputs"]["lora_name"]))
        out = comfy.run(graph)
        images = [Image.open(comfy.output_path(out[node]["images"][0])) for node, _ in panels]
        path = os.path.join(FOLDER, f"{name}.jpg")
        compose(images, [c for _, c in panels]).save(path, quality=90)
        written[name] = path
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
