"""The command line: ``python -m trainer`` (argparse; the runs themselves are :mod:`trainer.runner`).

    python -m trainer train --method inpo --target "red circle" --out runs/red-circle
    python -m trainer train --method inpo --target "red circle" --out runs/red-circle --resume
    python -m trainer train --method resalign --target "red circle" [--init-lora runs/red-circle/erase-red-circle-inpo.safetensors]
    python -m trainer train --method inpo --target "bobo" --base my-model.safetensors --config my.toml
    python -m trainer guideline --target "red circle" --out models/guideline/red-circle.safetensors
    python -m trainer convert ncd-unet.safetensors --base sd15.safetensors --out ncd.safetensors --rank 32
    python -m trainer merge --lora runs/red-circle/erase-red-circle-inpo.safetensors --out toy-no-red-circle.safetensors
    python -m trainer app [--out-root runs] [--comfyui PATH] [--webui PATH] [--listen --auth-file PATH] [--allowed-host NAME]

Settings are resolved in this order, each overriding the one before: the engine's defaults, the
method's preset for the concept type (INPO, Table 6), the run folder's own ``config.toml`` (with
--resume), the --config file (tables ``[train]``, ``[inpo]``, ``[data]``), then the flags given.
The resolved settings are written to ``<out>/config.toml``; the LoRA to ``<out>/<name>.safetensors``.
Ctrl-C stops between two steps and writes a checkpoint (--resume continues); errors are one
sentence on stderr with exit status 2.
"""

from __future__ import annotations

import signal
import sys
import threading

from erasekit.errors import ErasekitError

from .arguments import build_parser
from .runner import DEFAULT_BASE, run_guideline, run_training


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
        shown = ("loss", "delta_s", "prior", "implicit_acc", "sigma_r0", "harm", "harm_star", "retain", "hyper_norm",
                 "residual", "guard")
        bar.set_postfix({k: f"{terms[k]:.4g}" for k in shown if k in terms}, refresh=True)

    def log(line):  # above the progress bar, not through it
        tqdm.write(line, file=sys.stderr)

    try:
        result = run_training(args, progress=progress, cancel=cancel, log=log)
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


def convert_command(args) -> int:
    """A fine-tuned UNet -> an erasure LoRA (:func:`erasekit.convert.convert_to_lora`), with its error report."""
    from erasekit.convert import convert_to_lora

    _threads(args)
    conv = convert_to_lora(args.source, str(args.base or DEFAULT_BASE), args.out, rank=args.rank, method=args.method,
                           concept=args.concept, model_config=args.model_config, progress=print)
    print(conv.summary())
    return 0


def merge_command(args) -> int:
    """Base + LoRA (or fine-tuned UNet) -> one original-layout checkpoint (:func:`erasekit.merge.merge_checkpoint`)."""
    from erasekit.merge import merge_checkpoint

    _threads(args)
    merged = merge_checkpoint(str(args.base or DEFAULT_BASE), args.out, lora=args.lora, unet=args.unet,
                              strength=args.strength, method=args.method, concept=args.concept,
                              model_config=args.model_config, progress=print)
    print(f"Merged checkpoint: {merged.path} ({merged.architecture.title}; {merged.unet_changed} UNet and "
          f"{merged.text_changed} text-encoder weights changed; erases: {merged.concept or 'not recorded'})")
    return 0


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "app":
        from .serve import app_command

        return app_command(args)
    commands = {"guideline": guideline_command, "convert": convert_command, "merge": merge_command}
    try:
        return commands.get(args.command, train_command)(args)
    except ErasekitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
