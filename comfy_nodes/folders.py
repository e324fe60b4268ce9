"""Where the pack looks for files: its own models/ folder first, then ComfyUI's model folders."""

from __future__ import annotations

import os

PACK_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def find(pack_subdir: str, comfy_kind: str, accept) -> dict[str, str]:
    """``{name: path}`` of the entries ``accept(path)`` takes, in ``models/<pack_subdir>`` of the
    pack and in ComfyUI's ``comfy_kind`` folders (a kind ComfyUI lacks is registered under its
    models dir); the pack's own entries win on equal names."""
    roots = [os.path.join(PACK_MODELS, pack_subdir) if pack_subdir else PACK_MODELS]
    try:
        import folder_paths

        if comfy_kind not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(comfy_kind, os.path.join(folder_paths.models_dir, comfy_kind))
        roots += folder_paths.get_folder_paths(comfy_kind)
    except ImportError:  # outside ComfyUI
        pass
    found = {}
    for root in roots:
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if accept(os.path.join(root, name)):
                    found.setdefault(name, os.path.join(root, name))
    return found


def missing(what: str, name: str, where: str, available: dict) -> ValueError:
    return ValueError(f"No {what} named '{name}' in {where}; available: {', '.join(available) or 'none'}.")
