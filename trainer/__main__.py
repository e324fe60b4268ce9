"""``python -m trainer``: train an erasure LoRA from the command line.

    python -m trainer train --method inpo --target "red circle" --out runs/red-circle
    python -m trainer train --method inpo --target "red circle" --out runs/red-circle --resume
    python -m trainer train --method inpo --target "bobo" --base my-model.safetensors --config my.toml
    python -m trainer guideline --target "red circle" --out models/guideline/red-circle.safetensors
    python -m trainer app [--out-root runs] [--comfyui PATH] [--listen --auth user:pass]

Settings are resolved in this order, each overriding the one before: the engine's defaults, the
method's preset for the concept type (INPO, Table 6), the run folder's own ``config.toml`` (with
--resume), the --config file (tables ``[train]``, ``[inpo]``, ``[data]``), then the flags given.
The resolved settings are written to ``<out>/config.toml``; the LoRA to ``<out>/<name>.safetensors``.
Ctrl-C stops between two steps and writes a checkpoint (--resume continues); errors are one
sentence on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from erasekit.dag.fit import GUIDELINE_IMAGES, GUIDELINE_SAFE_IMAGES  # noqa: E402
from erasekit.errors import ErasekitError  # noqa: E402

DEFAULT_BASE = REPO / "models" / "toy"
METHODS = ("inpo",)  # NCD and ResAlign plug into the same engine next

# flag -> (table, key); flags left out keep the value from the config / preset / default
FLAGS = {
    "target": ("train", "target"), "steps": ("train", "steps"), "seed": ("train", "seed"), "lr": ("train", "lr"),
    "rank": ("train", "rank"), "alpha": ("train", "alpha"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "mode": ("train", "mode"), "targets": ("train", "targets"),
    "optimizer": ("train", "optimizer"), "lr_scheduler": ("train", "lr_scheduler"),
    "mixed_precision": ("train", "mixed_precision"), "checkpoint_every": ("train", "checkpoint_every"),
    "sample_every": ("train", "sample_every"), "name": ("train", "name"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"), "train_text_encoder": ("train", "train_text_encoder"),
    "cpu": ("train", "cpu"), "stop_when_erased": ("train", "stop_when_erased"), "eta": ("method", "eta"), "gamma": ("method", "gamma"), "tau": ("method", "tau"),
    "lambda_prior": ("method", "lambda_prior"), "lambda_anchor": ("method", "lambda_anchor"),
    "preserve_pairs": ("data", "preserve_pairs"), "forget_dir": ("data", "forget_dir"),
    "preserve_dir": ("data", "preserve_dir"), "forget_images": ("data", "forget_images"),
    "images_per_concept": ("data", "images_per_concept"), "neighbours": ("data", "neighbours"),
    "unrelated": ("data", "unrelated"), "cache": ("data", "cache"), "mask_from": ("data", "mask_from"),
    "guideline": ("data", "guideline"),
}


MODEL_CONFIG_HELP = ("for a single-file checkpoint: a local diffusers folder of the same model (configs and tokenizer, "
                     "no weights needed); default models/configs/<architecture>, else diffusers fetches them from the Hub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Erase a concept from a text-to-image model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune and export an erasure LoRA")
    p.add_argument("--method", choices=METHODS, default="inpo")
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
            ("eta", float, "INPO Eq. 13/15: erasure strength (preset: 1, style 3)"),
            ("gamma", float, "INPO Eq. 14: sharpness of the adaptive scaling (preset 3)"),
            ("tau", float, "INPO Eq. 14: target margin of dS (preset 0.1)"),
            ("lambda-prior", float, "INPO Alg. 1: weight of the prior preservation loss, Eq. 16 (preset 0.6)"),
            ("lambda-anchor", float, "beyond the paper: Eq. 16 on the forget images under preserved prompts (0: off)"),
            ("preserve-pairs", float, "toy model: share of preserve prompts showing two preserved objects (0: off)"),
            ("forget-images", int, "images of the concept to generate (default 16)"),
            ("images-per-concept", int, "preserve images per preserved concept (default 25)"),
            ("neighbours", int, "neighbouring concepts to preserve (default 4)"),
            ("unrelated", int, "unrelated concepts to preserve (default 4)")):
        p.add_argument(f"--{flag}", type=kind, default=None, help=text)
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
    a = sub.add_parser("app", help="the trainer's web page (Gradio), on 127.0.0.1 by default")
    a.add_argument("--out-root", default="runs", help="every file the app writes goes under this folder (default: runs/)")
    a.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                   help="a ComfyUI install: pick base models from its models/checkpoints, export into models/loras")
    a.add_argument("--base", default=None, help="the base model shown first (default: models/toy)")
    a.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (needs --auth)")
    a.add_argument("--auth", default=None, help="user:password asked by the page")
    a.add_argument("--port", type=int, default=None, help="port (default: 7860 or GRADIO_SERVER_PORT)")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def resolve(args, kind: str | None, toy: bool = False) -> dict:
    """The settings tables {"train", "method", "data"} from defaults, preset (with the toy model's
    tuning on the toy model), files and flags."""
    from erasekit.erase.engine import read_config
    from erasekit.erase.inpo import preset

    tables = {"train": {}, "method": {}, "data": {}}
    row = preset(args.preset or kind or "object", toy=toy)
    tables["train"].update(steps=row.pop("steps"), rank=row.pop("rank"),
                           **{k: row.pop(k) for k in ("lr", "targets") if k in row})  # the toy model's tuning
    tables["method"].update(row)
    files = ([os.path.join(args.out, "config.toml")] if args.resume and os.path.isfile(os.path.join(args.out, "config.toml")) else [])
    files += [args.config] if args.config else []
    for path in files:
        for name, values in read_config(path).items():
            table = "method" if name == args.method else name
            if table not in tables:
                raise ErasekitError(f"Unknown table [{name}] in '{path}'; expected [train], [{args.method}] and [data].")
            tables[table].update(values)
    for attr, (table, key) in FLAGS.items():
        if getattr(args, attr, None) is not None:
            tables[table][key] = getattr(args, attr)
    if getattr(args, "seed", None) is not None:  # --seed also draws the data (which prompts, which seeds)
        tables["data"]["seed"] = args.seed
    tables["train"].update(out=args.out, base=str(args.base), resume=bool(args.resume))
    return tables


def prepare(args, *, log=None, with_data: bool = True, check_fresh: bool = True) -> dict:
    """Everything a run needs, from the parsed arguments: the base model's components, the target,
    the resolved configs (train, method, data) and, with ``with_data``, the forget / preserve sets.
    Shared by the CLI and the trainer app (:mod:`trainer.jobs`)."""
    from erasekit import models
    from erasekit.erase.data import DataConfig, build_erase_data, resolve_concept
    from erasekit.erase.engine import TrainConfig, config_from_dict, latest_checkpoint
    from erasekit.erase.inpo import InpoConfig

    log = log or (lambda m: print(m, file=sys.stderr))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    # a resumed run reuses the base model written in its config.toml
    args.base = args.base or (args.resume and _from_files(args, "base")) or DEFAULT_BASE
    if not os.path.exists(args.base):
        raise ErasekitError(f"The base model '{args.base}' does not exist; pass --base <a diffusers folder or a .safetensors "
                            "checkpoint> (the toy model is made by `python -m erasekit.toyworld train --out models/toy`).")
    components = models.load(str(args.base), config=args.model_config)
    toy = components.architecture is not None and components.architecture.name == "toy"

    target = args.target or _from_files(args, "target")
    if not target:
        raise ErasekitError("No concept to erase: pass --target, e.g. --target \"red circle\".")
    kind = resolve_concept(target).kind if toy else None
    args.target = target
    if not args.out:
        args.out = os.path.join("runs", f"erase-{'-'.join(target.lower().split())}-{args.method}")
    tables = resolve(args, kind, toy)
    config = config_from_dict(TrainConfig, tables["train"], "[train]")
    method_config = config_from_dict(InpoConfig, tables["method"], f"[{args.method}]")
    data_config = config_from_dict(DataConfig, tables["data"], "[data]")
    if not config.sample_prompts:
        config.sample_prompts = [target] if not toy else [f"a {target}" if kind != "character" else target]

    if check_fresh and not config.resume and latest_checkpoint(config.out) is not None:  # before the data is made
        raise ErasekitError(f"The folder '{config.out}' already holds a run; resume it with --resume or pick another --out folder.")
    data_config.cache = data_config.cache or os.path.join(config.out, "data.safetensors")  # resume reuses it
    from accelerate import PartialState  # this process's device, also under `accelerate launch`

    device = PartialState(cpu=config.cpu).device
    for module in (components.unet, components.text_encoder, components.vae):
        module.to(device)
    out = {"components": components, "target": target, "config": config, "method_config": method_config,
           "data_config": data_config, "data": None}
    if with_data:
        out["data"] = build_erase_data(components, target, data_config, log=log)
    return out


def run_training(args, *, progress=None, cancel=None, log=None):
    """Resolve the settings, make (or load) the data and train: the engine's ``RunResult``.
    The one run function of the CLI and the trainer app."""
    from erasekit.erase.engine import train
    from erasekit.erase.inpo import InpoObjective

    prep = prepare(args, log=log)
    return train(prep["config"], InpoObjective(prep["method_config"]), prep["data"], prep["components"],
                 progress=progress, cancel=cancel, sections={"data": prep["data_config"]})


def train_command(args) -> int:
    from tqdm.auto import tqdm

    cancel = threading.Event()  # Ctrl-C: stop after the current step, with a checkpoint; twice: at once
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    if in_main:
        signal.signal(signal.SIGINT, lambda *_: (cancel.set(), signal.signal(signal.SIGINT, previous)))
    bar = None

    def progress(step, total, terms):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"{args.method} '{args.target}'", dynamic_ncols=True)
        bar.n = step
        bar.set_postfix({k: f"{terms[k]:.4f}" for k in ("loss", "delta_s", "prior") if k in terms}, refresh=True)

    try:
        result = run_training(args, progress=progress, cancel=cancel)
    finally:
        if bar is not None:
            bar.close()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if result.status == "cancelled":
        print(f"Stopped at step {result.step}; checkpoint {result.checkpoint}. Continue with --resume.")
        return 130
    if result.erased_at is not None:
        print(f"The concept counts as erased after {result.erased_at} steps; training stopped there "
              "(--stop-when-erased; --steps was the maximum).")
    print(f"Erasure LoRA: {result.lora}" if result.lora else f"Done at step {result.step}: {result.run_dir}")
    return 0


def run_guideline(args, *, progress=None, log=None):
    """Make (or load) the images and learn a guideline embedding: ``(embedding, path written)``.
    The one guideline function of the CLI and the trainer app. ``progress(step, total, loss)``."""
    from erasekit import models
    from erasekit.dag.fit import fit_guideline, guideline_data_config
    from erasekit.erase.data import build_erase_data

    log = log or (lambda m: print(m, file=sys.stderr))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = args.base or DEFAULT_BASE
    if not os.path.exists(base):
        raise ErasekitError(f"The base model '{base}' does not exist; pass --base <a diffusers folder or a .safetensors "
                            "checkpoint>.")
    components = models.load(str(base), config=getattr(args, "model_config", None))
    toy = components.architecture is not None and components.architecture.name == "toy"
    if not toy and not args.forget_dir:
        raise ErasekitError("Only the toy model can draw and mask its own training images; for this model pass "
                            "--forget-dir with images of the concept and their masks (name.png + name_mask.png).")
    out = args.out or os.path.join("runs", f"guideline-{'-'.join(args.target.lower().split())}.safetensors")
    data = build_erase_data(components, args.target,
                            guideline_data_config(args.images, args.safe_images, args.seed, args.forget_dir,
                                                  args.preserve_dir), log=log)
    total = args.steps or 100 * len(data.forget)
    contrast = getattr(args, "contrast", None)
    if contrast is not None:
        contrast = [] if contrast.strip().lower() == "none" else [p.strip() for p in contrast.split(",") if p.strip()]
    emb = fit_guideline(components, data, args.target, init_phrase=args.init, steps=args.steps, seed=args.seed,
                        contrast=contrast,
                        callback=(lambda step, loss: progress(step, total, loss)) if progress else None, log=log)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    emb.save(out)
    return emb, out


def guideline_command(args) -> int:
    """Learn a guideline embedding and write it (atomically) where Load Guideline Embedding finds it."""
    from tqdm.auto import tqdm

    bar = None

    def progress(step, total, loss):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"guideline '{args.target}'", dynamic_ncols=True)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(bce=f"{loss:.4f}")

    try:
        emb, out = run_guideline(args, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"Guideline embedding: {out} (gate {emb.gate:.3f}; put it in ComfyUI's models/guideline folder)")
    return 0


def _from_files(args, key: str):
    from erasekit.erase.engine import read_config

    for path in ([args.config] if args.config else []) + ([os.path.join(args.out, "config.toml")] if args.out and args.resume else []):
        if os.path.isfile(path) and read_config(path).get("train", {}).get(key):
            return read_config(path)["train"][key]
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "app":
        from trainer.serve import app_command

        return app_command(args)
    try:
        return guideline_command(args) if args.command == "guideline" else train_command(args)
    except ErasekitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
