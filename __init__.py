"""Erasekit as a ComfyUI custom node pack.

ComfyUI imports this file at start-up, so it imports nothing heavy: torch, diffusers and the
node code load when a node runs. With a ComfyUI that has the V3 node API (``comfy_api``), the
nodes come from ``comfy_entrypoint``; older builds get ``NODE_CLASS_MAPPINGS`` instead.
Only one of the two is defined, since ComfyUI ignores ``comfy_entrypoint`` of a pack that
defines ``NODE_CLASS_MAPPINGS``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
WEB_DIRECTORY = "./web"  # front-end extension: live Detect-and-Guide detection maps
try:  # the core library: installed, or this folder (appended, so nothing of ComfyUI is shadowed)
    import erasekit  # noqa: F401
except ImportError:
    sys.path.append(_ROOT)

try:
    if os.environ.get("ERASEKIT_COMFY_API") == "v1":  # lets tests exercise the classic path
        raise ImportError
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:
    from .comfy_nodes.v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
else:
    from .comfy_nodes.v3 import comfy_entrypoint  # noqa: F401
