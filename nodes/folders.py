"""Where the pack looks for files: its own models/ folder first, then ComfyUI's model folders."""

from __future__ import annotations

import os

PACK_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def find(pack_subdir: str, comfy_kind: str, accept) -> dict[str, str]:
    """``{name: path}`` of the entries ``accept(path)`` takes, in ``models/<pack_subdir>`` of the
    pack and in ComfyUI's ``comfy_kind`` folders, subfolders included (names like ``sd15/nudity.safetensors``,
    as ComfyUI lists them); ComfyUI's ``models/<comfy_kind>`` is registered too (beside folders that
    extra_model_paths.yaml names). The pack's own entries win on equal names."""
    roots = [os.path.join(PACK_MODELS, pack_subdir) if pack_subdir else PACK_MODELS]
    try:
        import folder_paths

        # add_model_folder_path keeps one copy of a path, so this is safe on every call
        folder_paths.add_model_folder_path(comfy_kind, os.path.join(folder_paths.models_dir, comfy_kind))
        roots += folder_paths.get_folder_paths(comfy_kind)
    except ImportError:  # outside ComfyUI
        pass
    found, seen = {}, set()
    for root in roots:
        for here, dirs, files in os.walk(root, followlinks=True):
            if os.path.realpath(here) in seen:  # a link back up the tree: walked once
                dirs[:] = []
                continue
            seen.add(os.path.realpath(here))
            for entry in sorted(dirs) + sorted(files):
                path = os.path.join(here, entry)
                if accept(path):
                    found.setdefault(os.path.relpath(path, root).replace(os.sep, "/"), path)
            dirs[:] = sorted(d for d in dirs if not accept(os.path.join(here, d)))  # a model folder is not searched
    return found


def missing(what: str, name: str, where: str, available: dict) -> ValueError:
    return ValueError(f"No {what} named '{name}' in {where}; available: {', '.join(available) or 'none'}.")
