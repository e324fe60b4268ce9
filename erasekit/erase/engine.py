"""The training engine every erasure method runs on (INPO now; NCD and ResAlign next).

A run is a folder:

    <out>/config.toml                the resolved configuration: [train], [<method>], [data]
    <out>/metrics.jsonl              one line per optimizer step: step, lr, seconds, loss terms
    <out>/checkpoints/checkpoint-000100/weights.safetensors   the trainable weights (peft names)
                                      /state.safetensors     optimizer tensors, RNG; JSON metadata
    <out>/samples/step-000100.png    previews: one row per prompt, one column per fixed seed
    <out>/tensorboard/               SummaryWriter logs (the same terms, and the previews)
    <out>/<name>.safetensors         the exported LoRA (kohya keys + metadata, :mod:`erasekit.erase.export`)
    <out>/.lock                      while a process writes the run: its pid, host, start time (``state.run_lock``)

:func:`train` reads top to bottom like diffusers' ``train_text_to_image_lora.py``: models ->
LoRA adapters (or all UNet weights) -> optimizer and schedule -> resume -> loop -> export.
Nothing is pickled: checkpoints are safetensors files, the optimizer's non-tensor state and the
LR schedule are JSON in their metadata, and a checkpoint folder is written under a temporary
name, synced, then renamed, so a run killed at any moment keeps its last good checkpoint.

For the methods (:class:`~erasekit.erase.objective.Objective`, in ``objective.py``):
- ``loss(batch, unet, reference_ctx, ctx)`` returns named terms, ``"loss"`` the one minimised.
- The reference model is the *same* UNet with its adapters disabled (``with reference_ctx() as
  ref:``), so LoRA mode holds no second copy; full-parameter mode keeps one frozen copy.
- ``ctx`` draws noise and timesteps from a generator seeded by (seed, step, micro-step,
  process): reruns are identical and a resumed run continues exactly. Several candidates of one
  sample share a noise draw by broadcasting it (NCD: draw for ``latents[:, 0]``).
- ``ctx.trainable`` names the optimised parameters, for methods that take gradients themselves
  (ResAlign's inner loop and Hessian-vector products through ``torch.autograd.grad(...,
  create_graph=True)`` inside ``ctx.double_backward()``); such a method returns a surrogate
  ``"loss"`` whose gradient is the one to apply, e.g. ``sum((p * g.detach()).sum() for ...)``.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ErasekitError
from .export import export_lora  # noqa: F401  (part of the engine's API)
from .objective import Objective, StepContext, join_parts  # noqa: F401  (the methods' side of the engine)
from .state import (  # noqa: F401
    _truncate_metrics,
    checkpoint_dir,
    config_from_dict,
    latest_checkpoint,
    load_checkpoint,
    peak_memory_mb,
    read_config,
    read_metrics,
    run_lock,
    save_checkpoint,
    write_config,
)

# peft target_modules. A string is a regex matched against the full module name.
TARGET_PRESETS = {
    "cross-attention": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",  # text -> image attention only
    "attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",  # self- and cross-attention (ResAlign)
    "feed-forward": r".*\.ff\.net\.(0\.proj|2)$",  # the transformer blocks' GEGLU MLPs (the toy model's tuning)
    "all": None,  # every Linear and Conv2d of the down / mid / up blocks, listed from the model
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
OPTIMIZERS = ("adamw", "adafactor", "sgd")


@dataclass
class TrainConfig:
    """Everything the engine needs; written to ``config.toml`` as ``[train]``."""

    out: str = "runs/erase"
    target: str = ""  # the erased concept, as text (metadata, default preview prompt)
    base: str = ""  # where the base model came from (metadata only)
    name: str = ""  # file name of the exported LoRA; default erase-<target>-<method>
    seed: int = 0
    steps: int = 300
    batch_size: int = 1  # per set (forget and preserve) and per micro-step
    grad_accum: int = 1
    mode: str = "lora"  # "lora" | "full"
    rank: int = 4
    alpha: float | None = None  # LoRA alpha; default = rank (scale 1)
    targets: str = "attention"  # a TARGET_PRESETS name, or module-name suffixes "to_k,to_v"
    train_text_encoder: bool = False
    optimizer: str = "adamw"  # adamw | adafactor | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-2
    momentum: float = 0.9  # SGD only
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 0  # 0: no previews
    sample_prompts: list = field(default_factory=list)
    sample_seeds: list = field(default_factory=lambda: [0, 1])
    sample_steps: int = 20
    sample_cfg: float = 3.0
    tensorboard: bool = True
    export: bool = True
    resume: bool = False
    stop_when_erased: bool = False  # end the run once the concept is erased: judged pictures, else the objective's rule
    erase_check_every: int = 0  # stop_when_erased with a detector (erase_check.py): draw and judge every N steps
    # (0: 25 on the toy model; 100 elsewhere, where 16 pictures cost about as much as a hundred training steps) ...
    erase_check_images: int = 16  # ... this many pictures of the preview prompts ...
    erase_check_share: float = 0.0  # ... and stop once at most this share of them shows the concept ...
    erase_check_clean: int = 1  # ... in this many checks in a row (more: fewer early verdicts, a deeper erasure)
    erase_check_prompts: list = field(default_factory=list)  # the check's prompts, in turn (default: erase_check.check_prompts)
    cpu: bool = False  # force the CPU even where an accelerator is present


@dataclass
class RunResult:
    status: str  # "done" or "cancelled"
    step: int
    run_dir: Path
    checkpoint: Path | None
    lora: Path | None
    last: dict  # the last step's loss terms
    erased_at: int | None = None  # the step where stop_when_erased ended the run


# ----------------------------------------------------------------------------- configuration


def unet_lora_targets(unet, targets: str):
    """peft ``target_modules`` for a preset name (:data:`TARGET_PRESETS`) or a comma-separated
    list of module-name suffixes ("to_k,to_v")."""
    import torch.nn as nn

    if TARGET_PRESETS.get(targets):
        return TARGET_PRESETS[targets]
    if targets == "all":
        return [n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
                and n.startswith(("down_blocks.", "mid_block.", "up_blocks."))]
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ErasekitError(f"No LoRA target modules in '{targets}'; use {', '.join(TARGET_PRESETS)} or names like 'to_k,to_v'.")
    return names


def _check(config: TrainConfig) -> None:
    choices = {"mode": ("lora", "full"), "optimizer": OPTIMIZERS, "mixed_precision": ("no", "fp16", "bf16")}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ErasekitError(f"Setting {key} = '{getattr(config, key)}' is not one of {', '.join(allowed)}.")
    if int(config.erase_check_every) < 0:
        raise ErasekitError(f"Setting erase_check_every = {config.erase_check_every} must be at least 0 (0: automatic).")
    for key in ("steps", "batch_size", "grad_accum", "rank", "checkpoint_every", "keep_checkpoints", "erase_check_images",
                "erase_check_clean"):
        if int(getattr(config, key)) < 1:
            raise ErasekitError(f"Setting {key} = {getattr(config, key)} must be at least 1.")
    if not 0.0 <= config.erase_check_share < 1.0:
        raise ErasekitError(f"Setting erase_check_share = {config.erase_check_share} must be at least 0 and below 1 "
                            "(the share of check pictures that may still show the concept).")


# ----------------------------------------------------------------------------- checkpoints


def train(config: TrainConfig, objective: Objective, data, components, *, progress=None, cancel=None,
          sections: dict | None = None, log=None, detector=None) -> RunResult:
    """Fine-tune ``components`` (an :class:`erasekit.models.Components`) with ``objective`` on ``data``.

    Args:
        data: an ``EraseData`` (or anything with ``sample(generator, batch_size)`` and ``preserved``).
        progress: called after every optimizer step as ``progress(step, total, terms)``.
        cancel: a ``threading.Event`` or a callable; checked between steps. A cancelled run
            writes a checkpoint and returns with ``status == "cancelled"`` (resume continues it).
        sections: more tables for ``config.toml`` (e.g. ``{"data": DataConfig(...)}``).
        log: where a line about the run folder goes (a stale lock taken over, an erasure check); default stderr.
        detector: with ``config.stop_when_erased``, judge the concept on drawn pictures
            (:mod:`.erase_check`) instead of the objective's loss rule.
    Raises:
        ErasekitError: a bad setting, a run folder another process writes (its ``.lock``), a
        checkpoint that does not fit, a loss that is not finite, or a write that failed (a full
        disk); the last good checkpoint is kept and named in the message.
    """
    from contextlib import nullcontext

    from accelerate import Accelerator

    _check(config)
    _reset_accelerate_state()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.cpu)
    # the main process writes the run folder: it holds the folder's lock for the whole run
    with run_lock(config.out, "training", log) if accelerator.is_main_process else nullcontext():
        return _train(accelerator, config, objective, data, components, progress, cancel, sections, log, detector)


def _train(accelerator, config: TrainConfig, objective: Objective, data, components, progress, cancel, sections,
           log, detector) -> RunResult:
    """:func:`train`'s body, with the run folder locked."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    device, main = accelerator.device, accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    run_dir = Path(config.out)

    # 1. The run folder. A fresh run refuses a folder that already holds one.
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None and not config.resume:
        raise ErasekitError(f"The folder '{run_dir}' already holds a run (last checkpoint '{resume_from.name}'); "
                            "resume it with --resume or pick another --out folder.")
    if main:
        for stale in (run_dir / "checkpoints").glob("*.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)

    # 2. Models: everything frozen, then LoRA adapters (or all UNet weights) made trainable.
    unet, text_encoder = components.unet, components.text_encoder
    if getattr(unet.config, "addition_embed_type", None) and config.train_text_encoder:
        raise ErasekitError("A text-encoder LoRA is not supported for SDXL yet (it has two encoders); "
                            "train the UNet only (leave --train-text-encoder off).")
    unet.requires_grad_(False)
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
    train_te = config.train_text_encoder and text_encoder is not None
    torch.manual_seed(config.seed)  # LoRA's A matrices are random (B starts at zero)
    reference, te_original, base_weights = None, None, None
    if config.mode == "lora":
        from peft import LoraConfig

        if getattr(unet, "peft_config", None):
            raise ErasekitError("This UNet already carries a LoRA adapter; load a clean base model to train a new erasure.")
        alpha = config.alpha or config.rank
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=unet_lora_targets(unet, config.targets)))
        if train_te:
            text_encoder.add_adapter(LoraConfig(r=config.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                                target_modules=TEXT_ENCODER_TARGETS))
        unet.to(device)
        if weight_dtype != torch.float32:
            unet.to(dtype=weight_dtype)  # frozen base weights in the compute dtype ...
    else:  # full parameters: the reference is a frozen copy (the only mode that needs one)
        reference = copy.deepcopy(unet).eval().to(device)
        if weight_dtype != torch.float32:
            reference.to(dtype=weight_dtype)
            # the export's LoRA is the change from these weights, not from their fp16/bf16 rounding
            base_weights = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
        unet.requires_grad_(True).to(device)
        if train_te:
            te_original = {k: v.detach().cpu().clone() for k, v in text_encoder.state_dict().items()}
            text_encoder.requires_grad_(True)
    if text_encoder is not None:
        text_encoder.to(device, dtype=weight_dtype if not train_te or config.mode == "lora" else torch.float32)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    if train_te:
        trainable.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    for p in trainable.values():  # ... and the trained weights in float32
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()

    objective.setup(data, components, config, trainable)  # its checks, data, initial weights (a resume overwrites them)

    # 3. Optimizer and learning-rate schedule.
    optimizer = _make_optimizer(config, list(trainable.values()))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.steps)
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)

    # 4. Resume: weights, optimizer moments, schedule and RNG from the last complete checkpoint.
    # The run's record (config.toml) is written once the checkpoint is known to fit: a resume with the
    # wrong rank fails above and leaves the record of what the run was made with.
    step = 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, trainable, optimizer, lr_scheduler, accelerator.scaler)
        _use_current_settings(optimizer, lr_scheduler, config)
    if main:
        write_config(run_dir, {"train": config, objective.name: objective.config or {}, **(sections or {})})
        _truncate_metrics(run_dir / "metrics.jsonl", step)  # steps logged after the checkpoint run again
    history = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step] if step else []
    if train_te:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    base_unet = accelerator.unwrap_model(unet)
    trained = [unet, text_encoder] if train_te else [unet]

    @contextmanager
    def reference_ctx():
        """The frozen base model, without gradients: the same UNet with its adapters disabled."""
        with torch.no_grad():
            if reference is not None:
                yield reference
                return
            base_unet.disable_adapters()
            try:
                yield base_unet
            finally:
                base_unet.enable_adapters()

    # 5. Logs: metrics.jsonl, TensorBoard, a preview of the base model before the first step.
    writer = _tensorboard(run_dir, step, log) if main and config.tensorboard else None
    metrics = None
    prompts = config.sample_prompts or ([config.target] if config.target else [])
    status, terms, last_ckpt, erased_at = "done", {}, resume_from, None
    checked = {}  # the last erasure check's counts, written with the next step's metrics (a resume reads them back)
    try:
        if main:
            try:
                metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            except OSError as err:
                raise _write_failed("the metrics", step, err, resume_from) from None
        if main and config.sample_every and prompts and step == 0:
            _preview(components, config, prompts, 0, run_dir, writer, accelerator, resume_from)

        # 6. The loop: one optimizer step = grad_accum micro-steps.
        t_start = time.time()
        unet.train()
        while step < config.steps:
            asked = cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel())
            if _on_any_process(accelerator, asked, device):  # all stop at the same step, or the rest would hang
                status = "cancelled"
                break
            if config.stop_when_erased and _erased(accelerator, objective, history, device, detector,
                                                   (components, config, prompts, step, log), checked):
                erased_at = step
                break
            sums = {}
            for micro in range(config.grad_accum):
                seed = np.random.SeedSequence([config.seed, step, micro, accelerator.process_index]).generate_state(2)
                g = torch.Generator().manual_seed(int(seed[0]) << 31 | int(seed[1]) >> 1)
                batch = _to_device(data.sample(g, config.batch_size), device)
                ctx = StepContext(step, g, noise_scheduler, device, trainable, text_encoder if train_te else None,
                                  base_unet)
                with accelerator.accumulate(*trained):
                    with accelerator.autocast():
                        out = objective.loss(batch, unet, reference_ctx, ctx)
                    loss = out["loss"]
                    losses = loss.detach().float().reshape(1)
                    if accelerator.num_processes > 1:
                        losses = accelerator.gather(losses)  # every process's: all stop if one loss is bad
                    if not torch.isfinite(losses).all():
                        raise _not_finite(step + 1, float(losses[~torch.isfinite(losses)][0]), last_ckpt, optimizer)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / config.grad_accum
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            step += 1
            terms = {**sums, **checked}
            checked.clear()
            history.append(terms)
            if main:
                _append_metrics(metrics, {"step": step, "lr": lr, "seconds": round(time.time() - t_start, 3),
                                          "peak_mb": peak_memory_mb(device), **terms}, last_ckpt)
                if writer is not None:
                    for k, v in terms.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    writer.add_scalar("train/lr", lr, step)
            if progress is not None:
                progress(step, config.steps, terms)
            if step % config.checkpoint_every == 0 or step == config.steps:
                last_ckpt = _checkpoint(accelerator, run_dir, step, trainable, optimizer, lr_scheduler, config, last_ckpt)
            if main and config.sample_every and prompts and step % config.sample_every == 0:
                _preview(components, config, prompts, step, run_dir, writer, accelerator, last_ckpt)
        if (status == "cancelled" or erased_at is not None) and step > 0:
            last_ckpt = _checkpoint(accelerator, run_dir, step, trainable, optimizer, lr_scheduler, config, last_ckpt)
    finally:  # a full disk may fail these again: the error that stopped the run is the one to report
        for log_file in (metrics, writer):
            if log_file is not None:
                try:
                    log_file.close()
                except OSError:
                    pass

    # 7. Export the LoRA (kohya keys + metadata) once the run is complete.
    lora = None
    if status == "done" and config.export and main:
        lora = export_lora(config, objective.name, components, base_unet, accelerator.unwrap_model(text_encoder)
                           if train_te else None, base_weights or (reference.state_dict() if reference is not None else None),
                           te_original, list(getattr(data, "preserved", [])))
    return RunResult(status, step, run_dir, last_ckpt, lora, terms, erased_at)


