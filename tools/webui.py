"""The real Automatic1111 v1.10.1 and Forge web UIs, headless on CPU, with this repository as an
extension: the set-up behind ``make a1111`` / ``make forge`` / ``make test`` and a server for the tests.

    python -m tools.webui setup [--jobs 2] a1111 forge   # sources, own venvs, offline HF cache, a model each
    python -m tools.webui serve a1111 --port 7861         # web page + API; blocks, Ctrl+C stops it

Nothing of A1111's or Forge's code is in this repository: their pinned sources are unpacked into
``.cache/webui/<kind>/`` (git-ignored) from the archives in ``../shared/a1111/`` (or
``$ERASEKIT_A1111_SOURCES``), or cloned from GitHub at the pinned commits when those are absent.
Each web UI gets its own venv, ``.cache/webui/<kind>/venv`` (their pins clash with the project's),
with the project's torch build and the substitutions measured in the recipe: setuptools 80.x instead
of 69.5.1, clip-anytorch from the index instead of OpenAI's GitHub zip. A1111 serves a tiny
SD1-layout LDM checkpoint (widths of 32, built with A1111's own ``ldm`` classes); Forge a full-size
random SD1.5 in fp16 (its model detector accepts only SD1.5's real widths). Every step keeps a stamp,
so a second run costs seconds; ``$ERASEKIT_WEBUI_CACHE`` moves the whole ``.cache/webui``.

Standard library only at import time: the project's venv drives it, the web UIs' venvs run it.
When the sources cannot be had, ``setup`` raises :class:`Unavailable` (a ``RuntimeError`` whose
message reads "<web UI> cannot be had: <why>"), which the tests turn into a skip.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request

from tools import REPO

KINDS = ("a1111", "forge")
CACHE = os.path.abspath(os.environ.get("ERASEKIT_WEBUI_CACHE") or os.path.join(REPO, ".cache", "webui"))
HF_HOME = os.path.join(CACHE, "hf-home")
MODELS = os.path.join(CACHE, "models")
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
SETUPTOOLS = "setuptools>=80,<81"  # torch wants >= 77; lightning_fabric imports pkg_resources (gone in 84)
MODEL_VERSION = "2"  # bump to rebuild the cached checkpoints

PINS = {
    "a1111": {
        "title": "Automatic1111 v1.10.1",
        "git": "https://github.com/AUTOMATIC1111/stable-diffusion-webui.git",
        "ref": "v1.10.1",
        "tarball": "stable-diffusion-webui-v1.10.1.tar.gz",
        "requirements": "requirements-a1111-v1.10.1.txt",
        # in the CPU recipe; --nowebui is added for the API-only server
        "cpu_args": ["--use-cpu", "all", "--no-half"],
    },
    "forge": {
        "title": "Forge dfdcbab6",
        "git": "https://github.com/lllyasviel/stable-diffusion-webui-forge.git",
        "ref": "dfdcbab6",
        "tarball": "stable-diffusion-webui-forge-dfdcbab.tar.gz",
        "requirements": "requirements-forge-dfdcbab.txt",
        "cpu_args": ["--always-cpu"],
    },
}
HF_GUESS_TARBALL = "huggingface_guess-8482624.tar.gz"
HF_CACHE_TARBALL = "hf-home-clip-vit-large-patch14.tar.gz"
CLIP_REPO = "models--openai--clip-vit-large-patch14"
# SD1's text-encoder config (openai/clip-vit-large-patch14), for an HF cache built without the archive
CLIP_L_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


class Unavailable(RuntimeError):
    """The web UI's sources (or what it needs to run) cannot be had here: the tests skip with this."""


def log(msg: str) -> None:
    print(f"[webui] {msg}", flush=True)


def sources_dir() -> str:
    return os.path.abspath(os.environ.get("ERASEKIT_A1111_SOURCES") or os.path.join(REPO, "..", "shared", "a1111"))


def base_python() -> str:
    return os.environ.get("ERASEKIT_WEBUI_PYTHON") or os.environ.get("PYTHON_BASE") or "python3.11"


def webui_dir(kind: str) -> str:
    return os.path.join(CACHE, kind)


