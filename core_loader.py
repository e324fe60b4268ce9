"""Make ``import erasekit`` find this folder's core library, for the hosts that load this repository
by file path: ComfyUI (``__init__.py``) and A1111 / Forge (``scripts/``). Nothing is put on
``sys.path`` (the pack's ``nodes/`` would shadow ComfyUI's own ``nodes`` module); the core is
registered under its own name, one copy whoever imports it. Standard library only."""

import importlib.util
import logging
import os
import sys

CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "erasekit")


def register(name: str, folder: str):
    """Register the package in ``folder`` as ``name`` unless one is imported already (then say so if it
    is another folder's)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        if os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or "")) != folder:
            logging.warning("Erasekit: using the %s package already imported from %s, not this one (%s)",
                            name, getattr(loaded, "__file__", "?"), folder)
        return loaded
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def register_core():
    """``import erasekit`` finds this folder's core library."""
    return register("erasekit", CORE)