def _reset_accelerate_state() -> None:
    """accelerate keeps its settings in process-wide singletons and refuses a second Accelerator
    with other ones; one process may run several trainings (tests, the trainer app), so they are
    cleared here, except the distributed state of a multi-process ``accelerate launch``."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    single = not PartialState._shared_state or PartialState().num_processes == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()


def _use_current_settings(optimizer, lr_scheduler, config: TrainConfig) -> None:
    """After a resume, this run's learning rate, weight decay and momentum, not the checkpoint's:
    what a user changes after a NaN stop (its message says to lower the learning rate and resume).
    The schedule keeps its position; diffusers' schedules are LambdaLR (lr = base x lambda(step))."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        if "weight_decay" in group:
            group["weight_decay"] = config.weight_decay
        if "momentum" in group:
            group["momentum"] = config.momentum
    lr_scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, getattr(lr_scheduler, "lr_lambdas", [])):
        group["lr"] = config.lr * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _make_optimizer(config: TrainConfig, params):
    import torch

    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    from transformers.optimization import Adafactor  # a fixed learning rate, as the other two

    return Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def _erased(accelerator, objective, history, device, detector=None, check=None, checked=None) -> bool:
    """Whether the concept is gone, shared with every process so that all stop at the same step: with a
    ``detector``, judged on pictures the main process draws every ``erase_check_every`` steps
    (:mod:`.erase_check`), gone once ``erase_check_clean`` checks in a row find it in at most
    ``erase_check_share`` of them (the earlier checks' counts are in the history, ``check_found`` and
    ``check_pictures``; this one's go into ``checked`` for the next metrics row); else the objective's
    verdict on the main process's history (the one metrics.jsonl keeps and a resume reads back)."""
    import torch

    if detector is not None:
        from .erase_check import check_erased, check_interval, check_prompts

        components, config, prompts, step, log = check
        gone = False
        if step and step % check_interval(config, components) == 0 and accelerator.is_main_process:
            with accelerator.autocast():
                found, n = check_erased(components, check_prompts(config, components, prompts), detector,
                                        config.erase_check_images, config.sample_steps, config.sample_cfg)
            if checked is not None:
                checked.update(check_found=found, check_pictures=n)
            counts = [(r["check_found"], r["check_pictures"]) for r in history if "check_found" in r] + [(found, n)]
            in_a_row, need = 0, int(config.erase_check_clean)
            for f, m in reversed(counts):  # the clean checks that end the history
                if f > config.erase_check_share * m:
                    break
                in_a_row += 1
            gone = in_a_row >= need
            note = f" ({min(in_a_row, need)} of {need} clean checks in a row)" if need > 1 else ""
            (log or _stderr)(f"step {step}: {found} of {n} check pictures show '{config.target}'" + note
                           + (" - erased, the run ends here" if gone else ""))
    else:
        gone = objective.erased(history)
    flag = torch.tensor([int(bool(gone))], device=device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        flag = broadcast(flag, from_process=0)
    return bool(flag.item())


def _on_any_process(accelerator, flag: bool, device) -> bool:
    """Whether ``flag`` holds on any process (a Ctrl-C reaches them at different moments): a process
    that left the loop alone would leave the others waiting in the next gradient all-reduce."""
    if accelerator.num_processes == 1:
        return bool(flag)
    import torch

    return bool(accelerator.reduce(torch.tensor([int(bool(flag))], device=device), reduction="sum").item() > 0)


def _checkpoint(accelerator, run_dir, step, trainable, optimizer, lr_scheduler, config, last=None):
    """The main process writes the checkpoint; every process gets its path (for the NaN message). A
    failed write (a full disk) leaves the last good checkpoint as it was and says so."""
    from safetensors import SafetensorError

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            save_checkpoint(run_dir, step, trainable, optimizer, lr_scheduler, config.keep_checkpoints, accelerator.scaler)
        except (OSError, SafetensorError) as err:  # safetensors reports its own I/O errors as SafetensorError
            raise _write_failed("the checkpoint", step, err, last) from None
    accelerator.wait_for_everyone()
    return checkpoint_dir(run_dir, step)


def _write_failed(what: str, step: int, err: Exception, last) -> ErasekitError:
    """The one sentence for a write that failed (a full disk) while training: a checkpoint, a metrics
    line or a preview alike. The run stops; the last good checkpoint stays as it was."""
    from ..checkpoints import write_error_reason

    kept = f"the last good checkpoint '{last}' is kept" if last else "no earlier checkpoint exists"
    return ErasekitError(f"Could not write {what} of step {step} ({write_error_reason(err)}); {kept}: "
                         "free disk space and run again with --resume.")


def _append_metrics(metrics, row: dict, last) -> None:
    """One line of ``metrics.jsonl``, flushed; a failed write stops the run with :func:`_write_failed`'s
    sentence (a torn line is dropped by the resume, :func:`~erasekit.erase.state._truncate_metrics`)."""
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as err:
        raise _write_failed("the metrics", row["step"], err, last) from None


def _tensorboard(run_dir, step, log):
    """A TensorBoard writer, or None (with a log line) where the tensorboard package is not installed:
    metrics.jsonl holds the same numbers."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        (log or _stderr)("TensorBoard is not installed: the run's numbers go to metrics.jsonl only "
                         "(pip install tensorboard to see them there too).")
        return None
    return SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=step or None)


def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def _not_finite(step: int, value: float, last_ckpt, optimizer) -> ErasekitError:
    lr = optimizer.param_groups[0]["lr"]
    kept = f"the last good checkpoint '{last_ckpt}' is kept" if last_ckpt else "no checkpoint had been written yet"
    return ErasekitError(f"Training stopped at step {step} because the loss became {value} (not a finite number); "
                         f"{kept}: lower the learning rate (now {lr:g}) and run again with --resume.")


def _preview(components, config, prompts, step, run_dir, writer, accelerator, last=None):
    """Sample ``prompts`` x ``config.sample_seeds`` with the current weights; save one PNG grid,
    atomically (a full disk stops the run with :func:`_write_failed`'s sentence and leaves no torn
    PNG for the page to show)."""
    import os

    import numpy as np
    from PIL import Image

    from ..dag.sampling import sample

    seeds = [int(s) for s in config.sample_seeds]
    with accelerator.autocast():
        res = sample(components, [p for p in prompts for _ in seeds], seeds * len(prompts),
                     steps=config.sample_steps, cfg=config.sample_cfg)
    n, c, h, w = res.images.shape  # [P * S, 3, H, W] in [0, 1]
    grid = res.images.view(len(prompts), len(seeds), c, h, w).permute(2, 0, 3, 1, 4).reshape(c, len(prompts) * h, len(seeds) * w)
    path = Path(run_dir) / "samples" / f"step-{step:06d}.png"
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_failed("the preview", step, err, last) from None
    if writer is not None:
        writer.add_image("samples", grid, step)
