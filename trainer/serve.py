"""Serving the trainer page: ``python -m trainer app`` flags -> ``launch()`` options.

127.0.0.1 by default; ``--listen`` (0.0.0.0) is refused without a password; never a share link;
analytics off (set in :mod:`trainer.app` before Gradio is imported). The password comes from
``--auth-file`` (its first line, ``user:password``), else ``--auth`` (visible to other users of the
machine in the process list), else the ``ERASEKIT_AUTH`` environment variable, and is asked on
127.0.0.1 too when given. Every request whose Host header is not a loopback name (or, with
``--listen``, an IP address or a name given with ``--allowed-host``) is refused with 403 before
Gradio routes it (:class:`HostAllowlist`): a web page whose name was rebound to 127.0.0.1 (DNS
rebinding) cannot drive the API, whose own check compares Origin with Host only. An uploaded
file over ``--max-upload-mb`` is refused (Gradio's ``max_file_size``; the page says the limit).
"""

from __future__ import annotations

import ipaddress
import os
import stat
import sys

from erasekit.errors import ErasekitError

AUTH_ENV = "ERASEKIT_AUTH"  # user:password, read when neither --auth-file nor --auth is given
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


# ----------------------------------------------------------------------------- the password


def parse_auth(text: str | None, source: str = "--auth"):
    """(user, password) from ``user:password``; None for no text. ``source`` names where it came from
    in the error (never the password itself)."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ErasekitError(f"{source} must be user:password, both non-empty.")
    return (user, password)


def read_auth(args, environ=None):
    """The page's (user, password): ``--auth-file``'s first line, else ``--auth``, else ``$ERASEKIT_AUTH``;
    None: no password. Two of the flags together are refused (which one counts would be a guess)."""
    environ = os.environ if environ is None else environ
    auth_file = getattr(args, "auth_file", None)
    if auth_file and args.auth:
        raise ErasekitError("Give the password one way: --auth-file or --auth, not both.")
    if auth_file:
        return parse_auth(_first_line(auth_file), f"The first line of the password file '{auth_file}'")
    if args.auth:
        return parse_auth(args.auth, "--auth")
    return parse_auth(environ.get(AUTH_ENV) or None, AUTH_ENV)


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = f.readline()
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ErasekitError(f"The password file '{path}' does not exist; check --auth-file.") from None
    except IsADirectoryError:
        raise ErasekitError(f"The password file '{path}' is a folder; give a file whose first line is user:password.") from None
    except (OSError, ValueError) as err:
        raise ErasekitError(f"The password file '{path}' cannot be read ({getattr(err, 'strerror', None) or err}).") from None
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"warning: the password file '{path}' is readable by other users of this machine; chmod 600 it.",
              file=sys.stderr)
    return line.rstrip("\r\n")


# ----------------------------------------------------------------------------- the Host allowlist


def allowed_hosts(args) -> tuple[tuple[str, ...], bool]:
    """(names a request's Host may carry, whether any IP address may): the loopback names, the
    ``--allowed-host`` names; with ``--listen`` also any IP address (a rebinding page's Host is its
    own domain name, never an address)."""
    names = list(LOOPBACK_NAMES)
    for name in getattr(args, "allowed_host", None) or []:
        clean = name.strip().lower().rstrip(".")
        if not clean or any(c in clean for c in "/:@ *") and not _is_ip(clean):
            raise ErasekitError(f"--allowed-host takes a host name such as 'trainer.lan' (no scheme, port or "
                                f"wildcard), not '{name}'.")
        names.append(clean.strip("[]"))
    return tuple(names), bool(args.listen)


def host_name(header: str) -> str:
    """The name of a Host header: lower case, without the port, the brackets of an IPv6 address or a
    final dot ('[::1]:7860' -> '::1', 'LocalHost.:80' -> 'localhost')."""
    text = (header or "").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else ""
    if text.count(":") == 1:
        text = text.split(":")[0]
    return text.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class HostAllowlist:
    """ASGI middleware: a request (HTTP or websocket) whose Host header is not allowed gets 403 and a
    sentence, and goes no further. ``names``: the allowed names; ``any_ip``: any IP address too."""

    def __init__(self, app, names=LOOPBACK_NAMES, any_ip: bool = False):
        self.app, self.names, self.any_ip = app, tuple(names), any_ip

    def allows(self, header: str) -> bool:
        name = host_name(header)
        return bool(name) and (name in self.names or (self.any_ip and _is_ip(name)))

    def refusal(self, header: str) -> str:
        shown = (header or "").strip() or "(no Host header)"
        extra = [n for n in self.names if n not in LOOPBACK_NAMES]
        allowed = ", ".join(["127.0.0.1", "localhost", "[::1]"] + extra) + (", its IP addresses" if self.any_ip else "")
        return (f"Refused: this Erasekit trainer answers to {allowed} only, not to '{shown}' (a page under another "
                "name could drive it); start it with --allowed-host NAME to open it under that name.\n")

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = next((v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"host"), "")
            if not self.allows(header):
                body = self.refusal(header).encode("utf-8")
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------- launch


def launch_options(args, environ=None) -> dict:
    """``launch()`` keyword arguments from the CLI flags; --listen without a password is refused."""
    from starlette.middleware import Middleware

    auth = read_auth(args, environ)
    if args.listen and auth is None:
        raise ErasekitError("Refusing to listen on 0.0.0.0 without a password: add --auth-file PATH (first line "
                            f"user:password) or set {AUTH_ENV}=user:password, or drop --listen to serve on 127.0.0.1 only.")
    names, any_ip = allowed_hosts(args)
    upload_mb = getattr(args, "max_upload_mb", None) or 50
    if upload_mb < 1:
        raise ErasekitError(f"--max-upload-mb must be at least 1, not {upload_mb}.")
    opts = {"server_name": "0.0.0.0" if args.listen else "127.0.0.1", "share": False, "auth": auth, "show_error": False,
            "max_file_size": upload_mb * 2**20,
            "app_kwargs": {"middleware": [Middleware(HostAllowlist, names=names, any_ip=any_ip)]}}
    if args.port:
        opts["server_port"] = args.port
    return opts


def check_gradio() -> None:
    """Gradio 6 is installed (the page uses its API); else one sentence on what to install."""
    try:
        import gradio
    except ImportError:
        raise ErasekitError("The trainer app needs Gradio 6, which is not installed: pip install 'gradio>=6,<7'.") from None
    major = str(getattr(gradio, "__version__", "0")).split(".")[0]
    if major != "6":
        raise ErasekitError(f"The trainer app needs Gradio 6, not {gradio.__version__}: pip install 'gradio>=6,<7'.")


def app_command(args) -> int:
    try:
        check_gradio()
        opts = launch_options(args)
        if args.comfyui and not os.path.isdir(args.comfyui):
            raise ErasekitError(f"The ComfyUI folder '{args.comfyui}' does not exist; check --comfyui or COMFYUI_PATH.")
        if args.webui and not os.path.isdir(args.webui):
            raise ErasekitError(f"The web UI folder '{args.webui}' does not exist; check --webui or WEBUI_PATH.")
    except ErasekitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from trainer.app import TrainerApp

    app = TrainerApp(args.out_root, args.comfyui, args.base, args.threads, upload_mb=opts["max_file_size"] // 2**20,
                     webui=args.webui)
    demo = app.build()
    print(f"Erasekit trainer: writing under {app.root}")
    demo.launch(**opts)
    return 0
