"""Background jobs of the trainer app: one at a time, in a queue, cancellable, visible after a reload.

The Gradio page (:mod:`trainer.app`) never trains itself: it submits a job here and polls
:func:`current`. A job is a function ``fn(job)`` run on one worker thread; it reports with
``job.log(...)`` / ``job.set_progress(...)`` and stops between two steps when ``job.cancel`` (a
``threading.Event``) is set. Jobs live in a module-level registry, so a browser reload (a new
session) sees the running job, its progress and its log.

The work itself is in :mod:`trainer.work` (the same functions the CLI uses) and the run
folders' bookkeeping in :mod:`trainer.runs`.
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from erasekit.errors import ErasekitError
from trainer.progress import Progress

_ids = itertools.count(1)
_lock = threading.Lock()
JOBS: dict[int, Job] = {}  # every job of this process, by id
_queue: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None


@dataclass
class Job:
    kind: str  # "data" | "train" | "check"
    title: str
    fn: object
    run_dir: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | done | cancelled | error
    step: int = 0
    total: int = 0
    message: str = ""  # one sentence: the error, or how it ended
    lines: list = field(default_factory=list)
    result: object = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    finished: float = 0.0
    version: int = 0  # bumped on every change, so the page re-renders only what changed
    progress: Progress = field(default_factory=Progress)  # done / total with the phase's rate (ETA)

    def log(self, text: str) -> None:
        self.lines.append(f"[{time.strftime('%H:%M:%S')}] {text}")
        del self.lines[:-300]
        self.version += 1

    def set_progress(self, step: float, total: int, text: str | None = None, unit: str | None = None) -> None:
        """``step`` of ``total`` (``unit``: "steps", the default, or "images"; a new total or unit starts
        a new phase, whose rate gives the time left)."""
        self.progress.update(step, total, unit)
        self.step, self.total = int(step), total
        if text:
            self.log(text)
        self.version += 1

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def describe(self) -> str:
        """One line a person reads: what, how far, how it ended."""
        what = f"{self.title} (job {self.id})"
        if self.state == "queued":
            return f"Waiting: {what}."
        if self.state == "running":
            where = self.progress.text()
            return f"Running: {what}" + (f": {where}" if where else "") + f" ({time.time() - self.started:.0f} s so far)."
        if self.state == "error":
            return f"Error in {what}: {self.message}"
        return f"{self.state.capitalize()}: {what}" + (f": {self.message}" if self.message else ".")


def submit(kind: str, title: str, fn, run_dir: str = "") -> Job:
    """Queue ``fn(job)``; jobs run one at a time, in order."""
    global _worker
    job = Job(kind, title, fn, str(run_dir))
    with _lock:
        JOBS[job.id] = job
        _queue.put(job)
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_work, name="erasekit-trainer-jobs", daemon=True)
            _worker.start()
    return job


def _work() -> None:
    while True:
        job = _queue.get()
        if job.cancel.is_set():
            job.state, job.message, job.fn = "cancelled", "stopped before it started", None
            job.version += 1
            continue
        job.state, job.started = "running", time.time()
        job.version += 1
        try:
            job.result = job.fn(job)
            if job.state == "running":
                job.state = "cancelled" if job.cancel.is_set() else "done"
        except ErasekitError as err:
            job.state, job.message = "error", str(err)
            job.log(f"error: {err}")
        except SystemExit as err:  # argparse refusing a setting: the worker thread must live on
            job.state, job.message = "error", f"A setting was refused ({err}); check the fields of this step."
            job.log(traceback.format_exc())
        except Exception as err:  # noqa: BLE001 - shown as one sentence, the trace goes to the log
            job.state, job.message = "error", one_sentence(err)
            job.log(traceback.format_exc())
        finally:
            job.finished = time.time()
            job.fn = None  # what the work captured (settings, models) is not kept alive by a finished job
            job.version += 1


def one_sentence(err: BaseException) -> str:
    """A sentence for an unexpected error (out of memory and a full disk get their own advice)."""
    import errno

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return ("The device ran out of memory; lower the batch size or rank, turn on gradient checkpointing "
                "or mixed precision, and try again.")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = f" while writing '{err.filename}'" if err.filename else ""
        return f"The disk is full ({err.strerror}){where}; free disk space and try again."
    return f"Unexpected {type(err).__name__}: {text} (details in the log)."


def current() -> Job | None:
    """The running job, else the one waiting longest, else the last one that ran."""
    with _lock:
        jobs = list(JOBS.values())
    for state in ("running", "queued"):
        found = [j for j in jobs if j.state == state]
        if found:
            return min(found, key=lambda j: j.id)
    return max(jobs, key=lambda j: j.id) if jobs else None


def latest(kind: str) -> Job | None:
    with _lock:
        found = [j for j in JOBS.values() if j.kind == kind]
    return max(found, key=lambda j: j.id) if found else None


def get(job_id: int) -> Job | None:
    return JOBS.get(int(job_id))


def cancel(job_id: int | None = None) -> Job | None:
    """Ask a job (default: the current one) to stop after its current step."""
    job = get(job_id) if job_id else current()
    if job is not None and job.active:
        job.cancel.set()
        job.log("stop requested: stopping after the current step")
    return job


def busy_with(run_dir) -> Job | None:
    """The active job writing into ``run_dir``, if any."""
    target = os.path.realpath(run_dir)
    with _lock:
        jobs = list(JOBS.values())
    return next((j for j in jobs if j.active and j.run_dir and os.path.realpath(j.run_dir) == target), None)


def wait(job: Job, timeout: float = 600) -> Job:
    end = time.time() + timeout
    while job.active and time.time() < end:
        time.sleep(0.05)
    return job


# ----------------------------------------------------------------------------- safe paths


def safe_path(root, user: str, what: str = "output folder") -> Path:
    """``user`` resolved inside ``root``; ``..`` and any path outside ``root`` are refused with a sentence."""
    root = Path(root).resolve()
    text = (user or "").strip()
    if not text:
        raise ErasekitError(f"The {what} is empty; give a name such as 'red-circle'.")
    if ".." in Path(text).parts or "\x00" in text:
        raise ErasekitError(f"The {what} '{text}' contains '..'; give a folder inside '{root}'.")
    path = (Path(text) if os.path.isabs(text) else root / text).resolve()
    if path != root and root not in path.parents:
        raise ErasekitError(f"The {what} '{text}' is outside '{root}'; every file is written under that folder.")
    return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-") or "concept"