def venv_python(kind: str) -> str:
    return os.path.join(webui_dir(kind), "venv", "bin", "python")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


# ---------------------------------------------------------------------------------------- stamps
def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamped(path: str, key: str) -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == key
    except OSError:
        return False


def _stamp(path: str, key: str) -> None:
    with open(path, "w") as f:
        f.write(key + "\n")


@contextlib.contextmanager
def _lock(name: str):
    """One set-up at a time per name (two pytest sessions, or make and a test, racing)."""
    import fcntl

    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd, what: str, **kw) -> str:
    """Run a set-up command, echoing it; its output, or RuntimeError with the end of it on failure."""
    log(f"{what}: {' '.join(str(c) for c in cmd)}")
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}):\n{p.stdout[-4000:]}")
    return p.stdout


# --------------------------------------------------------------------------------------- sources
def _extractall(tf, dest, members=None) -> None:
    try:
        tf.extractall(dest, members=members, filter="data")
    except TypeError:  # Python without extraction filters (< 3.11.4)
        tf.extractall(dest, members=members)


def _extract(tarball: str, dest: str, members_under: str | None = None) -> None:
    """Unpack ``tarball`` into ``dest`` (only ``members_under``, re-rooted, when given)."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(tarball) as tf:
        if members_under is None:
            _extractall(tf, dest)
            return
        prefix = members_under.strip("/") + "/"
        picked = []
        for m in tf.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name.startswith(prefix) and len(name) > len(prefix):
                m.name = name[len(prefix):]
                picked.append(m)
        if not picked:
            raise RuntimeError(f"{tarball} holds nothing under {members_under}")
        _extractall(tf, dest, picked)


def _clean_tree(dest: str) -> None:
    """Empty a web UI folder for a fresh unpack, keeping its venv and stamps."""
    if not os.path.isdir(dest):
        return
    for name in os.listdir(dest):
        if name == "venv" or name.startswith(".erasekit-"):
            continue
        p = os.path.join(dest, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def _git(*args, cwd=None) -> None:
    p = subprocess.run(["git", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"}, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {p.stdout.strip()[-600:]}")


def _git_checkout(url: str, ref: str, dest: str) -> None:
    """``url`` at ``ref`` in ``dest`` (which may hold our venv and stamps already: they stay)."""
    if os.path.exists(os.path.join(dest, ".git")):
        shutil.rmtree(os.path.join(dest, ".git"))
    os.makedirs(dest, exist_ok=True)
    _git("init", "-q", cwd=dest)
    _git("remote", "add", "origin", url, cwd=dest)
    try:  # a tag or a full commit: shallow
        _git("fetch", "-q", "--depth", "1", "origin", ref, cwd=dest)
        _git("checkout", "-q", "-f", "FETCH_HEAD", cwd=dest)
    except RuntimeError:  # an abbreviated commit: the whole history
        _git("fetch", "-q", "origin", cwd=dest)
        _git("checkout", "-q", "-f", ref, cwd=dest)


def launcher_repositories(tree: str) -> list[tuple[str, str, str]]:
    """The (folder, url, commit) the web UI's own launcher clones into ``repositories/``, read from
    its ``modules/launch_utils.py`` (commented-out lines ignored)."""
    with open(os.path.join(tree, "modules", "launch_utils.py")) as f:
        lines = [ln for ln in f.read().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    # as the launcher does, its environment variables (STABLE_DIFFUSION_REPO, ..._COMMIT_HASH) override
    urls = {var: os.environ.get(env, url) for var, env, url in
            re.findall(r"(\w+)_repo = os\.environ\.get\(['\"](\w+)['\"],\s*['\"]([^'\"]+)['\"]\)", text)}
    hashes = {var: os.environ.get(env, commit) for var, env, commit in
              re.findall(r"(\w+)_commit_hash = os\.environ\.get\(['\"](\w+)['\"],\s*['\"]([0-9a-f]+)['\"]\)", text)}
    out = []
    for var, folder in re.findall(r"git_clone\((\w+)_repo,\s*repo_dir\(['\"]([^'\"]+)['\"]\)", text):
        out.append((folder, urls[var], hashes.get(var, "")))
    return out


def _clone(kind: str, dest: str) -> None:
    pins = PINS[kind]
    _git_checkout(pins["git"], pins["ref"], dest)
    for folder, url, commit in launcher_repositories(dest):
        _git_checkout(url, commit or "HEAD", os.path.join(dest, "repositories", folder))


def _source_key(kind: str) -> str:
    src = sources_dir()
    files = [PINS[kind]["tarball"]] + ([PINS["a1111"]["tarball"], HF_GUESS_TARBALL] if kind == "forge" else [])
    sizes = [os.path.getsize(os.path.join(src, f)) if os.path.exists(os.path.join(src, f)) else None for f in files]
    return _digest("source", kind, PINS[kind]["ref"], files, sizes)


def unpack(kind: str) -> str:
    """The web UI's source tree in ``.cache/webui/<kind>/`` (with its ``repositories/``)."""
    _check_kind(kind)
    with _lock(f"source-{kind}"):
        return _unpack(kind)


