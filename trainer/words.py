"""The core's and the CLI's sentences in the page's words: a person on the trainer page has fields
and buttons, not ``--base`` or ``python -m ...``. The core keeps its CLI sentences (the command
line is its other face); the page passes every message it shows through :func:`page_words`."""

from __future__ import annotations

import re

from trainer.fields import FIELDS

# whole phrases first (they carry the CLI's syntax), then any flag left, by the page field it is
_PHRASES = [
    (r"pass --base <[^>]*>(?: \(the toy model is made by `[^`]*`\))?",
     "pick a diffusers folder or a .safetensors checkpoint in step 1 (Base model)"),
    (r"pass --guideline <[^>]*> \(python -m trainer guideline makes one\)",
     "give one in 'Guideline embedding for masks' (step 3); the Train step's method 'DAG guideline tokens' makes one"),
    (r"supply images with --forget-dir", "upload images of the concept (step 3, 'Upload forget images')"),
    (r"--forget-dir with images", "upload images"),
    (r"pass --target, e\.g\. --target \"([^\"]*)\"", r"type one in step 2 (Concept to erase), e.g. '\1'"),
    (r"(?:resume it|run again) with --resume", "press Resume"),
    (r"pick another --out folder", "give another run name (step 2)"),
    (r"with --model-config", "in the command-line trainer's model-config option (docs/trainer.md); the page "
                             "cannot give them"),
    (r"`?python -m [a-z_.]+(?: [^`.;,)]*)?`?", "the command-line trainer"),
]
_FLAG = re.compile(r"--([a-z][a-z-]*)")
_LABELS = {key: label for key, label, _ in FIELDS} | {"out": "Run name", "resume": "Resume"}


def page_words(text: str) -> str:
    """``text`` with CLI phrasing replaced by the page's fields and buttons."""
    out = str(text or "")
    for pattern, words in _PHRASES:
        out = re.sub(pattern, words, out)

    def label(match):
        name = _LABELS.get(match.group(1).replace("-", "_"))
        return f"'{name}'" if name else match.group(0)

    return _FLAG.sub(label, out)
