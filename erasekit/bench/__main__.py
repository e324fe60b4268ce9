"""Benchmarks. Each prints one JSON object per line; figures are ratios against a baseline
measured in the same run, so they compare across machines.

    python -m erasekit.bench startup [--repeats N]
    python -m erasekit.bench dag --target "red circle" [--prompts N] [--seeds K] [--steps S]
    python -m erasekit.bench lora-roundtrip
    python -m erasekit.bench erase --method inpo|ncd|resalign --target "red circle" [--seeds 0,1,2]
    python -m erasekit.bench resilience --target "red circle" [--quick] --json
    python -m erasekit.bench a1111 [--repeats N]

startup: seconds the pack adds to ComfyUI's node loading. ComfyUI is started in fresh
processes alternately without and with the pack (the tools/comfy_headless.py runner), and the
pack's own load time is timed around ComfyUI's ``load_custom_node``. a1111: the same for the real
Automatic1111 (tools/webui_bench.py), and its txt2img time with Detect-and-Guide on and nothing detected.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from . import REPO


def _comfy_run(with_pack: bool) -> dict:
    from ..fresh_process import json_from

    args = ["-m", "tools.comfy_headless", "--object-info"] + ([] if with_pack else ["--no-pack"])
    return json_from(args, "ComfyUI's node loading", timeout=600, cwd=REPO)


def bench_startup(repeats: int = 3) -> dict:
    without, with_pack = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        without.append(_comfy_run(False))
        with_pack.append(_comfy_run(True))
    base = statistics.median(r["builtin_seconds"] for r in without)
    pack = statistics.median(r["pack_seconds"] for r in with_pack)
    return {
        "bench": "startup",
        "repeats": repeats,
        "comfyui_node_loading_seconds": round(base, 4),
        "pack_seconds": round(pack, 4),
        "pack_ratio": round(pack / base, 4),
        "pack_nodes": len(with_pack[0]["nodes"]),
    }


def main(argv=None) -> None:
    from ..dag.fit import GUIDELINE_IMAGES
    from ..erase import methods  # light: the methods' modules are imported when used

    ap = argparse.ArgumentParser(prog="python -m erasekit.bench", description="Erasekit benchmarks (JSON lines).")
    sub = ap.add_subparsers(dest="which", required=True)
    s = sub.add_parser("startup", help="seconds the pack adds to ComfyUI's node loading")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    w = sub.add_parser("a1111", help="seconds the extension adds to A1111's start-up; its DAG time ratio, nothing detected")
    w.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("dag", help="Detect-and-Guide vs plain CFG, SLD and SEGA on the toy world")
    d.add_argument("--target", default="red circle", help="any concept the toy world knows")
    d.add_argument("--prompts", type=int, default=200, help="target prompts and benign prompts (each)")
    d.add_argument("--seeds", type=int, default=2)
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--cfg", type=float, default=3.0)
    d.add_argument("--model", default=None, help="toy model folder (default models/toy)")
    d.add_argument("--guideline", default=None, help="load this embedding instead of training one")
    d.add_argument("--guideline-images", type=int, default=GUIDELINE_IMAGES,
                   help="images of the target to train it on (and 3/4 as many without it)")
    d.add_argument("--strength", type=float, default=1.0, help="multiplies DAG's S (1 = the paper's scale)")
    d.add_argument("--comfyui", type=int, default=0, metavar="N",
                   help="also run N target + N benign prompts through the Detect-and-Guide node in real ComfyUI")
    d.add_argument("--sega-mask", type=float, default=0.0,
                   help="DAG: edit only the top (1 - this) of the safety direction in the region (0: all)")
    d.add_argument("--modes", default="dag,sld,sega", help="safety guidances to compare with plain CFG")
    d.add_argument("--out", default="out/bench")
    d.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    e = sub.add_parser("erase", help="an erasure LoRA trained on the toy world, judged, and its cost")
    e.add_argument("--method", default="inpo", choices=list(methods.METHODS))
    e.add_argument("--target", default="red circle")
    e.add_argument("--prompts", type=int, default=200)
    e.add_argument("--steps", type=int, default=None, help="default: the method's preset for the concept type")
    e.add_argument("--lr", type=float, default=None, help="default: the preset's (with the toy model's tuning)")
    e.add_argument("--model", default=None)
    for flag in methods.all_flags().values():  # override the toy preset's value
        if flag.kind is bool:
            e.add_argument(f"--{flag.flag}", action=argparse.BooleanOptionalAction, default=None, help=flag.help)
        else:
            e.add_argument(f"--{flag.flag}", type=flag.kind, default=None, help=flag.help)
    e.add_argument("--forget-images", type=int, default=16, help="forget images (NCD: five-tuples) to make")
    e.add_argument("--img2img-strength", type=float, default=None,
                   help="NCD: how far the safe picture is redrawn from a harmful one (default: the data config's)")
    e.add_argument("--anchor", default=None, help="NCD: what the target becomes in the safe pictures (default: the "
                                                   "toy concept's safe counterpart)")
    e.add_argument("--data-cache", default="", metavar="DIR",
                   help="keep each run's training data in DIR and reuse it where made from the same inputs")
    e.add_argument("--images-per-concept", type=int, default=25, help="preserve images per preserved concept (paper: 25)")
    e.add_argument("--neighbours", type=int, default=4, help="neighbouring concepts in the preserve set (paper: 4)")
    e.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's, 4)")
    e.add_argument("--seed", type=int, default=0, help="data, LoRA initialisation and training draws")
    e.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="train once per seed (e.g. 0,1,2) and report each and the worst (erase_rate_min, "
                        "preservation_min); overrides --seed")
    e.add_argument("--mode", choices=("lora", "full"), default=None,
                   help="LoRA, or the full UNet exported as a LoRA by SVD (default: the toy preset's, lora)")
    e.add_argument("--ssr-prompts", type=int, default=20,
                   help="target prompts for SSR-N and ASR (NCD Eq. 12), each with 10 seeds of one shared list (0: skip)")
    e.add_argument("--preserve-pairs", type=float, default=0.0,
                   help="share of preserve prompts that show two preserved objects (the paper: 0)")
    e.add_argument("--targets", default=None,
                   help="LoRA target modules: cross-attention, attention, feed-forward (the toy tuning's default), all, "
                        "or names like to_k,to_v")
    e.add_argument("--batch-size", type=int, default=None,
                   help="forget and preserve images (NCD: tuples) per step (default: the toy preset's, else 1)")
    e.add_argument("--train-text-encoder", action="store_true", help="a LoRA on the text encoder too")
    e.add_argument("--stop-when-erased", action="store_true",
                   help="end training once the objective counts the concept as erased (--steps is then a maximum)")
    e.add_argument("--no-cost", action="store_true", help="skip the step time / memory measurement")
    e.add_argument("--strengths", default="", metavar="S,S,...",
                   help="also judge the LoRA applied at these strengths (as a LoRA loader's weight), e.g. 0.6,0.8")
    e.add_argument("--out", default="out/bench/erase")
    e.add_argument("--comfyui", type=int, default=0, metavar="N",
                   help="also sample N target + N preservation prompts in real ComfyUI with the exported LoRA")
    e.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    z = sub.add_parser("resilience", help="erasure after someone else's fine-tuning: plain (beta 0), INPO, ResAlign")
    z.add_argument("--target", default="red circle", help="an object concept of the toy world")
    z.add_argument("--quick", action="store_true", help="the quick profile: arms b and d, 50 and 200 steps, 40 prompts")
    z.add_argument("--profile", choices=("full", "arms", "quick", "smoke"), default=None,
                   help="overrides --quick; arms: the quick profile with all four arms and the LoRA attack")
    z.add_argument("--model", default=None)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--pool", default="", help="ResAlign's pool of simulated fine-tunes (TOML; default: the built-in one)")
    z.add_argument("--configs", type=int, default=None, help="ResAlign's J (default: the toy tuning's 1; the paper 3)")
    z.add_argument("--iterations", type=int, default=None, help="ResAlign's K (default: the toy tuning's 3; the paper 5)")
    z.add_argument("--harm-loss", default=None, help="ResAlign's harm loss: ga, inpo, relative (the toy tuning's), or "
                   "ncd (then plain and ResAlign harden NCD's LoRA on NCD's tuples)")
    z.add_argument("--harm-cap", type=float, default=None, help="ResAlign's cap of the relative harm (5; toy 100)")
    z.add_argument("--alpha-r", type=float, default=None, help="ResAlign's weight of the preservation term (toy: 1000)")
    z.add_argument("--beta", type=float, default=None, help="ResAlign's beta (0.8; the control keeps 0); with --harden plain, "
                   "--beta 0 trains the control's further steps without the hypergradient")
    z.add_argument("--text-retain", type=float, default=None,
                   help="ResAlign's weight of the keys' and values' change on benign prompts (beyond the paper)")
    z.add_argument("--net-of-damage", action="store_true", default=None,
                   help="ResAlign's harm after the simulated fine-tune net of its damage to benign images (beyond the paper)")
    z.add_argument("--resalign-steps", type=int, default=None,
                   help="outer steps of ResAlign and the control (default: the toy tuning's; hardening: the profile's)")
    z.add_argument("--harden", choices=("inpo", "ncd", "plain", "none"), default=None,
                   help="ResAlign and the control start from this method's LoRA; plain: the control erases, ResAlign "
                   "hardens its LoRA (default: ncd with --harm-loss ncd, else none)")
    z.add_argument("--preserve-pairs", type=float, default=0.0,
                   help="share of preserve images that show two preserved objects (the erase data of every method)")
    z.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    z.add_argument("--out", default="out/bench/resilience")
    z.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    r = sub.add_parser("lora-roundtrip", help="a LoRA exported here, loaded by real ComfyUI and by diffusers")
    r.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    a = ap.parse_args(argv)
    if a.which == "erase":
        from .erase import bench_erase

        log = lambda msg: print(msg, file=sys.stderr)
        method = methods.get(a.method)
        own = {f.key for f in method.flags}
        given = {f.key: getattr(a, f.key) for f in methods.all_flags().values() if getattr(a, f.key) is not None}
        if set(given) - own:
            ap.error(f"--{sorted(set(given) - own)[0].replace('_', '-')} is not a setting of {a.method}")
        data_extra = {k: getattr(a, k) for k in ("img2img_strength", "anchor") if getattr(a, k) is not None}
        if data_extra and a.method != "ncd":
            ap.error(f"--{sorted(data_extra)[0].replace('_', '-')} is a setting of ncd's data")
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()] if a.seeds else [a.seed]
        runs = []
        for i, seed in enumerate(seeds):
            runs.append(bench_erase(a.method, a.target, a.prompts, a.steps, a.lr, a.model, a.out, log=log,
                                    images_per_concept=a.images_per_concept, neighbours=a.neighbours,
                                    preserve_pairs=a.preserve_pairs, seed=seed, rank=a.rank,
                                    comfyui_prompts=a.comfyui, inpo=given, targets=a.targets, batch_size=a.batch_size,
                                    stop_when_erased=a.stop_when_erased, train_text_encoder=a.train_text_encoder,
                                    cost=not a.no_cost and i == 0, mode=a.mode, ssr_prompts=a.ssr_prompts,
                                    strengths=[float(x) for x in a.strengths.split(",") if x.strip()],
                                    forget_images=a.forget_images, data_extra=data_extra, data_cache=a.data_cache))
            if a.seeds:  # each seed as it ends: a run stopped later keeps the seeds it finished
                log(f"seed {seed}: {json.dumps(runs[-1])}")
        if a.seeds:
            from .erase import over_seeds

            print(json.dumps(over_seeds(runs)))
        else:
            print(json.dumps(runs[0]))
    if a.which == "resilience":
        from .resilience import bench_resilience

        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        resalign = {k: getattr(a, k) for k in ("configs", "iterations", "harm_loss", "harm_cap", "text_retain", "net_of_damage", "beta") if getattr(a, k) is not None}
        if a.alpha_r is not None:  # a constant weight of R, as the toy tuning's
            resalign.update(alpha_r=a.alpha_r, alpha_r_end=a.alpha_r)
        print(json.dumps(bench_resilience(a.target, a.profile or ("quick" if a.quick else "full"), a.model, a.out,
                                          a.seed, a.pool, resalign, log=log, resalign_steps=a.resalign_steps,
                                          harden={None: "auto", "none": None}.get(a.harden, a.harden),
                                          preserve_pairs=a.preserve_pairs)))
    if a.which == "lora-roundtrip":
        from .lora import bench_lora_roundtrip

        print(json.dumps(bench_lora_roundtrip()))
    if a.which == "a1111":  # the real web UI runs in its own venv: tools/webui_bench.py drives it
        from ..fresh_process import json_from

        print(json.dumps(json_from(["-m", "tools.webui_bench", "--repeats", str(a.repeats)], "the A1111 benchmark",
                                   timeout=3600, cwd=REPO)))
        return
    if a.which == "startup":
        print(json.dumps(bench_startup(a.repeats)))
    elif a.which == "dag":
        from .dag import bench_dag

        log = lambda msg: print(msg, file=sys.stderr)  # JSON alone on stdout
        print(json.dumps(bench_dag(a.target, a.prompts, a.prompts, tuple(range(a.seeds)), a.steps, a.cfg, a.model,
                                   a.guideline, out_dir=a.out, modes=tuple(a.modes.split(",")), strength=a.strength,
                                   sega_mask=a.sega_mask, comfyui_prompts=a.comfyui,
                                   guideline_images=a.guideline_images, log=log)))


if __name__ == "__main__":
    main()