def _unpack(kind: str) -> str:
    dest = webui_dir(kind)
    stamp = os.path.join(dest, ".erasekit-stamp-source")
    key = _source_key(kind)
    src = sources_dir()
    tarball = os.path.join(src, PINS[kind]["tarball"])
    if _stamped(stamp, key) or (os.path.exists(stamp) and not os.path.exists(tarball)):
        return dest  # unpacked (or cloned) before: the archives may be gone since
    t0 = time.time()
    _clean_tree(dest)
    os.makedirs(dest, exist_ok=True)
    if os.path.exists(tarball):
        log(f"unpacking {tarball} -> {dest}")
        _extract(tarball, dest)
        if kind == "forge":
            # Forge's model detector at its pinned commit, and BLIP + the assets from A1111's archive
            guess = os.path.join(src, HF_GUESS_TARBALL)
            a1111 = os.path.join(src, PINS["a1111"]["tarball"])
            for f in (guess, a1111):
                if not os.path.exists(f):
                    raise Unavailable(f"{PINS[kind]['title']} cannot be had: {f} is missing beside {tarball}")
            repos = os.path.join(dest, "repositories")
            _extract(guess, os.path.join(repos, "huggingface_guess"))
            for folder in ("BLIP", "stable-diffusion-webui-assets"):
                _extract(a1111, os.path.join(repos, folder), f"repositories/{folder}")
    else:
        log(f"{tarball} is absent: cloning {PINS[kind]['git']} at {PINS[kind]['ref']}")
        try:
            _clone(kind, dest)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            _clean_tree(dest)
            raise Unavailable(f"{PINS[kind]['title']} cannot be had: no {tarball}, and git clone failed: {e}") from None
    _stamp(stamp, key)
    log(f"{kind} sources ready in {time.time() - t0:.1f} s")
    return dest


# ------------------------------------------------------------------------------------ HF cache
def hf_home() -> str:
    """An offline Hugging Face cache holding openai/clip-vit-large-patch14's config and SD1's
    tokenizer files (A1111 reads the tokenizer even with no CLIP download)."""
    with _lock("hf-home"):
        return _hf_home()


def _hf_home() -> str:
    stamp = os.path.join(HF_HOME, ".erasekit-stamp")
    tarball = os.path.join(sources_dir(), HF_CACHE_TARBALL)
    if os.path.exists(os.path.join(HF_HOME, "hub", CLIP_REPO)) and os.path.exists(stamp):
        return HF_HOME
    if os.path.exists(HF_HOME):
        shutil.rmtree(HF_HOME)
    if os.path.exists(tarball):
        _extract(tarball, HF_HOME)
    else:  # the same files from ComfyUI's copy of SD1's tokenizer (make setup unpacks ComfyUI)
        tok = os.path.join(os.environ.get("ERASEKIT_COMFYUI_DIR") or os.path.join(REPO, ".cache", "comfyui", "ComfyUI"),
                           "comfy", "sd1_tokenizer")
        if not os.path.exists(os.path.join(tok, "vocab.json")):
            raise Unavailable(f"SD1's CLIP tokenizer cannot be had: neither {tarball} nor {tok}")
        snap = os.path.join(HF_HOME, "hub", CLIP_REPO, "snapshots", "0" * 39 + "1")
        os.makedirs(snap)
        for name in os.listdir(tok):
            shutil.copy(os.path.join(tok, name), snap)
        with open(os.path.join(snap, "config.json"), "w") as f:
            json.dump(CLIP_L_CONFIG, f, indent=2)
        os.makedirs(os.path.join(HF_HOME, "hub", CLIP_REPO, "refs"))
        with open(os.path.join(HF_HOME, "hub", CLIP_REPO, "refs", "main"), "w") as f:
            f.write("0" * 39 + "1")
    _stamp(stamp, "ok")
    return HF_HOME


