"""What each step of the page says about its jobs, scoped to the run on screen and to this visit.

A page session starts at ``since`` (its first poll). A job shows
* at the top of the page while it runs or waits (whatever run it writes: there is one worker), and
  once it has ended only to a session that saw it end (an old job's error is no news to a later
  visitor);
* next to its own step's button (data: under Generate data; training: under Start; check: under
  Check) when it belongs to the run named on the page, with the same rule for ended jobs.
The step results themselves (gallery, check grid) come from the run's folder, so a reload shows
what is on disk."""

from __future__ import annotations

import os
from pathlib import Path

from erasekit.erase.state import read_metrics
from erasekit.errors import ErasekitError
from trainer import jobs, runs
from trainer.words import page_words

# what poll returns, in order (then ``seen``); trainer.page wires the components by these names
POLL_OUTPUTS = ["status", "log", "plot", "preview", "preview_caption", "gallery", "data_summary", "grid", "counts",
                "report_note", "runs", "action", "check_msg", "signal", "signal_note", "data_btn", "start_btn", "stop_btn",
                "resume_btn", "check_btn", "export_btn", "trained"]

STEP_KINDS = {"data": ("data",), "train": ("train", "guideline"), "check": ("check",)}


def shown(job, since: float) -> bool:
    """Whether a session that started at ``since`` sees ``job``: active, or ended during the visit."""
    return job is not None and (job.active or job.finished >= since)


def job_line(job) -> str:
    """The job as the page says it: progress while it runs, the error in the page's words."""
    if job.state == "error":
        return f"**Error:** {page_words(job.message)}"
    return page_words(job.describe())


def top_status(since: float) -> str:
    job = jobs.current()
    if shown(job, since):
        return job_line(job)
    return "No job running: generate data (step 3) or start a training (step 4)."


def step_job(step: str, run_dir) -> jobs.Job | None:
    """The newest job of a step (``STEP_KINDS``) on ``run_dir``."""
    if run_dir is None:
        return None
    target = os.path.realpath(run_dir)
    with jobs._lock:
        found = [j for j in jobs.JOBS.values()
                 if j.kind in STEP_KINDS[step] and j.run_dir and os.path.realpath(j.run_dir) == target]
    return max(found, key=lambda j: j.id) if found else None


def step_line(step: str, run_dir, since: float) -> str:
    """What the step says under its button about its newest job on the run; "" for nothing new."""
    job = step_job(step, run_dir)
    return job_line(job) if shown(job, since) else ""


def poll(app, seen, run_name):
    """The page's view: the top status, the run's log, plots, preview, data,
    check, each step's line under its button, which buttons can act, the runs. ``seen`` holds what
    this page session was last sent (only changes go out) and when the session started."""
    import time

    import gradio as gr

    seen = dict(seen or {})
    since = seen.setdefault("since", time.time())
    try:
        run_dir = app.run_dir(run_name)
    except ErasekitError:
        run_dir = None
    out = {}
    job = jobs.current()
    status = top_status(since)
    log = "\n".join(job.lines[-60:]) if job else ""  # the last job's log stays: it is history, not status
    out.update(_plots(seen, run_dir))
    out.update(_preview(seen, run_dir, app.root))
    out.update(_data_view(seen, run_dir, since))
    out.update(_check_view(seen, run_dir, since))
    rows = [[*r[:3], page_words(r[3]), *r[4:]] for r in runs.list_runs(app.root)]  # a run's last error, too
    if seen.get("runs") != repr(rows):
        seen["runs"] = repr(rows)
        import pandas as pd

        out["runs"] = pd.DataFrame(rows, columns=["run", "target", "steps", "status", "output"])
    action = step_line("train", run_dir, since)
    if seen.get("action") != action:  # the line under Start follows the run's training, leaving a refusal be
        seen["action"] = action
        out["action"] = action
    out.update(_buttons(seen, run_dir))
    trained = sum(j.kind in ("train", "guideline") and not j.active for j in list(jobs.JOBS.values()))
    if seen.get("trained") != trained:  # a finished training: the estimate reads its measured time
        seen["trained"] = trained
        out["trained"] = trained
    return [status, log] + [out[n] if n in out else gr.skip() for n in POLL_OUTPUTS[2:]] + [seen]


