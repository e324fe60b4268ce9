"""How far a job is, as a person reads it: done / total, the rate and the time left.

A job reports ``(done, total, unit)`` (:meth:`trainer.jobs.Job.set_progress`); :class:`Progress`
keeps where the current phase started so the rate is measured over that phase only (a job that first
loads a model, then draws images, then trains, must not average the loading into the rate)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    done: float = 0.0
    total: int = 0
    unit: str = "steps"  # "steps" | "images"
    phase_start: float = field(default_factory=time.time)
    phase_done: float = 0.0  # ``done`` when the phase started

    def update(self, done: float, total: int, unit: str | None = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        unit = unit or self.unit
        if total != self.total or unit != self.unit or done < self.done:  # a new phase: the rate starts again
            self.phase_start, self.phase_done = now, float(done)
        self.done, self.total, self.unit = float(done), int(total), unit

    def rate(self, now: float | None = None) -> float | None:
        """Units a second since the phase started; None before there is anything to measure."""
        now = time.time() if now is None else now
        elapsed, moved = now - self.phase_start, self.done - self.phase_done
        return moved / elapsed if elapsed > 0.5 and moved > 0 else None

    def text(self, now: float | None = None) -> str:
        """'step 12/40, 2.1 steps/s, about 13 s left' or 'images 5/18, 12 s/image, about 2 min left'."""
        if not self.total:
            return ""
        label = "step" if self.unit == "steps" else self.unit
        parts = [f"{label} {int(self.done)}/{self.total}"]
        rate = self.rate(now)
        if rate:
            one = self.unit[:-1] if self.unit.endswith("s") else self.unit
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{one}")
            if self.done < self.total:
                parts.append(f"about {duration((self.total - self.done) / rate)} left")
        return ", ".join(parts)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