def clip_snapshot() -> str:
    snaps = os.path.join(hf_home(), "hub", CLIP_REPO, "snapshots")
    return os.path.join(snaps, sorted(os.listdir(snaps))[0])


# ------------------------------------------------------------------------------------------ venv
def requirements(kind: str) -> str:
    """The web UI's pins with the recipe's substitutions: setuptools 80.x (not 69.5.1), clip-anytorch
    from the index (not the GitHub zip), torch left to the constraint (the build on this disk)."""
    path = os.path.join(sources_dir(), PINS[kind]["requirements"])
    if not os.path.exists(path):
        path = os.path.join(webui_dir(kind), "requirements_versions.txt")
    out = []
    with open(path) as f:
        for line in f:
            req = line.split("#", 1)[0].strip()
            name = re.split(r"[<>=!~\[ ;@]", req, maxsplit=1)[0].lower()
            if not req or name in ("torch", "torchvision", "setuptools", "clip"):
                continue
            out.append(req)
    out.append(SETUPTOOLS)
    if kind == "a1111" and not any(r.lower().startswith("clip-anytorch") for r in out):
        out.append("clip-anytorch==2.6.0")
    return "\n".join(sorted(out, key=str.lower)) + "\n"  # sorted: the same from the archive's list or the tree's


def make_venv(kind: str) -> str:
    """``.cache/webui/<kind>/venv`` with torch 2.14.1 + torchvision 0.29.1 and the web UI's pins."""
    dest = webui_dir(kind)
    py = venv_python(kind)
    reqs = requirements(kind)
    stamp = os.path.join(dest, ".erasekit-stamp-venv")
    key = _digest("venv", base_python(), TORCH_PINS, reqs)
    if _stamped(stamp, key) and os.path.exists(py):
        return py
    t0 = time.time()
    if not os.path.exists(py):
        if shutil.which(base_python()) is None:
            raise Unavailable(f"{PINS[kind]['title']} cannot be had: no {base_python()} to make its venv "
                              "(set PYTHON_BASE or ERASEKIT_WEBUI_PYTHON)")
        _run([base_python(), "-m", "venv", os.path.join(dest, "venv")], f"{kind} venv")
    with open(os.path.join(dest, ".erasekit-requirements.txt"), "w") as f:
        f.write(reqs)
    with open(os.path.join(dest, ".erasekit-constraints.txt"), "w") as f:
        f.write("\n".join(TORCH_PINS) + "\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PIP_CONSTRAINT", None)
    pip = [py, "-m", "pip", "install", "--progress-bar", "off"]
    _run(pip + [*TORCH_PINS, SETUPTOOLS], f"{kind} torch", env=env)
    _run(pip + ["-c", os.path.join(dest, ".erasekit-constraints.txt"), "-r",
                os.path.join(dest, ".erasekit-requirements.txt")], f"{kind} requirements", env=env)
    share_files(kind)
    _stamp(stamp, key)
    log(f"{kind} venv ready in {time.time() - t0:.1f} s")
    return py


def _site_packages(venv: str) -> str | None:
    found = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages")))
    return found[0] if found else None


