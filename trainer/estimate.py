"""The Train step's estimate: time and memory of a run, from what earlier runs measured.

Each run's ``metrics.jsonl`` has, per step, the seconds since the start and the peak memory
(``peak_mb``, logged by the engine). Time per step and memory come from the newest training run
on the same base model; with none, the time is a guess (any run's time would mislead: an SDXL
step is not a toy step) and the memory is the weights' size read from the safetensors headers
(activations come on top)."""

from __future__ import annotations

from pathlib import Path

from erasekit.erase.state import read_config, read_metrics
from erasekit.errors import ErasekitError


def recent_runs(root) -> list:
    """[(run folder, its metrics rows)], newest first: every run's metrics read once."""
    files = sorted(Path(root).glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [(m.parent, read_metrics(m.parent)) for m in files]


def same_base(run_dir, base: str) -> bool:
    """Whether the run in ``run_dir`` trained on ``base`` (as its config.toml records it)."""
    try:
        train = read_config(Path(run_dir) / "config.toml").get("train", {})
    except ErasekitError:
        return False
    return isinstance(train, dict) and train.get("base") == str(base or "").strip()


def time_line(recent, steps, batch_size, sample_every, toy: bool, base: str = "") -> str:
    per_step = None
    for run_dir, rows in recent:
        rows = [r for r in rows if "seconds" in r]  # training runs (guideline runs: no time)
        if len(rows) >= 2 and rows[-1]["step"] > rows[0]["step"] and same_base(run_dir, base):
            per_step = (rows[-1]["seconds"] - rows[0]["seconds"]) / (rows[-1]["step"] - rows[0]["step"])
            source = f"measured on the run '{run_dir.name}'"
            break
    if per_step is None:
        per_step, source = (0.3, "a guess for the toy model on a CPU") if toy else (3.0, "a rough guess")
    total = per_step * int(steps or 0) * max(1, int(batch_size or 1))
    previews = int(steps or 0) // int(sample_every) if sample_every else 0
    return (f"Rough time: **{duration(total)}** for {int(steps or 0)} steps ({per_step:.2f} s/step, {source})"
            + (f", plus {previews} previews." if previews else "."))


def memory_line(recent, base: str) -> str:
    """The peak of the newest run on this base model, or the weights' size."""
    from erasekit import checkpoints

    base = str(base or "").strip()
    for run_dir, rows in recent:
        peaks = [r["peak_mb"] for r in rows if r.get("peak_mb")]
        if peaks and same_base(run_dir, base):
            return (f"Memory: peak **{size(max(peaks) * 2**20)}** measured on the run '{run_dir.name}' (GPU memory "
                    "on a GPU, the whole process on a CPU).")
    try:
        n = checkpoints.parameter_count(base)
    except (ErasekitError, OSError):
        return "Memory: unknown (the base model cannot be read)."
    return (f"Memory: about **{size(n * 2)}** for the weights in fp16 ({size(n * 4)} in fp32), plus "
            "activations (gradient checkpointing shrinks them); the first run's peak is shown here afterwards.")


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
