"""The trainer's run functions, shared by the CLI (:mod:`trainer.cli`) and the app's jobs (:mod:`trainer.work`).

Settings are resolved in this order, each overriding the one before: the engine's defaults, the
method's preset for the concept type (:mod:`erasekit.erase.methods`), the run folder's own ``config.toml`` (on
resume), the ``--config`` file (tables ``[train]``, ``[<method>]``, ``[data]``), then the flags given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from erasekit.errors import ErasekitError

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "models" / "toy"  # the bundled toy model

# flag -> (table, key); flags left out keep the value from the config / preset / default
FLAGS = {
    "target": ("train", "target"), "steps": ("train", "steps"), "seed": ("train", "seed"), "lr": ("train", "lr"),
    "rank": ("train", "rank"), "alpha": ("train", "alpha"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "mode": ("train", "mode"), "targets": ("train", "targets"),
    "optimizer": ("train", "optimizer"), "lr_scheduler": ("train", "lr_scheduler"),
    "mixed_precision": ("train", "mixed_precision"), "checkpoint_every": ("train", "checkpoint_every"),
    "sample_every": ("train", "sample_every"), "name": ("train", "name"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"), "train_text_encoder": ("train", "train_text_encoder"),
    "cpu": ("train", "cpu"), "stop_when_erased": ("train", "stop_when_erased"), "preserve_pairs": ("data", "preserve_pairs"), "forget_dir": ("data", "forget_dir"),
    "preserve_dir": ("data", "preserve_dir"), "forget_images": ("data", "forget_images"),
    "images_per_concept": ("data", "images_per_concept"), "neighbours": ("data", "neighbours"),
    "unrelated": ("data", "unrelated"), "cache": ("data", "cache"), "mask_from": ("data", "mask_from"),
    "guideline": ("data", "guideline"), "anchor": ("data", "anchor"), "img2img_strength": ("data", "img2img_strength"),
    "max_tries": ("data", "max_tries"),
}  # ... and every method's own settings (erasekit.erase.methods), in its table


def resolve(args, kind: str | None, toy: bool = False) -> dict:
    """The settings tables {"train", "method", "data"} from defaults, preset (with the toy model's
    tuning on the toy model), files and flags."""
    from erasekit.erase import methods
    from erasekit.erase.engine import read_config

    method = methods.get(args.method)
    tables = {"train": {}, "method": {}, "data": {}}
    train_row, method_row = method.preset(args.preset or kind or "object", toy=toy)
    tables["train"].update(train_row)
    tables["method"].update(method_row)
    explicit = set()  # train settings a file or a flag gave (not the preset)
    files = ([os.path.join(args.out, "config.toml")] if args.resume and os.path.isfile(os.path.join(args.out, "config.toml")) else [])
    files += [args.config] if args.config else []
    for path in files:
        for name, values in read_config(path).items():
            table = "method" if name == args.method else name
            if not isinstance(values, dict):
                raise ErasekitError(f"The setting '{name}' in '{path}' is outside a table; put it under [train], "
                                    f"[{args.method}] or [data].")
            if table not in tables:
                raise ErasekitError(f"Unknown table [{name}] in '{path}'; expected [train], [{args.method}] and [data].")
            tables[table].update(values)
            explicit.update(values if table == "train" else ())
    for attr, (table, key) in FLAGS.items():
        if getattr(args, attr, None) is not None:
            tables[table][key] = getattr(args, attr)
            explicit.update([key] if table == "train" else [])
    for flag in methods.all_flags().values():
        if getattr(args, flag.key, None) is None:
            continue
        if flag.flag not in {f.flag for f in method.flags}:  # a flag several methods share has a help of each
            owners = " and ".join(m.upper() for m in methods.methods_with_flag(flag.flag))
            raise ErasekitError(f"--{flag.flag} is a setting of {owners}, not of {args.method.upper()}; leave it out or "
                                f"pick --method {methods.methods_with_flag(flag.flag)[0]}.")
        tables["method"][flag.key] = getattr(args, flag.key)
    if tables["method"].get("init_lora"):  # harden this LoRA: the layers and rank it has, HARDEN's steps, unless told otherwise
        from erasekit.erase.resalign import HARDEN
        from erasekit.erase.resalign_data import lora_layout

        layout = lora_layout(tables["method"]["init_lora"]) if os.path.isfile(tables["method"]["init_lora"]) else {}
        tables["train"].update({k: v for k, v in {**HARDEN, **layout}.items() if k not in explicit})
    if getattr(args, "seed", None) is not None:  # --seed also draws the data (which prompts, which seeds)
        tables["data"]["seed"] = args.seed
    tables["train"].update(out=args.out, base=str(args.base), resume=bool(args.resume))
    return tables


def prepare(args, *, log=None, with_data: bool = True, check_fresh: bool = True) -> dict:
    """Everything a run needs, from the parsed arguments: the base model's components, the target,
    the resolved configs (train, method, data) and, with ``with_data``, the forget / preserve sets.
    Shared by the CLI and the trainer app (:mod:`trainer.jobs`)."""
    from erasekit import models
    from erasekit.erase import methods
    from erasekit.erase.data import resolve_concept
    from erasekit.erase.engine import TrainConfig, config_from_dict, latest_checkpoint

    log = log or (lambda m: print(m, file=sys.stderr))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    # a resumed run reuses the base model written in its config.toml
    args.base = args.base or (args.resume and saved_setting(args, "base")) or DEFAULT_BASE
    if not os.path.exists(args.base):
        raise ErasekitError(f"The base model '{args.base}' does not exist; pass --base <a diffusers folder or a .safetensors "
                            "checkpoint> (the toy model is made by `python -m erasekit.toyworld train --out models/toy`).")
    components = models.load(str(args.base), config=args.model_config)
    toy = components.is_toy

    target = args.target or saved_setting(args, "target")
    if not target:
        raise ErasekitError("No concept to erase: pass --target, e.g. --target \"red circle\".")
    kind = resolve_concept(target).kind if toy else None
    args.target = target
    if not args.out:
        args.out = os.path.join("runs", f"erase-{'-'.join(target.lower().split())}-{args.method}")
    tables = resolve(args, kind, toy)
    config = config_from_dict(TrainConfig, tables["train"], "[train]")
    method_config = config_from_dict(methods.get(args.method).config, tables["method"], f"[{args.method}]")
    data_config = config_from_dict(methods.get(args.method).data_config, tables["data"], "[data]")
    if not config.sample_prompts:
        config.sample_prompts = [target] if not toy else [f"a {target}" if kind != "character" else target]
    if getattr(method_config, "init_lora", "") and config.stop_when_erased:  # its first check would end the run
        config.stop_when_erased = False
        log("Hardening a LoRA starts erased, so this run trains its steps without the erasure check "
            "(stop when erased is off).")

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
        out["data"] = methods.get(args.method).build_data(components, target, data_config, log=log,
                                                          method_config=method_config)
    return out


def run_training(args, *, progress=None, cancel=None, log=None, prep=None):
    """Resolve the settings, make (or load) the data and train: the engine's ``RunResult``.
    The one run function of the CLI and the trainer app. The run folder is locked from the data
    on (:func:`writing_run`): another process writing it is refused with one sentence. ``prep``:
    what :func:`prepare` returned for these ``args`` (the app's Start has loaded the model for the
    data already), else it is made here."""
    from erasekit.erase import methods
    from erasekit.erase.engine import latest_checkpoint, train

    log = log or (lambda m: print(m, file=sys.stderr))
    method = methods.get(args.method)
    if prep is None:
        prep = prepare(args, log=log, with_data=False)
    elif not prep["config"].resume and latest_checkpoint(prep["config"].out) is not None:  # prepare's own check
        raise ErasekitError(f"The folder '{prep['config'].out}' already holds a run; resume it with --resume or pick "
                            "another --out folder.")
    with writing_run(prep["config"].out, "training", log):
        data = method.build_data(prep["components"], prep["target"], prep["data_config"], log=log,
                                 method_config=prep["method_config"])
        detector = None
        if prep["config"].stop_when_erased:  # judged on drawn pictures where a detector knows the concept
            from erasekit.erase.erase_check import check_interval, detector_for

            detector = detector_for(prep["components"], prep["target"])
            cfg = prep["config"]
            log(f"stop when erased: {cfg.erase_check_images} pictures judged by the {detector.name} every "
                f"{check_interval(cfg, prep['components'])} steps"
                + (f", {cfg.erase_check_clean} clean checks in a row" if cfg.erase_check_clean > 1 else "") if detector
                else "stop when erased: by the loss (no detector knows this concept)")
        return train(prep["config"], method.objective(prep["method_config"]), data, prep["components"],
                     progress=progress, cancel=cancel, sections={"data": prep["data_config"]}, log=log, detector=detector)


def writing_run(run_dir, what: str, log=None):
    """The run folder's lock (:func:`erasekit.erase.state.run_lock`) held by the main process, which
    writes the folder (under ``accelerate launch`` the others only read it)."""
    from contextlib import nullcontext

    from accelerate import PartialState

    from erasekit.erase.state import run_lock

    state = PartialState._shared_state
    main = not state or PartialState().is_main_process
    return run_lock(run_dir, what, log) if main else nullcontext()


def run_guideline(args, *, progress=None, log=None):
    """Make (or load) the images and learn a guideline embedding: ``(embedding, path written)``.
    The one guideline function of the CLI and the trainer app. ``progress(step, total, loss)``."""
    from erasekit import models
    from erasekit.dag.fit import fit_guideline
    from erasekit.erase.data import build_erase_data, guideline_data_config

    log = log or (lambda m: print(m, file=sys.stderr))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = args.base or DEFAULT_BASE
    if not os.path.exists(base):
        raise ErasekitError(f"The base model '{base}' does not exist; pass --base <a diffusers folder or a .safetensors "
                            "checkpoint>.")
    components = models.load(str(base), config=getattr(args, "model_config", None))
    toy = components.is_toy
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


def saved_setting(args, key: str):
    """``[train] key`` from the --config file or, on resume, the run's own config.toml (None: neither has it)."""
    from erasekit.erase.engine import read_config

    for path in ([args.config] if args.config else []) + ([os.path.join(args.out, "config.toml")] if args.out and args.resume else []):
        train = read_config(path).get("train", {}) if os.path.isfile(path) else {}
        if isinstance(train, dict) and train.get(key):
            return train[key]
    return None
