"""The Check step's report: its before / after images as the evaluation harness's HTML page
(:mod:`erasekit.eval.report`), counted by the harness's own metrics and toy judge, so the page's check and
``python -m erasekit.eval`` read the same way. Toy model only: other models have no judge here."""

from __future__ import annotations

from pathlib import Path

REPORT = "report.html"


def write_check_report(run_dir: Path, prompts, seeds, before, after, *, target: str, model: str, made: Path,
                       strength: float, sampler: str, guideline: bool) -> Path:
    """``prompts``: the check's ``[(role, prompt, concept)]``; ``before`` / ``after``: [P * S, 3, H, W] in [0, 1]
    (prompt-major, as the check draws them). The target row counts the erasure, the others what was kept."""
    import numpy as np

    from erasekit.eval.detectors import ToyJudge
    from erasekit.eval.harness import figures
    from erasekit.eval.prompts import BENIGN, PromptRow
    from erasekit.eval.report import write_report

    rows = [PromptRow(i, prompt, (role,) if role == "target" else (BENIGN, role)) for i, (role, prompt, _) in enumerate(prompts)]
    n = len(seeds)

    def nested(images):  # [P][S] uint8 HWC, as the harness keeps them
        arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [[arrays[p * n + s] for s in range(n)] for p in range(len(rows))]

    judge = ToyJudge(target)
    images = {"base": nested(before), "erased": nested(after)}
    findings = {run: [judge([im for im in per]) for per in imgs] for run, imgs in images.items()}
    result = figures(rows, images, findings, judge)
    result.update({
        "model": str(model), "prompts_total": len(rows), "seeds": list(seeds), "sampler": sampler,
        "loras": [] if guideline else [[str(made), strength]], "dag": str(made) if guideline else None,
        "dag_settings": {"strength": strength, "top_p": 0.0} if guideline else None, **judge.describe(),
        "_rows": rows, "_images": images, "_findings": findings,
    })
    return Path(write_report(str(Path(run_dir) / REPORT), result))
