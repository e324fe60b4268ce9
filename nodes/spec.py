"""One declaration per node, two ComfyUI front doors.

Each node is declared once as a :class:`NodeSpec` (inputs, outputs, a plain function).
:mod:`.v3` turns specs into ComfyUI V3 ``io.ComfyNode`` classes (the current API, reached
through ``comfy_entrypoint``); :mod:`.v1` turns the same specs into classic
``NODE_CLASS_MAPPINGS`` classes for ComfyUI builds that predate ``comfy_api``. The node's
behaviour lives in its function, so both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CATEGORY = "Erasekit"


@dataclass
class Input:
    name: str
    type: str  # MODEL, CLIP, VAE, IMAGE, MASK, LATENT, CONDITIONING, STRING, INT, FLOAT, BOOLEAN, COMBO
    tooltip: str = ""
    default: Any = None
    options: list | Callable[[], list] | None = None  # COMBO choices (a callable is read at schema time)
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    optional: bool = False

    def choices(self) -> list:
        return list(self.options() if callable(self.options) else self.options or [])


@dataclass
class Output:
    type: str
    name: str
    tooltip: str = ""


@dataclass
class Result:
    """What a node function returns: output values, plus optional UI data (images to show)."""

    values: tuple = ()
    ui: dict | None = None


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[Input]
    outputs: list[Output]
    function: Callable[..., Result | tuple]
    category: str = CATEGORY
    output_node: bool = False
    search_aliases: list[str] = field(default_factory=list)
    wants_node_id: bool = False  # the function gets ``node_id`` (ComfyUI's UNIQUE_ID), e.g. to message the UI
    # ComfyUI re-runs a node only when its inputs change; a loader whose file is rewritten under the same
    # name (the trainer exports over it) says so with this: the inputs -> anything that changes with the file
    fingerprint: Callable[..., Any] | None = None

    def run(self, **kwargs) -> Result:
        out = self.function(**kwargs)
        return out if isinstance(out, Result) else Result(tuple(out))


def file_stamp(path: str | None):
    """What changes when a file is rewritten: (path, modification time, size); the path alone if missing."""
    import os

    if not path or not os.path.isfile(path):
        return path
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)