def _plots(seen, run_dir) -> dict:
    import gradio as gr

    from erasekit.erase.state import read_config
    from trainer.plots import loss_frame, signal_axis, signal_frame

    metrics = read_metrics(run_dir) if run_dir else []
    key = repr((str(run_dir), len(metrics)))
    if seen.get("plot") == key:
        return {}
    seen["plot"] = key
    try:
        tables = read_config(run_dir / "config.toml") if run_dir and (run_dir / "config.toml").is_file() else {}
    except ErasekitError:
        tables = {}
    method = run_method(tables)
    settings = tables.get(method) if isinstance(tables.get(method), dict) else {}
    frame, note = signal_frame(metrics, method, settings)
    loss = loss_frame(metrics)
    # an empty frame would fix the plot's colour legend with no series in it, and Gradio's LinePlot then
    # draws none of the lines of later frames: no rows clear the plot instead
    return {"plot": None if loss.empty else loss, "signal_note": note,
            "signal": gr.update(value=None if frame.empty else frame, y_title=signal_axis(method))}


def run_method(tables: dict) -> str:
    """The method a run's config.toml was made with: [train] method where written (the guideline tokens),
    else the method whose own table it has (an erasure LoRA's run: [inpo], [ncd] or [resalign])."""
    from erasekit.erase.methods import METHODS

    train = tables.get("train") if isinstance(tables.get("train"), dict) else {}
    if isinstance(train.get("method"), str) and train["method"]:
        return train["method"]
    return next((m for m in METHODS if isinstance(tables.get(m), dict)), "inpo")


def _preview(seen, run_dir, root) -> dict:
    preview = runs.latest_preview(run_dir) if run_dir else None
    try:
        pkey = f"{preview}:{preview.stat().st_mtime if preview else 0}"
    except OSError:  # removed since it was listed
        preview, pkey = None, "None:0"
    if seen.get("preview") == pkey:
        return {}
    seen["preview"] = pkey
    image = runs.open_image(preview) if preview else None  # a torn or corrupt PNG: no preview
    return {"preview": image, "preview_caption": f"Preview `{_shown_path(preview, root)}`" if image is not None
            else "No preview yet."}


def _data_view(seen, run_dir, since) -> dict:
    """The gallery as the run's folder holds it; under Generate data the running or failed data job
    of this run, else the summary of the data on disk."""

    out = {}
    items, summary = runs.read_gallery(run_dir) if run_dir else ([], "")
    index = run_dir / runs.GALLERY / runs.GALLERY_INDEX if run_dir else None
    gkey = repr((str(run_dir), [p for p, _ in items], index.stat().st_mtime if items else 0))
    if seen.get("gallery") != gkey:
        seen["gallery"] = gkey
        images = [(runs.open_image(p), caption) for p, caption in items]
        out["gallery"] = [(img, caption) for img, caption in images if img is not None] or None
    job = step_job("data", run_dir)
    line = job_line(job) if shown(job, since) and job.state != "done" else summary
    if seen.get("data_summary") != line:
        seen["data_summary"] = line
        out["data_summary"] = line
    return out


def _check_view(seen, run_dir, since) -> dict:
    import pandas as pd


    out = {}
    grid, rows = runs.read_check(run_dir) if run_dir else (None, [])
    try:
        ckey = f"{run_dir}:{grid.stat().st_mtime if grid else 0}"
    except OSError:
        grid, ckey = None, f"{run_dir}:0"
    if seen.get("grid") != ckey:
        seen["grid"] = ckey
        out["grid"] = runs.open_image(grid) if grid else None
        out["counts"] = pd.DataFrame(rows, columns=["row", "prompt", "judged concept", "before", "after"])
        report = run_dir / "report.html" if run_dir else None
        out["report_note"] = (f"The same images as an evaluation report (every figure, base | erased per prompt): "
                              f"`{report.resolve()}`; open it in a browser." if grid and report.is_file() else "")
    line = step_line("check", run_dir, since)
    if seen.get("check_msg") != line:
        seen["check_msg"] = line
        out["check_msg"] = line
    return out


def _buttons(seen, run_dir) -> dict:
    """Which buttons can act now: nothing starts on a busy run, Stop only while a job runs or waits,
    Resume only from a checkpoint, Check and Export only once there is something trained."""
    import gradio as gr

    from erasekit.erase.state import latest_checkpoint

    current = jobs.current()
    free = run_dir is not None and jobs.busy_with(run_dir) is None
    made = free and (runs.find_lora(run_dir) is not None or runs.find_guideline(run_dir) is not None)
    can = {"data_btn": free, "start_btn": free, "stop_btn": current is not None and current.active,
           "resume_btn": free and latest_checkpoint(run_dir) is not None, "check_btn": made, "export_btn": made}
    out = {}
    for name, on in can.items():
        if seen.get(name) != on:
            seen[name] = on
            out[name] = gr.update(interactive=on)
    return out


def _shown_path(path: Path, root: Path) -> str:
    """``path`` relative to the output root where it is inside it (a run given by an absolute path may not be)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
