"""Serving the trainer page: ``python -m trainer app`` flags -> ``launch()`` options.

127.0.0.1 by default; ``--listen`` (0.0.0.0) is refused without ``--auth user:pass``; never a
share link; analytics off (set in :mod:`trainer.app` before Gradio is imported).
"""

from __future__ import annotations

import os
import sys

from erasekit.errors import ErasekitError


def parse_auth(text: str | None):
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ErasekitError("--auth must be user:password, both non-empty.")
    return (user, password)


def launch_options(args) -> dict:
    """``launch()`` keyword arguments from the CLI flags; --listen without --auth is refused."""
    auth = parse_auth(args.auth)
    if args.listen and auth is None:
        raise ErasekitError("Refusing to listen on 0.0.0.0 without a password: add --auth user:password, or drop --listen "
                            "to serve on 127.0.0.1 only.")
    opts = {"server_name": "0.0.0.0" if args.listen else "127.0.0.1", "share": False, "auth": auth, "show_error": False}
    if args.port:
        opts["server_port"] = args.port
    return opts


def app_command(args) -> int:
    try:
        opts = launch_options(args)
        if args.comfyui and not os.path.isdir(args.comfyui):
            raise ErasekitError(f"The ComfyUI folder '{args.comfyui}' does not exist; check --comfyui or COMFYUI_PATH.")
    except ErasekitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from trainer.app import TrainerApp

    app = TrainerApp(args.out_root, args.comfyui, args.base, args.threads)
    demo = app.build()
    print(f"Erasekit trainer: writing under {app.root}")
    demo.launch(**opts)
    return 0
