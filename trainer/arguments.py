"""The command line's arguments (:func:`build_parser`): read by the CLI (:mod:`trainer.cli`) and by the
app's jobs (:mod:`trainer.work`), which pass a page's settings as the same flags."""

from __future__ import annotations

import argparse
import os

from erasekit.dag.fit import GUIDELINE_IMAGES, GUIDELINE_SAFE_IMAGES
from erasekit.erase import methods

MODEL_CONFIG_HELP = ("for a single-file checkpoint: a local diffusers folder of the same model (configs and tokenizer, "
                     "no weights needed); default: the config shipped in models/configs for the file's architecture "
                     "(offline); needed for a model whose parts differ from its release")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Erase a concept from a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune and export an erasure LoRA")
    p.add_argument("--method", choices=tuple(methods.METHODS), default="inpo",
                   help="; ".join(m.label for m in methods.METHODS.values()))
    p.add_argument("--target", help='the concept to erase, e.g. "red circle", "bobo", "striped background"')
    p.add_argument("--base", default=None, help="diffusers folder or .safetensors checkpoint (default: models/toy)")
    p.add_argument("--model-config", default=None, help=MODEL_CONFIG_HELP)
    p.add_argument("--out", default=None, help="run folder (default: runs/erase-<target>-<method>)")
    p.add_argument("--config", help="a TOML file with [train], [<method>] and [data] tables")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--preset", choices=("object", "character", "style", "nsfw"),
                   help="hyperparameters of this concept type (default: from the target)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for flag, kind, text in (
            ("steps", int, "training steps (default: the preset's)"), ("seed", int, "data, init and noise draws"),
            ("lr", float, "learning rate (default 1e-4; the toy model's tuning on the toy model)"),
            ("rank", int, "LoRA rank (default: the preset's, 4)"), ("alpha", float, "LoRA alpha (default: the rank)"),
            ("batch-size", int, "forget and preserve images per step (each)"),
            ("grad-accum", int, "micro-batches accumulated into each optimizer step (default 1)"),
            ("checkpoint-every", int, "steps between checkpoints (default 100; a kill loses at most this many)"),
            ("sample-every", int, "steps between preview images (0: none)"),
            *((f.flag, f.kind, f.help) for f in methods.all_flags().values() if f.kind is not bool),
            ("preserve-pairs", float, "toy model: share of preserve prompts showing two preserved objects (0: off)"),
            ("forget-images", int, "images of the concept to generate (default 16)"),
            ("images-per-concept", int, "preserve images per preserved concept (default 25)"),
            ("neighbours", int, "neighbouring concepts to preserve (default 4)"),
            ("unrelated", int, "unrelated concepts to preserve (default 4)"),
            ("anchor", str, "NCD: what the concept becomes in the safe pictures (default on the toy model: its safe "
                            "counterpart, e.g. red circle -> green circle)"),
            ("img2img-strength", float, "NCD: how far img2img redraws a harmful picture into its safe one (0-1, "
                                        "default 0.9)"),
            ("max-tries", int, "draw up to this many times the images asked for to find the concept (default 4)")):
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
    for f in methods.all_flags().values():  # a method's switches: --nca / --no-nca
        if f.kind is bool:
            p.add_argument(f"--{f.flag}", action=argparse.BooleanOptionalAction, default=None, help=f.help)
    p.add_argument("--mode", choices=("lora", "full"), default=None)
    p.add_argument("--targets", default=None, help="cross-attention | attention (default; the toy model: feed-forward) | "
                   "feed-forward | all | to_k,to_v,...")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), default=None)
    p.add_argument("--lr-scheduler", default=None, help="constant, cosine, linear, constant_with_warmup, ...")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None)
    p.add_argument("--name", default=None, help="file name of the exported LoRA")
    for flag in ("gradient-checkpointing", "train-text-encoder", "cpu"):
        p.add_argument(f"--{flag}", action="store_true", default=None)
    p.add_argument("--stop-when-erased", action=argparse.BooleanOptionalAction, default=None,
                   help="end once the method counts the concept as erased; --steps is then a maximum. A resumed "
                        "run keeps its setting: --no-stop-when-erased trains an early-stopped run further")
    for flag in ("forget-dir", "preserve-dir", "cache"):
        p.add_argument(f"--{flag}", default=None)
    p.add_argument("--mask-from", choices=("auto", "full", "guideline", "nudenet"), default=None,
                   help="masks of generated forget images on models without the toy judge (default auto: the "
                        "--guideline embedding if given, NudeNet for nudity, else the whole image)")
    p.add_argument("--guideline", default=None, help="a guideline embedding (.safetensors) whose detection map masks "
                                                     "the forget images")
    g = sub.add_parser("guideline", help="learn a Detect-and-Guide guideline embedding (DAG Sec. 3.1)")
    g.add_argument("--target", required=True, help='the concept to detect, e.g. "red circle", "nudity"')
    g.add_argument("--base", default=None, help="diffusers folder or .safetensors checkpoint (default: models/toy)")
    g.add_argument("--model-config", default=None, help=MODEL_CONFIG_HELP)
    g.add_argument("--out", default=None, help="the .safetensors file to write (default: runs/guideline-<target>.safetensors)")
    g.add_argument("--init", default=None, help="words the tokens start from (default: the target)")
    g.add_argument("--contrast", default=None,
                   help="comma-separated concepts that are NOT the target (e.g. 'clothed person, swimsuit'): their "
                        "words compete with the guideline tokens, so look-alikes are not detected; default: the "
                        "safe images' concepts (toy) or captions (--preserve-dir); 'none': the paper's plain tokens")
    g.add_argument("--forget-dir", default=None,
                   help="images of the concept (name.png + name_mask.png, white = concept); default: drawn by the toy model")
    g.add_argument("--preserve-dir", default=None, help="images without the concept (zero masks)")
    g.add_argument("--images", type=int, default=GUIDELINE_IMAGES, help="images of the concept to generate (toy model)")
    g.add_argument("--safe-images", type=int, default=GUIDELINE_SAFE_IMAGES, help="images without it to generate (toy model)")
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default 100 x unsafe images, Table 4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c = sub.add_parser("convert", help="turn a fine-tuned UNet (NCD, ResAlign, ESD, UCE...) into an erasure LoRA by SVD")
    c.add_argument("source", help="the fine-tuned weights: .safetensors (diffusers or 'model.diffusion_model.*' keys, full "
                                  "or partial, or a whole single-file checkpoint), a diffusers UNet folder, or a "
                                  ".pt/.bin of plain tensors")
    c.add_argument("--base", default=None, help="the model it was fine-tuned from: diffusers folder or .safetensors "
                                                "checkpoint (default: models/toy)")
    c.add_argument("--model-config", default=None, help=MODEL_CONFIG_HELP)
    c.add_argument("--out", required=True, help="the LoRA to write (.safetensors; a model card <name>.md beside it)")
    c.add_argument("--rank", type=int, default=8, help="LoRA rank of every layer (default 8); the error report says "
                                                       "whether it holds the fine-tune")
    c.add_argument("--method", default="", help="the erasure method that made it (esd, uce, ncd, resalign...), for the metadata")
    c.add_argument("--concept", default="", help="the erased concept, for the metadata (Load Erasure LoRA shows it)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    m = sub.add_parser("merge", help="merge an erasure LoRA (or a fine-tuned UNet) into the base: one single-file "
                                     "checkpoint for ComfyUI's checkpoint loader and A1111")
    what = m.add_mutually_exclusive_group(required=True)
    what.add_argument("--lora", default=None, help="the erasure LoRA (.safetensors) to merge")
    what.add_argument("--unet", default=None, help="or fine-tuned UNet weights (as `convert` reads them) to put in")
    m.add_argument("--base", default=None, help="diffusers folder or .safetensors checkpoint (default: models/toy)")
    m.add_argument("--model-config", default=None, help=MODEL_CONFIG_HELP)
    m.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    m.add_argument("--strength", type=float, default=1.0, help="the LoRA's weight (default 1)")
    m.add_argument("--method", default="", help="recorded in the metadata (default: the LoRA's own)")
    m.add_argument("--concept", default="", help="recorded in the metadata (default: the LoRA's own)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = sub.add_parser("app", help="the trainer's web page (Gradio), on 127.0.0.1 by default")
    a.add_argument("--out-root", default="runs", help="every file the app writes goes under this folder (default: runs/)")
    a.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                   help="a ComfyUI install: pick base models from its models/checkpoints, export into models/loras")
    a.add_argument("--webui", default=os.environ.get("WEBUI_PATH"), metavar="PATH",
                   help="an Automatic1111 or Forge folder (or its --data-dir): pick base models from its "
                        "models/Stable-diffusion, export into models/Lora with the Lora tab's card (<name>.json)")
    a.add_argument("--base", default=None, help="the base model shown first (default: models/toy)")
    a.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (needs a password: --auth-file, "
                                                          "ERASEKIT_AUTH or --auth)")
    a.add_argument("--auth-file", default=None, metavar="PATH",
                   help="a file whose first line is user:password, asked by the page (also on 127.0.0.1)")
    a.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="user:password asked by the page; other users of this machine can read it in the process "
                        "list: prefer --auth-file or the ERASEKIT_AUTH environment variable")
    a.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a host name the page may be opened under besides 127.0.0.1, localhost and [::1] (with "
                        "--listen also any IP address of this machine); repeat for several. Requests under any "
                        "other name are refused (DNS rebinding)")
    a.add_argument("--max-upload-mb", type=int, default=50, help="the largest file the page takes (default 50 MB)")
    a.add_argument("--port", type=int, default=None, help="port (default: 7860 or GRADIO_SERVER_PORT)")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser
