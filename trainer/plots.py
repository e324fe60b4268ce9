"""The Train step's two plots, as the data frames Gradio's LinePlot draws (long format: step, value,
series), from a run's ``metrics.jsonl`` and ``config.toml``.

* the loss, raw and smoothed (an exponential moving average: one step's loss jumps with the noise
  level it drew, so the raw line alone reads as divergence);
* the erasure signal of the method, each line smoothed too, and its threshold line, with a sentence on
  what erased looks like and the run's own figures: INPO's Delta S and its tau line; NCD's implicit
  accuracy and sigma(r_0) (the terms NcdObjective logs); ResAlign's harm before / after the simulated
  fine-tune per outer step, with the hypergradient's norm and the divergence guard's count in words.
  A method adds its own to :data:`SIGNALS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Line:
    term: str  # the metrics.jsonl key
    title: str  # its name on the plot (the smoothed line adds ", smoothed")
    colour: str  # each step's line
    smooth_colour: str  # the moving average's


@dataclass(frozen=True)
class Signal:
    lines: tuple  # Line, one or two of them on one axis
    axis: str  # the y axis' title
    reads: str  # what erased looks like, in a sentence for the page
    legend: str  # the colours in words (Gradio's legend is cut off below a short plot)
    threshold: str | float | None = None  # a config key ([<method>] table) of the line compared with, or a value
    threshold_title: str = ""
    figures: Callable[[list], str] | None = None  # the run's own figures, in a sentence (from its metrics rows)

    @property
    def term(self) -> str:
        return self.lines[0].term


BLUE, ORANGE, PALE_BLUE, PALE_ORANGE, RED = "#4c78a8", "#f58518", "#9ecae9", "#ffbf79", "#e45756"


def _last(metrics: list, key: str):
    rows = [m[key] for m in metrics if isinstance(m.get(key), int | float)]
    return rows[-1] if rows else None


def resalign_figures(metrics: list) -> str:
    """ResAlign's last outer step (harm before / after the simulated fine-tune, the hypergradient's
    norm) and the divergence guard's count over the run so far."""
    steps = [m for m in metrics if isinstance(m.get("harm"), int | float)]
    if not steps:
        return ""
    last = steps[-1]
    out = f"Outer step {last['step']}: harm {last['harm']:.4g}"
    if isinstance(last.get("harm_star"), int | float):
        out += f", after the simulated fine-tune {last['harm_star']:.4g}"
    if isinstance(last.get("hyper_norm"), int | float):
        out += f", hypergradient norm {last['hyper_norm']:.3g}"
    out += "."
    guarded = [m for m in steps if isinstance(m.get("guard"), int | float)]
    if guarded:
        times = int(round(sum(m["guard"] for m in guarded)))
        fell = int(round(sum(m.get("fallback") or 0 for m in guarded)))
        hit = sum(m["guard"] > 0 for m in guarded)
        out += (f" The divergence guard stepped in {times} time{'s' if times != 1 else ''} on {hit} of {len(guarded)} "
                f"step{'s' if len(guarded) != 1 else ''}" + (f" ({fell} fell back to the first-order estimate)" if fell else "")
                + (": none needed." if not times else "; now and then is normal, on most steps lower the learning "
                   "rate or set K to 1."))
    return out


def ncd_figures(metrics: list) -> str:
    acc, sig = _last(metrics, "implicit_acc"), _last(metrics, "sigma_r0")
    if acc is None or sig is None:
        return ""
    return f"Last step: implicit accuracy {acc:.3g}, sigma(r_0) {sig:.3g}."


