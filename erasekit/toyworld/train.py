"""Train the toy text-to-image model from scratch on scenes rendered on the fly.

    python -m erasekit.toyworld train --out models/toy --minutes 50 --seed 0

Top to bottom, like diffusers' `train_text_to_image.py`: build a randomly initialised
`ToyPipeline`, then for each step render a batch of scenes (`scenes.render_batch`), encode them
with the exact latent map, add DDPM noise, and train the UNet and the text encoder jointly on
the epsilon loss with min-SNR-5 weighting. An EMA of the weights is kept and is what gets
saved. Everything that varies from step to step (the scenes, caption dropout, noise,
timesteps) is drawn from generators seeded by (seed, step), so a run resumed from a checkpoint
continues exactly as if it had not stopped, and `--steps N --seed S` reproduces a model.

The learning rate is constant after a short warm-up (the EMA does the averaging), so the
schedule does not depend on the run length: `--minutes M` simply stops after M minutes of
wall clock (the machine is shared, so its speed varies), the model card records the number of
steps done, and `--steps N` with the same seed reproduces the weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CKPT_NAME = "train_state.safetensors"


@dataclass
class TrainConfig:
    out: str = "models/toy"
    seed: int = 0
    minutes: float | None = None  # wall-clock budget of this session
    steps: int | None = None  # exact step budget (wins over `minutes`)
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.2  # empty caption, so that classifier-free guidance has a prior
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # min-SNR weighting (Hang et al. 2023)
    p_objects: tuple = (0.4, 0.4, 0.2)  # P(1, 2, 3 objects) in the training scenes
    text_hidden: int = 64
    threads: int = 2
    mixed_precision: str = "no"
    ckpt_dir: str = ".cache/toyworld-train"
    ckpt_every_minutes: float = 5.0
    resume: bool = True
    extra: dict = field(default_factory=dict)


class ThreadTuner:
    """Picks the intra-op thread count (1 or `max_threads`) from measured step times.

    Why: on a shared 2-core machine, two OpenMP threads that each wait for the other at every
    op run at the speed of the more contended core; measured here with one other busy process,
    a step took 15-20 s with 2 threads and 4.5-6 s with 1. On an idle machine 2 threads win.
    So every `probe_every` steps a few steps run with the other count, and the faster one (median
    of its recent steps) is used until the next probe. Only the speed changes; the maths is the
    same (up to float summation order).
    """

    def __init__(self, max_threads: int, probe_every: int = 40, probe_len: int = 3):
        import collections

        self.options = sorted({1, max_threads})
        self.times = {n: collections.deque(maxlen=6) for n in self.options}
        self.best = max_threads
        self.probe_every, self.probe_len = probe_every, probe_len
        self.current = None
        self.calls = 0  # counts this session's steps: a resumed run probes at once too

    def choose(self, step: int) -> int:
        import torch

        i, self.calls = self.calls, self.calls + 1
        other = [n for n in self.options if n != self.best]
        # steps 0-2 warm up, 3-5 probe, then a probe of probe_len steps every probe_every steps
        n = other[0] if other and 3 <= i % self.probe_every < 3 + self.probe_len else self.best
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n
        return n

    def record(self, seconds: float) -> None:
        import statistics

        self.times[self.current].append(seconds)
        med = {n: statistics.median(t) for n, t in self.times.items() if len(t) >= 2}
        if len(med) == len(self.options):
            self.best = min(med, key=med.get)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant (independent of the run length, see the module docstring)."""
    return min(1.0, (step + 1) / cfg.warmup_steps)