def _records(site: str) -> dict:
    """{dist-info folder: {path: (hash, size)}} from pip's RECORD files."""
    out = {}
    for record in glob.glob(os.path.join(site, "*.dist-info", "RECORD")):
        rows = {}
        with open(record, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 3 and row[1] and row[2].isdigit():
                    rows[row[0]] = (row[1], int(row[2]))
        out[os.path.basename(os.path.dirname(record))] = rows
    return out


def share_files(kind: str, min_size: int = 1 << 20) -> int:
    """Hard-link the web UI venv's big installed files (torch, its CUDA libraries, triton: about 5 GB a
    venv) to the same files of the project's venv or the other web UI's: the same wheel, byte for byte
    (pip's RECORD hash and size, then a comparison). pip only ever replaces files, never edits them,
    so the venvs stay independent. Returns the bytes saved."""
    site = _site_packages(os.path.join(webui_dir(kind), "venv"))
    refs = [_site_packages(v) for v in (os.path.join(REPO, ".venv"),
                                        *(os.path.join(webui_dir(k), "venv") for k in KINDS if k != kind))]
    refs = [r for r in refs if r and os.path.isdir(r)]
    if not site or not refs:
        return 0
    import filecmp

    t0, saved = time.time(), 0
    theirs = [(ref, _records(ref)) for ref in refs]
    for dist, rows in _records(site).items():
        for path, (digest, size) in rows.items():
            if size < min_size:
                continue
            a = os.path.join(site, path)
            for ref, records in theirs:  # the first identical copy, once
                if records.get(dist, {}).get(path) != (digest, size):
                    continue
                b = os.path.join(ref, path)
                try:
                    sa, sb = os.stat(a), os.stat(b)
                    if sa.st_ino == sb.st_ino:
                        break
                    if sa.st_size != size or sb.st_size != size or not filecmp.cmp(a, b, shallow=False):
                        continue
                    tmp = a + ".erasekit-link"
                    os.link(b, tmp)
                    os.replace(tmp, a)
                    saved += size
                    break
                except OSError:  # another file system, or gone: keep the copy
                    continue
    if saved:
        log(f"{kind} venv: {saved / 2**30:.1f} GiB hard-linked to identical files in {time.time() - t0:.1f} s")
    return saved


# ----------------------------------------------------------------------------------------- models
def _build(kind: str, what: str, out: str) -> None:
    """Run tools/webui_models.py in a web UI's venv (it needs torch and A1111's ``ldm``)."""
    ldm = os.path.join(webui_dir("a1111"), "repositories", "stable-diffusion-stability-ai")
    env = {**os.environ, "HF_HOME": hf_home(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ldm}
    out = _run([venv_python(kind), os.path.join(REPO, "tools", "webui_models.py"), what, "--out", out,
                "--a1111", webui_dir("a1111"), "--tokenizer", clip_snapshot()], f"{kind} model {what}", env=env,
               cwd=webui_dir("a1111"))
    log(out.strip().splitlines()[-1] if out.strip() else "(no output)")


def model(kind: str) -> str:
    """The checkpoint ``kind`` serves, built once: A1111 a tiny SD1 LDM checkpoint (widths of 32, a
    ``.yaml`` beside it naming a tiny CLIP folder), Forge a full-size random SD1.5 in fp16."""
    with _lock(f"model-{kind}"):
        return _model(kind)


def _model(kind: str) -> str:
    os.makedirs(MODELS, exist_ok=True)
    name = {"a1111": "tiny-sd1", "forge": "random-sd15"}[kind]
    ckpt = os.path.join(MODELS, name + ".safetensors")
    stamp = os.path.join(MODELS, f".erasekit-stamp-{name}")
    key = _digest("model", name, MODEL_VERSION, MODELS)
    if _stamped(stamp, key) and os.path.exists(ckpt):
        return ckpt
    unpack("a1111")  # the builder uses A1111's ldm classes and v1-inference.yaml
    t0 = time.time()
    _build(kind, {"a1111": "tiny", "forge": "sd15"}[kind], ckpt)
    _stamp(stamp, key)
    log(f"{kind} checkpoint {ckpt} built in {time.time() - t0:.1f} s")
    return ckpt


def setup(kind: str) -> dict:
    """Everything ``kind`` needs to run, idempotent: returns its dir, python, checkpoint, HF home and
    the seconds each step took (0-ish when stamped). Raises :class:`Unavailable` when the sources
    cannot be had."""
    _check_kind(kind)
    times = {}
    with _lock(kind):  # then source-*, hf-home, model-* (always in this order: no deadlock)
        t = time.time()
        unpack(kind)
        if kind == "forge":
            unpack("a1111")  # BLIP and the assets come from A1111's archive; the model builder uses its ldm
        times["sources"] = time.time() - t
        t = time.time()
        hf_home()
        times["hf_home"] = time.time() - t
        t = time.time()
        py = make_venv(kind)
        times["venv"] = time.time() - t
        t = time.time()
        ckpt = model(kind)
        times["model"] = time.time() - t
    return {"kind": kind, "dir": webui_dir(kind), "python": py, "ckpt": ckpt, "hf_home": HF_HOME, "times": times}


# ---------------------------------------------------------------------------------------- serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """A running web UI: ``url`` and a few API helpers (JSON over urllib)."""

    def __init__(self, kind: str, url: str, data_dir: str, log_path: str, proc: subprocess.Popen):
        self.kind, self.url, self.data_dir, self.log_path, self.proc = kind, url, data_dir, log_path, proc

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 900):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"POST {path} -> {e.code}: {body}\n--- server log ---\n{self.log_tail()}") from None

    def txt2img(self, payload: dict, timeout: float = 900) -> list:
        """POST /sdapi/v1/txt2img; the images as PIL images (PIL imported here, in the caller's venv)."""
        from PIL import Image

        res = self.post("/sdapi/v1/txt2img", payload, timeout)
        images = []
        for b64 in res.get("images", []):
            img = Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))
            img.load()
            images.append(img)
        return images

    def scripts(self) -> dict:
        return self.get("/sdapi/v1/scripts")

    def extensions(self) -> list:
        return self.get("/sdapi/v1/extensions")

    def log_tail(self, n: int = 6000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def launch_command(kind: str, port: int, data_dir: str, ckpt: str, webui: bool = False) -> list[str]:
    """The recipe's headless launch line for ``kind``."""
    cmd = [venv_python(kind), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
           "--skip-version-check", *PINS[kind]["cpu_args"], "--api", "--server-name", "127.0.0.1",
           "--port", str(port), "--data-dir", data_dir, "--ckpt", ckpt]
    if not webui:
        cmd.append("--nowebui")
    return cmd


def _link(target: str, link: str) -> None:
    if os.path.islink(link):
        if os.path.realpath(link) == os.path.realpath(target):
            return
        os.remove(link)
    elif os.path.exists(link):
        raise RuntimeError(f"{link} exists and is not a link: move it away")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the web UI's whole process group (its /server-stop does not stop it)."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):  # children left behind by a leader that exited
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serve(kind: str, port: int | None = None, extension_dir: str = REPO, data_dir: str | None = None,
          webui: bool = False, startup_s: float = 180, extra_args=(), quiet: bool = True):
    """Run ``kind`` headless on 127.0.0.1:``port`` (a free one if None) with ``extension_dir`` linked
    as ``<data_dir>/extensions/erasekit``; yields a :class:`WebUI` once ``/sdapi/v1/sd-models`` answers
    and kills the whole process group afterwards. ``webui=True`` serves the web page too.
    ``quiet=False`` lets the server's output through to this terminal (besides its log file)."""
    info = setup(kind)
    port = port or free_port()
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix=f"erasekit-{kind}-")
        data_dir = tmp
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    _link(os.path.abspath(extension_dir), os.path.join(data_dir, "extensions", "erasekit"))
    # the live-preview model A1111 would otherwise download into <data_dir>/models/VAE-approx
    approx = os.path.join(info["dir"], "models", "VAE-approx")
    if os.path.isdir(approx) and not os.path.exists(os.path.join(data_dir, "models", "VAE-approx")):
        _link(approx, os.path.join(data_dir, "models", "VAE-approx"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "COMMANDLINE_ARGS", "PYTHONHOME", "PIP_CONSTRAINT")}
    env.update(HF_HOME=info["hf_home"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               # the web UI's tree has no .git: its `git describe` / `rev-parse` must not find the checkout's
               GIT_CEILING_DIRECTORIES=CACHE)
    env["PATH"] = os.path.dirname(info["python"]) + os.pathsep + env.get("PATH", "")
    cmd = launch_command(kind, port, data_dir, info["ckpt"], webui) + list(extra_args)
    log_path = os.path.join(data_dir, "webui.log")
    logf = open(log_path, "wb")
    t0 = time.time()
    # its own process group (killed whole afterwards), and killed if this process dies without cleaning up
    proc = subprocess.Popen(cmd, cwd=info["dir"], env=env, stdout=logf if quiet else subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent)
    if not quiet:  # tee: this terminal and the log
        threading.Thread(target=_tee, args=(proc.stdout, logf), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    server = WebUI(kind, url, data_dir, log_path, proc)
    try:
        deadline = t0 + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{PINS[kind]['title']} exited ({proc.returncode}) before answering:\n"
                                   f"{server.log_tail()}")
            try:
                # with the web page, A1111 adds its API middleware after the page is up: a request before its
                # "Startup time" line can land first and crash it ("Cannot add middleware after ... started")
                if webui and "Startup time" not in server.log_tail(200_000):
                    raise OSError("not started yet")
                server.get("/sdapi/v1/sd-models", timeout=5)
                break
            except (OSError, ValueError):
                if time.time() > deadline:
                    tail = server.log_tail()
                    print(tail, file=sys.stderr)
                    raise RuntimeError(f"{PINS[kind]['title']} did not answer {url}/sdapi/v1/sd-models within "
                                       f"{startup_s:.0f} s:\n{tail}") from None
                time.sleep(0.5)
        server.start_s = time.time() - t0
        log(f"{PINS[kind]['title']} answers at {url} after {server.start_s:.1f} s (log: {log_path})")
        yield server
    finally:
        _stop(proc)
        logf.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux), so a killed test run or CLI
    leaves no web UI behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tee(src, logf) -> None:
    for line in iter(src.readline, b""):
        logf.write(line)
        logf.flush()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


