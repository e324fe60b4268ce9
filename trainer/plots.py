"""The Train step's two plots, as the data frames Gradio's LinePlot draws (long format: step, value,
series), from a run's ``metrics.jsonl`` and ``config.toml``.

* the loss, raw and smoothed (an exponential moving average: one step's loss jumps with the noise
  level it drew, so the raw line alone reads as divergence);
* the erasure signal the method decides "erased" with, and its threshold line, with a sentence on
  what erased looks like. A method adds its own to :data:`SIGNALS`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    term: str  # the metrics.jsonl key of the signal
    title: str  # its name on the plot
    threshold: str  # the config key ([<method>] table) of the line it is compared with
    threshold_title: str
    reads: str  # what erased looks like, in a sentence for the page


SIGNALS = {
    "inpo": Signal("delta_s", "Delta S (how much less likely the concept became)", "tau", "tau (the margin)",
                   "Erased looks like Delta S rising above the tau line and staying there: the LoRA now finds the "
                   "concept's images less likely than the base model did. Spikes up are the erasure working, not "
                   "the training breaking; 'Stop when erased' ends a run once a quarter of the last 20 steps are "
                   "above the line."),
}

# fixed colours, so the plots' labels can name them (Gradio's legend is cut off below a short plot)
LOSS_COLOURS = {"loss": "#4c78a8", "loss, smoothed": "#f58518"}
SIGNAL_COLOURS = {**{f"{s.title}{tail}": colour for s in SIGNALS.values()
                     for tail, colour in (("", "#4c78a8"), (", smoothed", "#f58518"))},
                  **{s.threshold_title: "#e45756" for s in SIGNALS.values()}}
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
    """(rows (step, value, series) of the method's signal, smoothed, and its threshold line; the sentence
    under the plot). No signal for the method (or no rows yet): an empty frame and what to expect."""
    import pandas as pd

    empty = pd.DataFrame({"step": [], "value": [], "series": []})
    signal = SIGNALS.get(method or "")
    if signal is None:
        return empty, "This method has no erasure signal to plot; the check (step 5) shows what it erased."
    rows = [m for m in metrics if isinstance(m.get(signal.term), int | float)]
    if not rows:
        return empty, signal.reads
    steps, values = [m["step"] for m in rows], [float(m[signal.term]) for m in rows]
    frame = {"step": steps * 2, "value": values + smoothed(values),
             "series": [signal.title] * len(rows) + [f"{signal.title}, smoothed"] * len(rows)}
    line = settings.get(signal.threshold)
    if isinstance(line, int | float):
        frame["step"] += [steps[0], steps[-1]]
        frame["value"] += [float(line)] * 2
        frame["series"] += [signal.threshold_title] * 2
    return pd.DataFrame(frame), signal.reads
