"""Prompt files: I2P's CSV (prompt, categories, sd_seed, sd_guidance_scale, ...) or plain text, one prompt a line.

I2P (Schramowski et al., 2023; the benchmark of seeds 001 Sec. 4, 002 Sec. 5, 003 App. B.2) lists each
prompt with its categories as one comma-separated cell ("sexual, violence"), the seed and guidance scale
of the image it came from, and more columns that are kept but not used. A prompt whose categories
include the benign category ("benign" unless told) is a benign prompt: preservation is measured on those,
erasure on the others.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import ErasekitError

BENIGN = "benign"


class PromptFileError(ErasekitError):
    """A prompt file is missing, empty or not in a format the harness reads."""


@dataclass(frozen=True)
class PromptRow:
    index: int  # row number in the file (0-based), the prompt's identity in the report
    prompt: str
    categories: tuple[str, ...] = ()
    seed: int | None = None  # I2P's sd_seed
    guidance: float | None = None  # I2P's sd_guidance_scale

    def is_benign(self, benign: str = BENIGN) -> bool:
        return benign in self.categories


def read_prompts(path: str) -> list[PromptRow]:
    """The prompts of ``path``: a ``.csv`` with a ``prompt`` column (I2P's layout), else one prompt a line
    (blank lines and lines starting with ``#`` skipped). Errors name the file and what to fix."""
    if not os.path.isfile(path):
        raise PromptFileError(f"The prompt file '{path}' does not exist; give a .csv with a 'prompt' column "
                              "(I2P's layout) or a text file with one prompt a line.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise PromptFileError(f"The prompt file '{path}' is not UTF-8 text; give a .csv with a 'prompt' column "
                              "or a text file with one prompt a line.") from None
    rows = _read_csv(path, text) if path.lower().endswith(".csv") else _read_lines(text)
    if not rows:
        raise PromptFileError(f"The prompt file '{path}' has no prompts; add at least one prompt.")
    return rows


def _read_lines(text: str) -> list[PromptRow]:
    lines = [line.strip() for line in text.splitlines()]
    return [PromptRow(i, p) for i, p in enumerate(p for p in lines if p and not p.startswith("#"))]


def _read_csv(path: str, text: str) -> list[PromptRow]:
    reader = csv.DictReader(text.splitlines())
    columns = {(c or "").strip().lower(): c for c in reader.fieldnames or ()}
    if "prompt" not in columns:
        raise PromptFileError(f"The CSV '{path}' has no 'prompt' column (its columns: {', '.join(columns) or 'none'}); "
                              "name the prompt column 'prompt' as I2P does, or give a text file with one prompt a line.")
    out = []
    for line_no, row in enumerate(reader, start=2):
        prompt = (row.get(columns["prompt"]) or "").strip()
        if not prompt:
            continue
        cats = tuple(c.strip() for c in (row.get(columns.get("categories", ""), "") or "").split(",") if c.strip())
        out.append(PromptRow(len(out), prompt, cats, _number(row, columns, "sd_seed", int, path, line_no),
                             _number(row, columns, "sd_guidance_scale", float, path, line_no)))
    return out


def _number(row: dict, columns: dict, name: str, kind, path: str, line_no: int):
    raw = (row.get(columns.get(name, ""), "") or "").strip()
    if not raw:
        return None
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise PromptFileError(f"Line {line_no} of '{path}' has {name} = '{raw}', which is not a number; "
                              "fix or empty that cell.") from None


def write_prompts_csv(path: str, rows: list[tuple[str, str]]) -> str:
    """Write ``[(prompt, categories)]`` as an I2P-style CSV, atomically."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "categories"])
    w.writerows(rows)
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return path


def toy_prompt_rows(target: str, n_target: int, n_benign: int, seed: int = 0) -> list[tuple[str, str]]:
    """Toy-world prompts for ``target`` in I2P's layout: the benchmarks' target prompts (categories: the
    concept, and alone / pair / styled) and benign prompts (never the concept)."""
    from ..toyworld.concepts import concept_prompts
    from ..toyworld.vocab import parse_concept

    concept = parse_concept(target)
    targets, benign = concept_prompts(concept, n_target, n_benign, seed)

    def kind(p: str) -> str:
        return "styled" if " on a " in p and concept.kind != "style" else ("pair" if " and " in p else "alone")

    return [(p, f"{concept.text}, {kind(p)}") for p in targets] + [(p, BENIGN) for p in benign]
