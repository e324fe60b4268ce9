"""Command line of the toy world.

    python -m erasekit.toyworld train --out models/toy --minutes 50 --seed 0
    python -m erasekit.toyworld train --out models/toy --steps 6000 --seed 0     # exact reproduction
    python -m erasekit.toyworld eval --json [--model models/toy] [--prompts N] [--seeds K] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from .train import TrainConfig, train

    if args.minutes is None and args.steps is None:
        print("train: give --minutes or --steps", file=sys.stderr)
        return 2
    cfg = TrainConfig(out=args.out, seed=args.seed, minutes=args.minutes, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, caption_dropout=args.caption_dropout,
                      threads=args.threads, mixed_precision=args.mixed_precision,
                      ckpt_dir=args.ckpt_dir or f".cache/toyworld-train/seed{args.seed}",
                      ckpt_every_minutes=args.ckpt_every, resume=not args.no_resume)
    train(cfg)
    return 0


def _eval(args) -> int:
    from .evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model=args.model, prompts=args.prompts, seeds=args.seeds, quick=args.quick,
                     steps=args.steps, eta=args.eta, cfg=args.cfg, scheduler=args.scheduler,
                     clip_sample=args.clip_sample, thresholding=args.thresholding,
                     sample_max_value=args.sample_max_value, guidance_below=args.guidance_below,
                     judge_scenes=args.judge_scenes, only=args.only, threads=args.threads)
    result = evaluate(cfg)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)  # first: never lost
    if args.card:
        from .model import DEFAULT_MODEL_DIR
        from .train import write_model_card

        print(f"model card: {write_model_card(cfg.model or DEFAULT_MODEL_DIR, result)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erasekit.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the toy model from scratch")
    t.add_argument("--out", default="models/toy")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget (fixes --steps after 40 steps)")
    t.add_argument("--steps", type=int, default=None, help="exact number of steps (reproducible)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--caption-dropout", type=float, default=0.2)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    t.add_argument("--ckpt-dir", default=None, help="default .cache/toyworld-train/seed<S>")
    t.add_argument("--ckpt-every", type=float, default=5.0, help="minutes between checkpoints")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="measure the toy model with the judge; print one JSON object")
    e.add_argument("--model", default=None, help="model folder (default: the shipped models/toy)")
    e.add_argument("--json", action="store_true", help="print the result as one line of JSON")
    e.add_argument("--prompts", type=int, default=None, help="prompts per prompt set (default 100)")
    e.add_argument("--seeds", type=int, default=None, help="images per prompt (default 2)")
    e.add_argument("--quick", action="store_true", help="a few prompts and steps (for tests)")
    e.add_argument("--steps", type=int, default=None, help="sampling steps (default 25)")
    e.add_argument("--eta", type=float, default=None, help="DDIM eta (default 1.0)")
    e.add_argument("--cfg", type=float, default=None, help="guidance scale of the main figures (default 3)")
    e.add_argument("--scheduler", default=None, choices=["ddim", "euler_a", "ddpm"])
    e.add_argument("--clip-sample", type=int, default=None, choices=[0, 1], help="override x0 clipping")
    e.add_argument("--thresholding", type=int, default=None, choices=[0, 1], help="dynamic thresholding")
    e.add_argument("--guidance-below", type=int, default=None, metavar="T",
                   help="guide only at timesteps t < T (limited-interval guidance; 1000 = everywhere)")
    e.add_argument("--sample-max-value", type=float, default=None,
                   help="dynamic thresholding's largest s (Imagen: x0 = clip(x0, -s, s) / s; 1 = plain x0 clipping)")
    e.add_argument("--judge-scenes", type=int, default=None, help="held-out scenes for judge_accuracy (500)")
    e.add_argument("--only", default=None, help="comma-separated subset of metrics to compute")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--card", action="store_true", help="write the result into the model's MODEL_CARD.md")
    e.set_defaults(func=_eval)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
