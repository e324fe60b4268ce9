"""A run folder's files: config.toml, checkpoints (safetensors, never pickle), metrics.jsonl
(and the peak memory each metrics line records).

Checkpoint folders are written under a temporary name, synced, then renamed, so a run killed at
any moment keeps its last good checkpoint; the optimizer's non-tensor state and the LR schedule
travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from ..checkpoints import write_text_atomic
from ..errors import ErasekitError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def config_from_dict(cls, values: dict, where: str):
    """A ``cls`` dataclass from ``values``; an unknown key is refused naming ``where`` it came from."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ErasekitError(f"Unknown setting '{unknown[0]}' in {where}; known settings: {', '.join(sorted(known))}.")
    return cls(**values)


def read_config(path) -> dict:
    """The tables of a TOML file: ``{"train": {...}, "inpo": {...}, "data": {...}}``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ErasekitError(f"The config file '{path}' does not exist; check the path.") from None
    except tomllib.TOMLDecodeError as err:
        raise ErasekitError(f"The config file '{path}' is not valid TOML ({err}).") from None


def write_toml(path, tables: dict) -> Path:
    """Write ``tables`` ({table: dict}) to the TOML file ``path`` atomically."""
    import tomli_w

    write_text_atomic(tomli_w.dumps(tables), path)
    return Path(path)


def write_config(run_dir, sections: dict) -> Path:
    """Write ``sections`` ({table: dict or dataclass}) to ``<run_dir>/config.toml`` atomically
    (None values are left out: TOML has no null, and they mean "the default")."""
    tables = {name: {k: v for k, v in (asdict(s) if hasattr(s, "__dataclass_fields__") else s).items() if v is not None}
              for name, s in sections.items()}
    return write_toml(Path(run_dir) / "config.toml", tables)


def checkpoint_dir(run_dir, step: int) -> Path:
    """``<run>/checkpoints/checkpoint-<step>``: where the checkpoint of ``step`` lives."""
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:06d}"


def checkpoint_step(path) -> int:
    """The step a checkpoint folder holds (from its name)."""
    return int(_CHECKPOINT.match(Path(path).name).group(1))


def latest_checkpoint(run_dir) -> Path | None:
    """The complete checkpoint folder with the highest step (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else ())
             if (m := _CHECKPOINT.match(d.name)) and (d / "weights.safetensors").is_file() and (d / "state.safetensors").is_file()]
    return max(found)[1] if found else None


def save_checkpoint(run_dir, step: int, trainable: dict, optimizer, lr_scheduler, keep: int = 2, scaler=None) -> Path:
    """Write ``checkpoints/checkpoint-<step>/`` (weights + state) atomically; keep the newest ``keep``.
    ``scaler``: fp16's gradient scaler, whose scale a resume needs (from 65536 again, the first steps
    would overflow and be skipped)."""
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    if final.exists():
        return final
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
    opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"format": "erasekit.train_state/1", "step": str(step), "optimizer": json.dumps(opt_json),
            "lr_scheduler": json.dumps(lr_scheduler.state_dict())}
    if scaler is not None:
        meta["grad_scaler"] = json.dumps(scaler.state_dict())
    save_file(weights, str(tmp / "weights.safetensors"), metadata={"step": str(step)})
    save_file({**opt_tensors, **rng}, str(tmp / "state.safetensors"), metadata=meta)
    for f in tmp.iterdir():  # on disk before the rename makes the folder count
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    steps = sorted(d for d in root.iterdir() if _CHECKPOINT.match(d.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, trainable: dict, optimizer=None, lr_scheduler=None, scaler=None) -> int:
    """Restore weights (and optimizer, schedule, fp16 gradient scaler, RNG when given) from a
    checkpoint; return its step."""
    import torch
    from safetensors import safe_open

    from ..checkpoints import load_file

    path = Path(path)
    weights, _ = load_file(str(path / "weights.safetensors"), "checkpoint")
    differ = sorted(set(weights) ^ set(trainable)) or \
        [n for n, p in trainable.items() if tuple(weights[n].shape) != tuple(p.shape)]  # e.g. another rank
    if differ:
        raise ErasekitError(f"The checkpoint '{path}' does not fit this run's model ({len(differ)} weights differ, e.g. "
                            f"'{differ[0]}'); resume with the rank, targets and mode it was made with, or use a new --out folder.")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    with safe_open(str(path / "state.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(json.loads(meta["optimizer"]), tensors))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(meta["step"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """A torch optimizer state dict -> ({key: tensor}, JSON-able dict naming those keys)."""
    import torch

    tensors, state = {}, {}
    for idx, entry in state_dict["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                key = f"optimizer.{idx}.{k}"
                tensors[key] = v.detach().cpu().contiguous()
                v = {"tensor": key}
            state[str(idx)][k] = v
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(js: dict, tensors: dict) -> dict:
    def value(v):
        return tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v

    state = {int(i): {k: value(v) for k, v in entry.items()} for i, entry in js["state"].items()}
    return {"state": state, "param_groups": js["param_groups"]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (0: a fresh start, e.g. after a kill before the first checkpoint):
    the run writes those steps again. Torn lines (a kill or a full disk mid-write) go too."""
    if path.is_file():
        def kept(line):
            try:
                return json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                return False

        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and kept(ln)]
        write_text_atomic("".join(ln + "\n" for ln in lines), path)


# ----------------------------------------------------------------------------- metrics and memory


def peak_memory_mb(device) -> float | None:
    """Peak memory so far, MiB: the accelerator's allocated peak (CUDA), or on a CPU the process's
    resident peak (Unix; None elsewhere). What the trainer's memory estimate reads back."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def read_metrics(run_dir) -> list:
    """The rows of a run's ``metrics.jsonl`` (one dict a step); a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