SIGNALS = {
    "inpo": Signal((Line("delta_s", "Delta S (how much less likely the concept became)", BLUE, ORANGE),), "Delta S",
                   "Erased looks like Delta S rising above the tau line and staying there: the LoRA now finds the "
                   "concept's images less likely than the base model did. Spikes up are the erasure working, not "
                   "the training breaking. 'Stop when erased' judges drawn pictures where a detector knows the "
                   "concept; elsewhere it ends a run once a quarter of the last 20 steps are above the line.", "Blue: each step; orange: smoothed; red: the tau line.",
                   "tau", "tau (the margin)"),
    "ncd": Signal((Line("implicit_acc", "implicit accuracy (safe picture ahead)", PALE_BLUE, BLUE),
                   Line("sigma_r0", "sigma(r_0) (the safe picture's reward)", PALE_ORANGE, ORANGE)),
                  "share / probability",
                  "Erased looks like the implicit accuracy climbing to 1 (in every tuple the safe picture now scores "
                  "above each picture of the concept) and sigma(r_0) rising above the 0.5 line, where it starts (the "
                  "LoRA draws the safe picture better than the base model did), and both staying there. Under the "
                  "NCA ablation sigma(r_0) stalls near 0.8, where its gradient turns.",
                  "Blue: implicit accuracy; orange: sigma(r_0) (pale: each step, dark: smoothed); red: 0.5.",
                  0.5, "0.5 (sigma(r_0) at the start)", ncd_figures),
    "resalign": Signal((Line("harm", "harm now", PALE_BLUE, BLUE),
                        Line("harm_star", "harm after a simulated fine-tune", PALE_ORANGE, ORANGE)),
                       "harm loss (lower: more erased)",
                       "Erased looks like both lines falling and levelling off low: harm now is the erasure as it "
                       "stands, harm after a simulated fine-tune is what a later fine-tune leaves of it. The orange "
                       "line staying close to the blue one means the erasure survives fine-tuning; a gap that stays "
                       "wide means a fine-tune brings the concept back.",
                       "Blue: harm now; orange: harm after the simulated fine-tune (pale: each outer step, dark: "
                       "smoothed).", None, "", resalign_figures),
}

# fixed colours, so the plots' labels can name them (Gradio's legend is cut off below a short plot)
LOSS_COLOURS = {"loss": BLUE, "loss, smoothed": ORANGE}
SIGNAL_COLOURS = {**{title: colour for s in SIGNALS.values() for ln in s.lines
                     for title, colour in ((ln.title, ln.colour), (f"{ln.title}, smoothed", ln.smooth_colour))},
                  **{s.threshold_title: RED for s in SIGNALS.values() if s.threshold is not None}}
SMOOTHING = 0.9  # the moving average's weight on the past (about the last 10 steps)


def smoothed(values: list, weight: float = SMOOTHING) -> list:
    """Exponential moving average, bias-corrected so the first points are not pulled toward zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_frame(metrics: list):
    """Rows (step, value, series) of the loss and its smoothed line."""
    import pandas as pd

    rows = [m for m in metrics if isinstance(m.get("loss"), int | float)]
    steps, loss = [m["step"] for m in rows], [float(m["loss"]) for m in rows]
    return pd.DataFrame({"step": steps * 2, "value": loss + smoothed(loss),
                         "series": ["loss"] * len(rows) + ["loss, smoothed"] * len(rows)})


def signal_frame(metrics: list, method: str, settings: dict):
    """(rows (step, value, series) of the method's signal lines, each smoothed too, and its threshold
    line; the sentences under the plot: what erased looks like, the colours, the run's own figures).
    No signal for the method (or no rows yet): an empty frame and what to expect."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "series": []})
    signal = SIGNALS.get(method or "")
    if signal is None:
        return empty, "This method has no erasure signal to plot; the check (step 5) shows what it erased."
    frame = {"step": [], "value": [], "series": []}
    for line in signal.lines:
        rows = [m for m in metrics if isinstance(m.get(line.term), int | float)]
        steps, values = [m["step"] for m in rows], [float(m[line.term]) for m in rows]
        frame["step"] += steps * 2
        frame["value"] += values + smoothed(values)
        frame["series"] += [line.title] * len(rows) + [f"{line.title}, smoothed"] * len(rows)
    if not frame["step"]:
        return empty, signal.reads
    note = f"{signal.reads}\n\n{signal.legend}"
    figures = signal.figures(metrics) if signal.figures else ""
    if figures:
        note += f" {figures}"
    line = settings.get(signal.threshold) if isinstance(signal.threshold, str) else signal.threshold
    if isinstance(line, int | float) and not isinstance(line, bool):
        frame["step"] += [min(frame["step"]), max(frame["step"])]
        frame["value"] += [float(line)] * 2
        frame["series"] += [signal.threshold_title] * 2
    return pd.DataFrame(frame), note


def signal_axis(method: str) -> str:
    """The signal plot's y axis title for the method."""
    signal = SIGNALS.get(method or "")
    return signal.axis if signal else "signal"
