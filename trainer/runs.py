"""Run folders of the trainer app: find what a run made, export it, list runs with their status."""

from __future__ import annotations

import os
import re
from pathlib import Path

from erasekit.errors import ErasekitError
from trainer.jobs import JOBS, busy_with, slug  # noqa: F401  (slug: one spelling of names for runs and files)

GUIDELINE_PREFIX = "guideline-"  # a run's guideline embedding: <run>/guideline-<concept>.safetensors


def find_lora(run_dir: Path) -> Path | None:
    """The run's exported LoRA (the newest .safetensors beside config.toml; the data cache and a
    guideline embedding aside)."""
    files = [p for p in Path(run_dir).glob("*.safetensors")
             if p.name != "data.safetensors" and not p.name.startswith(GUIDELINE_PREFIX)]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def find_guideline(run_dir: Path) -> Path | None:
    """The run's guideline embedding (DAG guideline tokens), the newest if several."""
    files = list(Path(run_dir).glob(f"{GUIDELINE_PREFIX}*.safetensors"))
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def guideline_path(run_dir: Path, target: str) -> Path:
    return Path(run_dir) / f"{GUIDELINE_PREFIX}{slug(target)}.safetensors"


def clean_file_name(name: str, what: str) -> str:
    """A user's file name without folders, odd characters or the .safetensors suffix."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip("-.")
    clean = clean[: -len(".safetensors")] if clean.endswith(".safetensors") else clean
    if not clean:
        raise ErasekitError(f"The {what} name is empty; give a file name such as 'erase-red-circle'.")
    return clean


def export_guideline(run_dir: Path, dest_dir: Path, name: str) -> Path:
    """Copy the run's guideline embedding to ``dest_dir/<name>.safetensors`` (checked on the way:
    it loads as an embedding; written atomically)."""
    from erasekit.dag.guideline import GuidelineEmbedding

    src = find_guideline(run_dir)
    if src is None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no guideline embedding yet; train it first "
                            "(method: DAG guideline tokens).")
    emb = GuidelineEmbedding.load(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{clean_file_name(name, 'embedding')}.safetensors"
    emb.save(str(dest))
    return dest


def architecture_from_lora(lora: dict, meta: dict):
    """The base-model family of a LoRA file (for re-saving it), from its metadata and a layer's width."""
    from erasekit import checkpoints

    name = meta.get("ss_base_model_version", "")
    widths = [int(w.down.shape[1]) for k, w in lora.items() if k.startswith("unet.") and k.endswith("attn2.to_k")]
    width = widths[0] if widths else None
    if name == "toy":
        return checkpoints.toy(width or 64)
    if name == "sd_v2":
        return checkpoints.sd_v2(width or 1024)
    if name.startswith("sdxl"):
        return checkpoints.sdxl()
    return checkpoints.sd_v1(width or 768)


def export_lora(run_dir: Path, dest_dir: Path, name: str, description: str = "", license: str = "") -> Path:
    """Copy the run's LoRA to ``dest_dir/<name>.safetensors`` with the user's title, description and
    license in its metadata and model card (``<name>.md`` beside it)."""
    import json

    from erasekit import lora_io

    src = find_lora(run_dir)
    if src is None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no exported LoRA yet; train it to the end first.")
    clean = clean_file_name(name, "LoRA")
    lora, meta = lora_io.load_lora(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads(meta.get("erasekit.config", "{}"))
        preserved = json.loads(meta.get("erasekit.preserved", "[]"))
    except ValueError:
        config, preserved = {}, []
    return Path(lora_io.save_lora(
        lora, str(dest_dir / f"{clean}.safetensors"), architecture_from_lora(lora, meta),
        erased_concept=meta.get("erasekit.erased_concept", ""), method=meta.get("erasekit.method", ""),
        preserved=preserved, config=config, title=clean, description=description.strip() or None,
        license=license.strip() or None, base_model=meta.get("ss_sd_model_name", "")))


# ----------------------------------------------------------------------------- runs


def list_runs(root) -> list:
    """[name, target, steps done / total, status, output file] for every run folder under ``root``
    (the output: the erasure LoRA, or the guideline embedding of a guideline run)."""
    import json

    from erasekit.erase.engine import latest_checkpoint, read_config

    rows = []
    root = Path(root)
    if not root.is_dir():
        return rows
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg_path = d / "config.toml"
        has_data = (d / "data.safetensors").is_file()
        if not cfg_path.is_file() and not has_data:
            continue
        try:
            train = read_config(cfg_path).get("train", {}) if cfg_path.is_file() else {}
        except ErasekitError:
            train = {}
        done = 0
        metrics = d / "metrics.jsonl"
        if metrics.is_file():
            lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if lines:
                try:
                    done = json.loads(lines[-1]).get("step", 0)
                except ValueError:
                    done = len(lines)
        lora = find_lora(d) or find_guideline(d)
        job = busy_with(d)
        errors = [j for j in JOBS.values() if j.run_dir and os.path.realpath(j.run_dir) == os.path.realpath(d)]
        last = max(errors, key=lambda j: j.id) if errors else None
        if job is not None:
            status = f"{job.state} ({job.kind})"
        elif last is not None and last.state == "error":
            status = "error: " + last.message
        elif lora is not None:
            status = "done"
        elif latest_checkpoint(d) is not None:
            status = f"stopped at step {done} (resumable)"
        elif has_data and not metrics.is_file():
            status = "data ready"
        else:
            status = "not started"
        rows.append([d.name, train.get("target", ""), f"{done}/{train.get('steps', '?')}", status,
                     lora.name if lora else ""])
    return rows


def read_metrics(run_dir) -> list:
    import json

    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def latest_preview(run_dir) -> Path | None:
    files = sorted((Path(run_dir) / "samples").glob("step-*.png"))
    return files[-1] if files else None
