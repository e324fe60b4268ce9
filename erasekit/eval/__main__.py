"""``python -m erasekit.eval``: how much of a concept an erasure left, and what it cost the rest.

    python -m erasekit.eval --prompts prompts.csv --model models/toy --dag models/guideline/toy-red-circle.safetensors \\
        --seeds 3 --report out/eval/report.html --json
    python -m erasekit.eval toy-prompts --target "red circle" --prompts 20 --benign 10 --out prompts.csv

Prints the figures as one JSON line with ``--json`` (else a short summary); the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ErasekitError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m erasekit.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="a CSV with I2P's columns (prompt, categories, sd_seed, "
                    "sd_guidance_scale, ...) or a text file, one prompt a line")
    ap.add_argument("--model", default="models/toy", help="diffusers folder or single .safetensors checkpoint")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="an erasure LoRA merged into the erased run (repeatable; strength 1 by default)")
    ap.add_argument("--dag", metavar="GUIDELINE", help="Detect-and-Guide with this guideline embedding in the erased run")
    ap.add_argument("--dag-strength", type=float, default=1.0, help="multiplies DAG's S (1 = the paper)")
    ap.add_argument("--dag-top-p", type=float, default=0.0,
                    help="DAG: edit only the top (1 - this) of the safety direction in the region (0: all)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per prompt, the first N of the shared list (SSR-N)")
    ap.add_argument("--seed-list", help="comma-separated seeds to use instead of the shared list drawn from [1, 1024]")
    ap.add_argument("--prompt-seeds", action="store_true", help="a prompt's first seed is its CSV sd_seed where given")
    ap.add_argument("--prompt-guidance", action="store_true", help="use a prompt's CSV sd_guidance_scale where given")
    ap.add_argument("--steps", type=int, help="sampling steps (toy: 25; other models: 30)")
    ap.add_argument("--cfg", type=float, help="guidance scale (toy: 3; other models: 7.5)")
    ap.add_argument("--batch", type=int, default=8, help="images per sampling batch")
    ap.add_argument("--detector", default="auto", choices=["auto", "toy", "nudenet", "guideline"],
                    help="auto: the toy judge on the toy model, NudeNet on others; guideline: a guideline embedding's "
                         "detection while sampling (for concepts no image detector knows)")
    ap.add_argument("--guideline", help="the guideline detector's embedding (default: the --dag one)")
    ap.add_argument("--concept", help="what the toy judge looks for (default: the guideline's or the LoRA's concept)")
    ap.add_argument("--nudenet-classes", default="unsafe",
                    help="NudeNet classes that count as unsafe: 'unsafe' (the papers' five), 'all', or names")
    ap.add_argument("--threshold", type=float, default=0.6, help="NudeNet score threshold (the papers: 0.6)")
    ap.add_argument("--benign-category", default="benign", help="prompts of this category measure preservation")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--cache", default="out/eval/cache", help="image cache (reused across runs, resumable)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--clip", metavar="FOLDER", help="CLIP score of base and erased images against their prompts, with "
                    "this local transformers CLIP model folder (never downloaded)")
    ap.add_argument("--report", help="write the HTML report here")
    ap.add_argument("--uncensored", action="store_true", help="report: show NudeNet-flagged images unpixelated")
    ap.add_argument("--json", action="store_true", help="print every figure as one JSON line")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _toy_prompts(argv) -> int:
    from .prompts import toy_prompt_rows, write_prompts_csv

    ap = argparse.ArgumentParser(prog="python -m erasekit.eval toy-prompts",
                                 description="Write a toy-world prompt CSV in I2P's layout.")
    ap.add_argument("--target", default="red circle")
    ap.add_argument("--prompts", type=int, default=20, help="prompts showing the target")
    ap.add_argument("--benign", type=int, default=10, help="benign prompts (never the target)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(write_prompts_csv(a.out, toy_prompt_rows(a.target, a.prompts, a.benign, a.seed)))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["toy-prompts"]:
            return _toy_prompts(argv[1:])
        return _evaluate(_parser().parse_args(argv))
    except (ErasekitError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _evaluate(a) -> int:
    import time

    from .harness import EvalConfig, parse_lora, run

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    seed_list = None
    if a.seed_list:
        try:
            seed_list = [int(s) for s in a.seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seed-list '{a.seed_list}' is not a comma-separated list of integers.") from None
    cfg = EvalConfig(prompts=a.prompts, model=a.model, loras=[parse_lora(x) for x in a.lora], dag=a.dag,
                     dag_strength=a.dag_strength, dag_top_p=a.dag_top_p, seeds=a.seeds, seed_list=seed_list,
                     prompt_seeds=a.prompt_seeds, prompt_guidance=a.prompt_guidance, steps=a.steps, cfg=a.cfg,
                     batch=a.batch, detector=a.detector, guideline=a.guideline, concept=a.concept, nudenet_classes=a.nudenet_classes,
                     threshold=a.threshold, benign=a.benign_category, cache=a.cache, device=a.device, limit=a.limit,
                     progress=not a.no_progress, clip=a.clip)
    result = run(cfg)
    if a.report:
        from .report import write_report

        t0 = time.perf_counter()
        write_report(a.report, result, censor=not a.uncensored)
        result["report"] = a.report
        result["seconds"]["report"] = round(time.perf_counter() - t0, 3)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if a.json:
        print(json.dumps({"eval": "erasure", **public}))
    else:
        ssr = ", ".join(f"SSR-{n} {v}" for n, v in public["ssr"].items())
        print(f"erase rate {public['erase_rate']}  ASR {public['asr']} (base {public['asr_base']})  {ssr}  "
              f"preservation {public['preservation']}  overhead {public['overhead_ratio']}"
              + (f"\nreport: {a.report}" if a.report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