# -------------------------------------------------------------------------------------------- CLI
def _setup_cli(kinds, if_available: bool, jobs: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    def one(kind):
        t0 = time.time()
        try:
            info = setup(kind)
        except Unavailable as e:
            if not if_available:
                raise
            log(f"SKIPPED: {e} (the {kind} tests will skip)")
            return
        log(f"{kind} ready in {time.time() - t0:.1f} s "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in info['times'].items())})")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for f in [pool.submit(one, k) for k in dict.fromkeys(kinds)]:
            f.result()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.webui", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="unpack, make the venv, build the model (idempotent)")
    s.add_argument("kinds", nargs="+", choices=KINDS)
    s.add_argument("--if-available", action="store_true",
                   help="exit 0 with the reason when the sources cannot be had (make test: the tests skip)")
    s.add_argument("--jobs", type=int, default=1, help="set up this many kinds at once")
    v = sub.add_parser("serve", help="serve the web page and the API on 127.0.0.1 (Ctrl+C stops it)")
    v.add_argument("kind", choices=KINDS)
    v.add_argument("--port", type=int, default=None)
    v.add_argument("--data-dir", default=None, help="default: .cache/webui/<kind>-data")
    v.add_argument("--api-only", action="store_true", help="no web page (--nowebui)")
    v.add_argument("--startup-s", type=float, default=300)
    args = ap.parse_args(argv)

    if args.cmd == "setup":
        return _setup_cli(args.kinds, args.if_available, args.jobs)

    def stop(signum, frame):  # a closed terminal or `kill`: stop the web UI as Ctrl+C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    port = args.port or {"a1111": 7861, "forge": 7862}[args.kind]
    data_dir = args.data_dir or os.path.join(CACHE, f"{args.kind}-data")
    try:
        with serve(args.kind, port, data_dir=data_dir, webui=not args.api_only, startup_s=args.startup_s,
                   quiet=False) as server:
            print(f"{PINS[args.kind]['title']} with Erasekit: open {server.url} (API: {server.url}/docs; "
                  "Ctrl+C stops it)", flush=True)
            while server.proc.poll() is None:
                time.sleep(1)
            log(f"the web UI exited ({server.proc.returncode})")
            return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # did not start: the log's end is in the message
        log(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
