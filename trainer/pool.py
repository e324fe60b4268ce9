"""ResAlign's pool of simulated fine-tunes on the trainer page: an editable table, one row per
fine-tune, with the columns of :class:`erasekit.erase.resalign.InnerConfig`.

The table is the one place the page's pool lives (a pool file is read *into* it by "Load pool file";
nothing else decides the pool). It is checked by the core's rules (:func:`erasekit.erase.resalign.pool_rows`)
and written on Start as the run's ``pool.toml`` (:func:`erasekit.erase.resalign.write_pool`), whose
path is the method's ``pool`` setting: the CLI and a run's ``config.toml`` see a file, as ever.

Values travel in three shapes: the component's payload (``{"headers", "data"}``: the page's default,
what gradio_client sends and receives), a pandas DataFrame (what a handler gets from the page), and
rows (dicts, what a settings file keeps as ``pool`` in ``[app]``). :func:`table_rows` reads any of them."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

from erasekit.erase.resalign import DEFAULT_POOL, InnerConfig, pool_rows, read_pool
from erasekit.errors import ErasekitError

COLUMNS = [f.name for f in fields(InnerConfig)]  # optimizer, lr, steps, space, loss, batch
DATATYPES = ["str" if f.type in ("str", str) else "number" for f in fields(InnerConfig)]
NUMBERS = {f.name for f in fields(InnerConfig) if f.type not in ("str", str)}
WHERE = "The ResAlign pool table (step 4, Advanced settings)"


def full_rows(rows) -> list:
    """Rows as complete dicts (:class:`InnerConfig` or partial dicts: a missing column takes its default)."""
    return [asdict(r) if isinstance(r, InnerConfig) else asdict(InnerConfig(**r)) for r in rows]


def payload(rows) -> dict:
    """The table's value for the page (and gradio_client): ``{"headers", "data"}``."""
    return {"headers": list(COLUMNS), "data": [[r[c] for c in COLUMNS] for r in full_rows(rows)]}


DEFAULT_TABLE = payload(DEFAULT_POOL)


def _cell(column: str, value):
    """A cell as the core checks it: text stripped; a number column's text read as a number where it is
    one (else left, to be refused by name); 3.0 in a whole-number column is 3; an empty cell is None."""
    if value is None or (isinstance(value, float) and value != value):  # an empty cell (pandas: NaN)
        return None
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if column in NUMBERS:
            try:
                value = float(value)
            except ValueError:
                return value
    if column in NUMBERS and column != "lr" and isinstance(value, float) and value.is_integer():
        return int(value)
    if column == "lr" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def table_rows(value) -> list:
    """The table's rows as dicts (cells read by :func:`_cell`; rows with every cell empty dropped) from
    a DataFrame, a payload, rows (dicts) or lists in :data:`COLUMNS`' order."""
    if value is None:
        return []
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # a pandas DataFrame
        headers, data = [str(c) for c in value.columns], value.values.tolist()
    elif isinstance(value, dict) and "data" in value:
        headers, data = list(value.get("headers") or COLUMNS), value["data"] or []
    elif isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return [r for r in ({k: _cell(k, v) for k, v in r.items()} for r in value) if any(v is not None for v in r.values())]
    elif isinstance(value, list):
        headers, data = list(COLUMNS), value
    else:
        raise ErasekitError(f"{WHERE} cannot be read from {type(value).__name__}; give rows of {', '.join(COLUMNS)}.")
    rows = []
    for row in data:
        if not isinstance(row, list | tuple):
            raise ErasekitError(f"{WHERE} has a row that is not a list of cells: {row!r}.")
        cells = {str(h): _cell(str(h), v) for h, v in zip(headers, row)}
        if any(v is not None for v in cells.values()):
            rows.append(cells)
    return rows


def pool_from_table(value, where: str = WHERE) -> list:
    """The pool (:class:`InnerConfig` rows) of the table, by the core's rules: one sentence for a bad row."""
    return pool_rows(table_rows(value), where)


def read_pool_file(path: str, root: Path | None = None) -> dict:
    """The table's value from a pool TOML file (``[[config]]`` tables, e.g. a run's ``pool.toml``); a
    relative path is taken under ``root`` (the output root). Refused with one sentence."""
    text = str(path or "").strip()
    if not text:
        raise ErasekitError("No pool file given: type the path of a .toml file with one [[config]] table per "
                            "simulated fine-tune (a run's pool.toml is one).")
    file = Path(text).expanduser()
    if not file.is_absolute() and root is not None:
        file = Path(root) / file
    if file.suffix.lower() != ".toml":
        raise ErasekitError(f"The pool file '{file}' is not a .toml file.")
    if not file.is_file():
        raise ErasekitError(f"The pool file '{file}' does not exist.")
    return payload(read_pool(str(file)))


def table_of_setting(value, where: str) -> dict:
    """The table's value from a settings file's ``pool``: rows (what Save settings writes), or a path
    to a pool file (a run's ``[resalign] pool``; "" = the built-in pool). Refused with one sentence."""
    if isinstance(value, str):
        if not value.strip():
            return payload(DEFAULT_POOL)
        file = Path(value).expanduser()
        if not file.is_file():
            raise ErasekitError(f"{where} names the pool file '{value}', which does not exist.")
        return payload(read_pool(str(file)))
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        return payload(pool_rows(table_rows(value), where))
    raise ErasekitError(f"{where} must be rows of the pool (a list of tables) or a pool file's path, not {value!r}.")