def scene_latents(images_u8):
    """uint8 [B, 32, 32, 3] scenes -> latents [B, 12, 16, 16] in [-1, 1].

    Same as `ToyVAE.encode` of the 128x128 display image (area mean of nearest-upsampled
    pixels is the pixel itself), without building the display image.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.pixel_unshuffle(x, 2)


def _save_state(path: Path, step: int, seconds: float, models: dict, ema: list, optimizer, cfg: TrainConfig):
    """One safetensors file: live weights, EMA weights, AdamW moments; metadata: step, config."""
    import torch

    from ..checkpoints import save_file_atomic

    tensors = {}
    params = []
    for name, model in models.items():
        for k, v in model.state_dict().items():
            tensors[f"model.{name}.{k}"] = v.detach().cpu().contiguous()
        params += list(model.parameters())
    for i, e in enumerate(ema):
        tensors[f"ema.{i}"] = e.detach().cpu().contiguous()
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq", "step"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(st[k]).detach().cpu().reshape(-1).contiguous() \
                    if k == "step" else st[k].detach().cpu().contiguous()
    meta = {"step": str(step), "seconds": f"{seconds:.1f}", "config": json.dumps(asdict(cfg))}
    save_file_atomic(tensors, str(path), meta)  # a run killed mid-save keeps the previous checkpoint


def _load_state(path: Path, models: dict, ema: list, optimizer=None) -> tuple[int, float]:
    """Inverse of `_save_state`; returns (step, cumulative training seconds)."""
    from ..checkpoints import load_file

    tensors, meta = load_file(str(path), "training checkpoint")
    params = []
    for name, model in models.items():
        prefix = f"model.{name}."
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        params += list(model.parameters())
    for i, e in enumerate(ema):
        e.copy_(tensors[f"ema.{i}"])
    for i, p in enumerate(params):
        if optimizer is not None and f"opt.{i}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
            }
    return int(meta["step"]), float(meta.get("seconds", 0.0))


def train(cfg: TrainConfig) -> Path:
    """Run training; write the model folder `cfg.out` (EMA weights) and its MODEL_CARD.md."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .model import build_toy_pipeline, save_toy_pipeline, toy_scheduler_config
    from .scenes import SceneSampler, render_batch

    torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device

    pipe = build_toy_pipeline(seed=cfg.seed, text_hidden=cfg.text_hidden)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    unet.train()
    text_encoder.train()
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler_config())  # ignores DDIM-only keys
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # [1000]
    loss_weight = torch.clamp(snr, max=cfg.snr_gamma) / snr  # min-SNR-gamma for epsilon targets

    models = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [p.detach().clone() for p in params]

    ckpt_path = Path(cfg.ckpt_dir) / CKPT_NAME
    step, total, seconds_before = 0, cfg.steps, 0.0
    if cfg.resume and ckpt_path.is_file():
        step, seconds_before = _load_state(ckpt_path, models, ema, optimizer)
        print(f"resumed from {ckpt_path} at step {step}")
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    ema = [e.to(device) for e in ema]

    sampler = SceneSampler(p_objects=tuple(cfg.p_objects))
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(captions):
        rows = []
        for c in captions:
            if c not in token_cache:
                token_cache[c] = tokenizer([c], padding="max_length", truncation=True,
                                           max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
            rows.append(token_cache[c])
        return torch.stack(rows)

    t_start, t_last_ckpt = time.time(), time.time()
    run_seconds = 0.0
    losses: list[float] = []
    log_path = Path(cfg.ckpt_dir) / "loss.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=total, initial=step, desc="toy train", dynamic_ncols=True, mininterval=5)
    tuner = ThreadTuner(cfg.threads)
    # SIGTERM (a shared machine's clean-up, a job queue's cancel): finish the step, checkpoint, stop.
    import signal

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    while (total is None or step < total) and stop["signal"] is None:
        t_step = time.time()
        tuner.choose(step)
        # ---- data: scenes, captions (with dropout), noise and timesteps, all seeded by (seed, step)
        images, captions, _ = render_batch(cfg.seed * 1_000_003 + step, cfg.batch_size, sampler)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        ids = tokenize(captions)
        ids[drop] = empty_ids[0]
        latents = scene_latents(images)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        latents, noise, timesteps, ids = (t.to(device) for t in (latents, noise, timesteps, ids))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        # ---- forward / backward (text encoder trained jointly)
        lr_now = cfg.lr * _lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        with accelerator.autocast():
            cond = text_encoder(ids)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[timesteps]).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- EMA (with the usual warm-up so early steps do not dominate)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if tuner.calls > 1:  # the first step of a session includes one-off set-up costs
            tuner.record(time.time() - t_step)

        if total is None and time.time() - t_start > cfg.minutes * 60:
            break  # minutes mode: out of wall clock
        if step % 50 == 0:
            avg = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr_now:.2e}", threads=tuner.best)
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": avg, "lr": lr_now, "threads": tuner.best,
                                    "t": round(time.time() - t_start, 1)}) + "\n")
        if time.time() - t_last_ckpt > cfg.ckpt_every_minutes * 60 and (total is None or step < total):
            _save_state(ckpt_path, step, seconds_before + time.time() - t_start, models,
                        [e.cpu() for e in ema], optimizer, cfg)
            t_last_ckpt = time.time()
            print(f"\ncheckpoint at step {step}: {ckpt_path}", flush=True)
    bar.close()
    signal.signal(signal.SIGTERM, previous)
    run_seconds = time.time() - t_start
    _save_state(ckpt_path, step, seconds_before + run_seconds, models, [e.cpu() for e in ema], optimizer, cfg)
    if stop["signal"] is not None:
        print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, run again to resume")
        raise SystemExit(128 + stop["signal"])

    # ---- write the EMA weights as the model
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    pipe.unet = accelerator.unwrap_model(unet).eval()
    pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval()
    out = save_toy_pipeline(pipe.to("cpu"), cfg.out)
    info = {"steps": step, "seed": cfg.seed, "train_minutes": round((seconds_before + run_seconds) / 60, 1),
            "final_loss_avg100": float(np.mean(losses[-100:])) if losses else None, "config": asdict(cfg)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out)
    print(f"saved {out} after {step} steps")
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write the EMA weights of a training checkpoint as a model folder (to evaluate a run
    while it trains). The architecture is rebuilt from the config stored in the checkpoint."""
    from ..checkpoints import read_header
    from ..errors import ModelFileError
    from .model import build_toy_pipeline, save_toy_pipeline

    meta = read_header(str(ckpt), "training checkpoint")[1]
    if not {"config", "step"} <= meta.keys():
        raise ModelFileError(f"'{ckpt}' is not a toy-model training checkpoint (its metadata has no 'config' and "
                             "'step'); pass the checkpoint.safetensors of a toy training run.")
    cfg = json.loads(meta["config"])
    pipe = build_toy_pipeline(seed=0, text_hidden=cfg.get("text_hidden", 64))
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    params = [p for m in models.values() for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    step, _ = _load_state(Path(ckpt), models, ema)
    import torch

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    print(f"exported step {step} of {ckpt} to {out}")
    return save_toy_pipeline(pipe, out)


def write_model_card(model_dir: str | Path, eval_result: dict | None = None) -> Path:
    """(Re)write MODEL_CARD.md from training.json and, when given or present, eval.json."""
    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    if eval_result is not None:
        (model_dir / "eval.json").write_text(json.dumps(eval_result, indent=2) + "\n")
    elif (model_dir / "eval.json").is_file():
        eval_result = json.loads((model_dir / "eval.json").read_text())
    cfg = info["config"]
    size_mb = sum(p.stat().st_size for p in model_dir.rglob("*.safetensors")) / 2**20
    lines = [
        "# Toy text-to-image model (Erasekit toy world)",
        "",
        "Stable Diffusion's architecture at toy scale, trained from scratch on procedural scenes",
        "(`erasekit/toyworld/scenes.py`) whose ground truth is exact. Components: `ToyVAE` (fixed,",
        "exactly invertible 8x latent map, 128x128 <-> 12x16x16), `ToyCLIPTextModel` (CLIPTextModel with",
        "a content gate), `UNet2DConditionModel`, DDIM scheduler config with x0 clipping (the noise direction",
        "recomputed from the clipped x0).",
        "",
        "## Training",
        f"- Data: scenes rendered on the fly (1/2/3 objects with p = {tuple(cfg['p_objects'])}, 15% of objects a",
        "  named character, half the backgrounds patterned; captions in several phrasings);"
        f" {cfg['caption_dropout']:.0%} caption dropout.",
        f"- Steps: {info['steps']} at batch {cfg['batch_size']} (seed {info['seed']});"
        f" {info['train_minutes']} min of wall clock on a shared 2-core CPU.",
        f"- AdamW lr {cfg['lr']} (warm-up {cfg['warmup_steps']} steps, then constant),"
        f" wd {cfg['weight_decay']}, grad clip {cfg['grad_clip']}, min-SNR-{cfg['snr_gamma']:g},"
        f" EMA {cfg['ema_decay']} (EMA weights shipped).",
        f"- Reproduce: `python -m erasekit.toyworld train --out {cfg['out']} --steps {info['steps']}"
        f" --seed {info['seed']} --batch-size {cfg['batch_size']} --lr {cfg['lr']:g}"
        f" --caption-dropout {cfg['caption_dropout']:g}` (at most 2 CPU threads).",
        f"- Final training loss (mean of last 100 steps): {info['final_loss_avg100']:.4f}."
        if info.get("final_loss_avg100") is not None else "",
        f"- Weights: {size_mb:.1f} MiB of safetensors.",
        "",
    ]
    if eval_result:
        lines += ["## Measured quality (`python -m erasekit.toyworld eval --json`)", "",
                  "| metric | value | sampler / setting |", "|---|---|---|"]
        for key, val in eval_result.items():
            if isinstance(val, dict) and "value" in val:
                lines.append(f"| {key} | {val['value']} | {val.get('sampler', '')} {val.get('note', '')} |")
            elif isinstance(val, dict):
                for sub, v in val.items():
                    if isinstance(v, dict) and "value" in v:
                        lines.append(f"| {key} {sub} | {v['value']} | {v.get('sampler', '')} |")
        lines += ["", "Full result: `eval.json` next to this card.", ""]
    path = model_dir / "MODEL_CARD.md"
    # Hand-written findings live under "## Notes" and survive a rewrite.
    if path.is_file() and "\n## Notes" in path.read_text():
        lines += ["## Notes" + path.read_text().split("\n## Notes", 1)[1].rstrip("\n")]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path
