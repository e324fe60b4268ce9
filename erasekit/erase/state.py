"""A run folder's files: config.toml, checkpoints (safetensors, never pickle), metrics.jsonl
(and the peak memory each metrics line records), and the ``.lock`` of the process writing it.

Checkpoint folders are written under a temporary name, synced, then renamed, so a run killed at
any moment keeps its last good checkpoint; the optimizer's non-tensor state and the LR schedule
travel as JSON in the safetensors metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from ..checkpoints import write_text_atomic
from ..errors import ErasekitError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def config_from_dict(cls, values: dict, where: str):
    """A ``cls`` dataclass from ``values``; an unknown key, or a value of the wrong type (a string
    for a whole number, a list for a number, "yes" for true or false), is refused with one sentence
    naming ``where`` it came from (the table), the key, the type expected and the value given."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ErasekitError(f"Unknown setting '{unknown[0]}' in {where}; known settings: {', '.join(sorted(known))}.")
    for f in fields(cls):
        if f.name in values:
            _check_type(f, values[f.name], where)
    return cls(**values)


def _field_kinds(f) -> tuple[set, bool]:
    """({"int", "float", "str", "bool", "list", ...}, None allowed) of a dataclass field, from its
    annotation (a string under ``from __future__ import annotations``: "float | None")."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    names = {part.strip().split("[")[0].removeprefix("typing.") for part in text.replace("Optional[", "").split("|")}
    return names - {"None", "NoneType"}, bool(names & {"None", "NoneType"}) or "Optional[" in text


_EXPECTED = {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false", "list": "a list",
             "dict": "a table"}


def shown_value(value) -> str:
    """A value as a sentence names it: the text 'x', the list [1, 2], true, 3.5."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the text '{value}'"
    if isinstance(value, list | tuple):
        return f"the list {list(value)!r}"
    if isinstance(value, dict):
        return f"a table {value!r}"
    return "nothing" if value is None else repr(value)


def _matches(kind: str, value) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"str": str, "bool": bool, "list": list, "dict": dict}.get(kind, object))


def _check_type(f, value, where: str) -> None:
    """Refuse ``value`` for the field ``f`` unless it has the field's type. A float field takes a whole
    number too (TOML's ``lr = 1``) but not nan or inf; a list's items are of the kind its default
    holds (``sample_seeds = [0, 1]``: whole numbers), else text (the prompt lists)."""
    kinds, optional = _field_kinds(f)
    if value is None and optional:
        return
    if not kinds - set(_EXPECTED):  # an annotation this check knows; anything else is the method's business
        if not any(_matches(k, value) for k in kinds):
            expected = " or ".join(_EXPECTED[k] for k in sorted(kinds))
            finite = " (a finite one)" if "float" in kinds and isinstance(value, float) else ""
            raise ErasekitError(f"The setting '{f.name}' in {where} must be {expected}{finite}, not {shown_value(value)}.")
    if kinds == {"list"} and isinstance(value, list):
        default = f.default_factory() if f.default_factory is not MISSING else (f.default or [])
        item = "int" if default and all(isinstance(v, int) for v in default) else "str"
        bad = [v for v in value if not _matches(item, v)]
        if bad:
            raise ErasekitError(f"The setting '{f.name}' in {where} must be a list of "
                                f"{'whole numbers' if item == 'int' else 'texts'}, not {shown_value(value)} "
                                f"(it holds {shown_value(bad[0])}).")


def read_config(path) -> dict:
    """The tables of a TOML file: ``{"train": {...}, "inpo": {...}, "data": {...}}``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ErasekitError(f"The config file '{path}' does not exist; check the path.") from None
    except IsADirectoryError:
        raise ErasekitError(f"The config file '{path}' is a folder; give a .toml file.") from None
    except UnicodeDecodeError:
        raise ErasekitError(f"The config file '{path}' is not valid TOML (it is not UTF-8 text).") from None
    except tomllib.TOMLDecodeError as err:
        raise ErasekitError(f"The config file '{path}' is not valid TOML ({err}).") from None
    except OSError as err:
        raise ErasekitError(f"The config file '{path}' cannot be read ({err.strerror or err}).") from None


def write_toml(path, tables: dict) -> Path:
    """Write ``tables`` ({table: dict}) to the TOML file ``path`` atomically."""
    import tomli_w

    write_text_atomic(tomli_w.dumps(tables), path)
    return Path(path)


def write_config(run_dir, sections: dict) -> Path:
    """Write ``sections`` ({table: dict or dataclass}) to ``<run_dir>/config.toml`` atomically
    (None values are left out: TOML has no null, and they mean "the default")."""
    tables = {name: {k: v for k, v in (asdict(s) if hasattr(s, "__dataclass_fields__") else s).items() if v is not None}
              for name, s in sections.items()}
    return write_toml(Path(run_dir) / "config.toml", tables)


def checkpoint_dir(run_dir, step: int) -> Path:
    """``<run>/checkpoints/checkpoint-<step>``: where the checkpoint of ``step`` lives."""
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:06d}"


def checkpoint_step(path) -> int:
    """The step a checkpoint folder holds (from its name)."""
    return int(_CHECKPOINT.match(Path(path).name).group(1))


def latest_checkpoint(run_dir) -> Path | None:
    """The complete checkpoint folder with the highest step (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else ())
             if (m := _CHECKPOINT.match(d.name)) and (d / "weights.safetensors").is_file() and (d / "state.safetensors").is_file()]
    return max(found)[1] if found else None


