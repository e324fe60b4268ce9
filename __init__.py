"""Erasekit as a ComfyUI custom node pack.

ComfyUI imports this file at start-up, so it imports nothing heavy: torch, diffusers and the
node code load when a node runs. With a ComfyUI that has the V3 node API (``comfy_api``), the
nodes come from ``comfy_entrypoint``; older builds get ``NODE_CLASS_MAPPINGS`` instead.
Only one of the two is defined, since ComfyUI ignores ``comfy_entrypoint`` of a pack that
defines ``NODE_CLASS_MAPPINGS``.

Nothing is put on ``sys.path`` (the pack's ``nodes/`` would shadow ComfyUI's own ``nodes``
module): the pack's modules import each other relatively, and the core library is registered
under its own name, ``erasekit``, from this folder (``core_loader.py``).
"""

import os

from .core_loader import register_core

WEB_DIRECTORY = "./web"  # front-end extension: live Detect-and-Guide detection maps

register_core()

try:
    if os.environ.get("ERASEKIT_COMFY_API") == "v1":  # lets tests exercise the classic path
        raise ImportError
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:
    from .nodes.v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
else:
    from .nodes.v3 import comfy_entrypoint  # noqa: F401