def save_checkpoint(run_dir, step: int, trainable: dict, optimizer, lr_scheduler, keep: int = 2, scaler=None) -> Path:
    """Write ``checkpoints/checkpoint-<step>/`` (weights + state) atomically; keep the newest ``keep``.
    ``scaler``: fp16's gradient scaler, whose scale a resume needs (from 65536 again, the first steps
    would overflow and be skipped)."""
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    if final.exists():
        return final
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
    opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"format": "erasekit.train_state/1", "step": str(step), "optimizer": json.dumps(opt_json),
            "lr_scheduler": json.dumps(lr_scheduler.state_dict())}
    if scaler is not None:
        meta["grad_scaler"] = json.dumps(scaler.state_dict())
    save_file(weights, str(tmp / "weights.safetensors"), metadata={"step": str(step)})
    save_file({**opt_tensors, **rng}, str(tmp / "state.safetensors"), metadata=meta)
    for f in tmp.iterdir():  # on disk before the rename makes the folder count
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    steps = sorted(d for d in root.iterdir() if _CHECKPOINT.match(d.name))
    for old in steps[:-keep]:  # renamed first: a kill mid-removal leaves no half-deleted checkpoint folder
        os.replace(old, root / f"{old.name}.old-{os.getpid()}")
    for trash in root.glob("checkpoint-*.old-*"):  # these, and what an earlier killed run left
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(path, trainable: dict, optimizer=None, lr_scheduler=None, scaler=None) -> int:
    """Restore weights (and optimizer, schedule, fp16 gradient scaler, RNG when given) from a
    checkpoint; return its step."""
    import torch

    from ..checkpoints import load_file

    path = Path(path)
    weights, _ = load_file(str(path / "weights.safetensors"), "checkpoint")
    differ = sorted(set(weights) ^ set(trainable)) or \
        [n for n, p in trainable.items() if tuple(weights[n].shape) != tuple(p.shape)]  # e.g. another rank
    if differ:
        raise ErasekitError(f"The checkpoint '{path}' does not fit this run's model ({len(differ)} weights differ, e.g. "
                            f"'{differ[0]}'); resume with the rank, targets and mode it was made with, or use a new --out folder.")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
    tensors, meta = load_file(str(path / "state.safetensors"), "checkpoint")
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(json.loads(meta["optimizer"]), tensors))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(json.loads(meta["lr_scheduler"]))
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(json.loads(meta["grad_scaler"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(meta["step"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict, dict]:
    """A torch optimizer state dict -> ({key: tensor}, JSON-able dict naming those keys)."""
    import torch

    tensors, state = {}, {}
    for idx, entry in state_dict["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                key = f"optimizer.{idx}.{k}"
                tensors[key] = v.detach().cpu().contiguous()
                v = {"tensor": key}
            state[str(idx)][k] = v
    return tensors, {"state": state, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(js: dict, tensors: dict) -> dict:
    def value(v):
        return tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v

    state = {int(i): {k: value(v) for k, v in entry.items()} for i, entry in js["state"].items()}
    return {"state": state, "param_groups": js["param_groups"]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (0: a fresh start, e.g. after a kill before the first checkpoint):
    the run writes those steps again. Torn lines (a kill or a full disk mid-write) go too."""
    if path.is_file():
        rows = [row for row in _metric_rows(path) if row["step"] <= step]
        write_text_atomic("".join(json.dumps(row) + "\n" for row in rows), path)


# ----------------------------------------------------------------------------- metrics and memory


def peak_memory_mb(device) -> float | None:
    """Peak memory so far, MiB: the accelerator's allocated peak (CUDA), or on a CPU the process's
    resident peak (Unix; None elsewhere). What the trainer's memory estimate reads back."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def read_metrics(run_dir) -> list:
    """The rows of a run's ``metrics.jsonl`` (one dict a step). A line that is not a row (torn by a
    kill, bytes that are not UTF-8, JSON that is no object, a step that is no whole number, a loss
    or a time that is no number) is skipped wherever it is: the other lines still count."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        return _metric_rows(path) if path.is_file() else []
    except OSError:  # unreadable (permissions, a vanished file): nothing to show
        return []


_NUMERIC_METRICS = ("loss", "lr", "seconds", "peak_mb")


def _metric_rows(path: Path) -> list:
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            continue
        if not isinstance(row, dict) or not _matches("int", row.get("step")):
            continue
        if any(row.get(k) is not None and (isinstance(row[k], bool) or not isinstance(row[k], int | float))
               for k in _NUMERIC_METRICS):
            continue
        out.append(row)
    return out


# ----------------------------------------------------------------------------- the run's lock

LOCK_NAME = ".lock"
_STALE_EMPTY_S = 10.0  # a lock file without its content for this long was left by a kill mid-write
_held: dict = {}  # lock path -> [thread id, depth, token]: the run folders this process holds
_held_guard = threading.Lock()


@contextmanager
def run_lock(run_dir, what: str = "training", log=None):
    """Hold ``<run>/.lock`` (pid, host, start time, what) while this process writes the run, so that two
    jobs, two app instances or the CLI and the app never interleave checkpoints and metrics. The
    file is created with O_CREAT | O_EXCL. A lock left by a process that no longer runs on this host
    (a kill) is taken over with a log line; a live one is refused with one sentence naming the run
    and the pid. The same thread may take the lock again (the trainer's data step, then the engine)."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[0] == me:
            entry[1] += 1
            nested = True
        elif entry is not None:
            raise ErasekitError(_busy_sentence(run_dir, _read_lock(path) or {"pid": os.getpid()}))
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    token = _acquire(run_dir, path, what, log or _stderr)
    with _held_guard:
        _held[key] = [me, 1, token]
    try:
        yield path
    finally:
        with _held_guard:
            _held.pop(key, None)
        if (_read_lock(path) or {}).get("token") == token:
            try:
                path.unlink()
            except OSError:
                pass


def lock_holder(run_dir) -> dict | None:
    """The live holder of ``<run>/.lock`` ({"pid", "host", "started", "what"}), or None: no lock, or a
    stale one (its process is gone)."""
    path = Path(run_dir) / LOCK_NAME
    info = _read_lock(path)
    if info is None:
        return None
    with _held_guard:
        mine = os.path.realpath(path) in _held
    return info if mine or not _is_stale(info, path) else None


def busy_sentence(run_dir, holder: dict) -> str:
    """What the page and the CLI say of a run another process (or job) writes."""
    return _busy_sentence(Path(run_dir), holder)


def _busy_sentence(run_dir: Path, info: dict) -> str:
    pid = info.get("pid", "?")
    here = info.get("host") in (None, socket.gethostname())
    where = "" if here else f" on the machine '{info.get('host')}'"
    doing = f" ({info['what']} since {info['started']})" if info.get("what") and info.get("started") else ""
    return (f"The run '{run_dir.name}' is in use by process {pid}{where}{doing}; wait for it to end or stop it "
            f"(if that process is gone, delete '{run_dir / LOCK_NAME}').")


def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def _read_lock(path: Path) -> dict | None:
    """The lock's content; None: no lock file; {}: a lock file without readable content."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not; unknown: assumed to run)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(info: dict, path: Path) -> bool:
    """A lock whose process no longer runs on this host; or a lock file left empty by a kill mid-write."""
    if not info:
        try:
            return time.time() - path.stat().st_mtime > _STALE_EMPTY_S
        except OSError:
            return True
    if info.get("host") != socket.gethostname():
        return False  # another machine's process (a shared folder): it cannot be asked, so it counts as live
    if info.get("pid") == os.getpid():
        with _held_guard:
            return os.path.realpath(path) not in _held  # this process does not hold it: an earlier one with our pid
    return not _pid_alive(info.get("pid"))


def _acquire(run_dir: Path, path: Path, what: str, log) -> str:
    """Create the lock file (O_EXCL), taking over a stale one; return this holder's token."""
    import secrets

    from ..checkpoints import write_error_reason

    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what, "token": token}
    run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if not _is_stale(holder, path):
                raise ErasekitError(_busy_sentence(run_dir, holder)) from None
            if _take_over(path, holder, token):
                pid = holder.get("pid", "an unknown process")
                log(f"Took over the lock of the run '{run_dir.name}' left by process {pid} (no longer running; "
                    f"{holder.get('what', 'its work')} since {holder.get('started', 'an unknown time')}).")
            continue
        except OSError as err:
            raise ErasekitError(f"Could not lock the run '{run_dir.name}' ({write_error_reason(err)}); check that "
                                f"'{run_dir}' is writable.") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            path.unlink(missing_ok=True)
            raise ErasekitError(f"Could not lock the run '{run_dir.name}' ({write_error_reason(err)}); free disk "
                                "space and try again.") from None
        return token
    raise ErasekitError(f"Could not lock the run '{run_dir.name}': other processes keep taking it; try again.")


def _take_over(path: Path, stale: dict, token: str) -> bool:
    """Move the stale lock aside atomically, then check that what moved is what was judged stale (another
    process may have taken it over meanwhile: its fresh lock is put back)."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_lock(aside)
    if moved != stale:  # a fresh lock: give it back unless a third one was made meanwhile
        try:
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True
