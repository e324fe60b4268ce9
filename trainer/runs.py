"""Run folders of the trainer app: find what a run made, export it, list runs with their status."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from erasekit.erase.state import busy_sentence, lock_holder
from erasekit.errors import ErasekitError
from trainer.jobs import JOBS, busy_with, slug  # noqa: F401  (slug: one spelling of names for runs and files)

GUIDELINE_PREFIX = "guideline-"  # a run's guideline embedding: <run>/guideline-<concept>.safetensors


def find_lora(run_dir: Path) -> Path | None:
    """The run's exported LoRA (the newest .safetensors beside config.toml; the data cache and a
    guideline embedding aside)."""
    files = [p for p in Path(run_dir).glob("*.safetensors")
             if p.name != "data.safetensors" and not p.name.startswith(GUIDELINE_PREFIX)]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def find_guideline(run_dir: Path) -> Path | None:
    """The run's guideline embedding (DAG guideline tokens), the newest if several."""
    files = list(Path(run_dir).glob(f"{GUIDELINE_PREFIX}*.safetensors"))
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def guideline_path(run_dir: Path, target: str) -> Path:
    return Path(run_dir) / f"{GUIDELINE_PREFIX}{slug(target)}.safetensors"


def clean_file_name(name: str, what: str) -> str:
    """A user's file name without folders, odd characters or the .safetensors suffix."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", (name or "").strip()).strip("-.")
    clean = clean[: -len(".safetensors")] if clean.endswith(".safetensors") else clean
    if not clean:
        raise ErasekitError(f"The {what} name is empty; give a file name such as 'erase-red-circle'.")
    return clean


REPLACE_LABEL = "Replace a file of the same name"  # the Export step's checkbox
WEBUI_ROOT = "Web UI models/Lora"  # the Export step's choice with --webui (Automatic1111 / Forge)


def export_target(dest_dir: Path, clean: str, overwrite: bool) -> Path:
    """``dest_dir/<clean>.safetensors``; a file already there (another LoRA in ComfyUI's folder, a web
    UI's Lora folder) is refused with one sentence naming it unless ``overwrite`` says to replace it."""
    dest = Path(dest_dir) / f"{clean}.safetensors"
    if not overwrite and os.path.lexists(dest):
        raise ErasekitError(f"'{dest}' already exists; tick '{REPLACE_LABEL}' to overwrite it, or give another name.")
    return dest


def export_guideline(run_dir: Path, dest_dir: Path, name: str, overwrite: bool = False) -> Path:
    """Copy the run's guideline embedding to ``dest_dir/<name>.safetensors`` (checked on the way:
    it loads as an embedding; written atomically); an existing file is replaced only with ``overwrite``."""
    from erasekit.dag.guideline import GuidelineEmbedding

    src = find_guideline(run_dir)
    if src is None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no guideline embedding yet; train it first "
                            "(method: DAG guideline tokens).")
    dest = export_target(dest_dir, clean_file_name(name, "embedding"), overwrite)
    emb = GuidelineEmbedding.load(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    emb.save(str(dest))
    return dest


def architecture_from_lora(lora: dict, meta: dict):
    """The base-model family of a LoRA file (for re-saving it), from its metadata and a layer's width."""
    from erasekit import checkpoints

    name = meta.get("ss_base_model_version", "")
    widths = [int(w.down.shape[1]) for k, w in lora.items() if k.startswith("unet.") and k.endswith("attn2.to_k")]
    width = widths[0] if widths else None
    if name == "toy":
        return checkpoints.toy(width or 64)
    if name == "sd_v2":
        return checkpoints.sd_v2(width or 1024)
    if name.startswith("sdxl"):
        return checkpoints.sdxl()
    return checkpoints.sd_v1(width or 768)


def export_lora(run_dir: Path, dest_dir: Path, name: str, description: str = "", license: str = "",
                overwrite: bool = False, webui_card: bool = False) -> Path:
    """Copy the run's LoRA to ``dest_dir/<name>.safetensors`` with the user's title, description and
    license in its metadata and model card (``<name>.md`` beside it); an existing file of that name
    is replaced only with ``overwrite``. ``webui_card``: ``dest_dir`` is a web UI's ``models/Lora``,
    so the LoRA must be for SD 1.x / 2.x / XL (not the toy model) and its card ``<name>.json``
    (:func:`erasekit.webui_card.write_webui_sidecar`) is written beside it, kept like the LoRA itself
    unless ``overwrite``."""
    import json

    from erasekit import checkpoints, lora_io
    from erasekit.webui_card import WEBUI_SD_VERSION, webui_sidecar_path, write_webui_sidecar

    src = find_lora(run_dir)
    if src is None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no exported LoRA yet; train it to the end first.")
    clean = clean_file_name(name, "LoRA")
    if webui_card:
        _, header = checkpoints.read_header(str(src), "LoRA file")
        fam = lora_io.family(header.get("ss_base_model_version", ""))
        if fam not in WEBUI_SD_VERSION:
            made_for = (f"the {lora_io.FAMILY_TITLES[fam]}" if fam in lora_io.FAMILY_TITLES
                        else f"'{fam}'" if fam else "an unknown model")
            raise ErasekitError(f"The LoRA of the run '{Path(run_dir).name}' is for {made_for}, which Automatic1111 "
                                "and Forge cannot load; export it into the output root, or train on an SD 1.x, 2.x "
                                "or XL model for the web UI.")
    dest = export_target(dest_dir, clean, overwrite)
    card = Path(webui_sidecar_path(str(dest)))
    if webui_card and not overwrite and os.path.lexists(card):
        raise ErasekitError(f"'{card}' already exists (the web UI's card of a LoRA named '{clean}'); tick "
                            f"'{REPLACE_LABEL}' to overwrite it, or give another name.")
    lora, meta = lora_io.load_lora(str(src))
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads(meta.get("erasekit.config", "{}"))
        preserved = json.loads(meta.get("erasekit.preserved", "[]"))
    except ValueError:
        config, preserved = {}, []
    path = Path(lora_io.save_lora(
        lora, str(dest), architecture_from_lora(lora, meta),
        erased_concept=meta.get("erasekit.erased_concept", ""), method=meta.get("erasekit.method", ""),
        preserved=preserved, config=config, title=clean, description=description.strip() or None,
        license=license.strip() or None, base_model=meta.get("ss_sd_model_name", "")))
    if webui_card:
        write_webui_sidecar(str(path), description)
    return path


# ----------------------------------------------------------------------------- runs


def list_runs(root) -> list:
    """[name, target, steps done / total, status, output file] for every run folder under ``root``
    (the output: the erasure LoRA, or the guideline embedding of a guideline run)."""
    from erasekit.erase.engine import latest_checkpoint, read_config, read_metrics

    rows = []
    root = Path(root)
    if not root.is_dir():
        return rows
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg_path = d / "config.toml"
        has_data = (d / "data.safetensors").is_file()
        if not cfg_path.is_file() and not has_data:
            continue
        try:
            train = read_config(cfg_path).get("train", {}) if cfg_path.is_file() else {}
        except (ErasekitError, OSError, ValueError):  # unreadable, not TOML: the run is still listed
            train = {}
        train = train if isinstance(train, dict) else {}
        metrics = d / "metrics.jsonl"
        done = max((row["step"] for row in read_metrics(d)), default=0)  # a corrupt line is skipped
        lora = find_lora(d) or find_guideline(d)
        job = busy_with(d)
        errors = [j for j in JOBS.values() if j.run_dir and os.path.realpath(j.run_dir) == os.path.realpath(d)]
        last = max(errors, key=lambda j: j.id) if errors else None
        if job is not None:
            status = f"{job.state} ({job.kind})"
        elif last is not None and last.state == "error":
            status = "error: " + last.message
        elif lora is not None:
            status = "done"
        elif latest_checkpoint(d) is not None:
            status = f"stopped at step {done} (resumable)"
        elif has_data and not metrics.is_file():
            status = "data ready"
        else:
            status = "not started"
        rows.append([d.name, train.get("target", ""), f"{done}/{train.get('steps', '?')}", status,
                     lora.name if lora else ""])
    return rows




def latest_preview(run_dir) -> Path | None:
    files = sorted((Path(run_dir) / "samples").glob("step-*.png"))
    return files[-1] if files else None


def save_image(path, image) -> Path:
    """Write a uint8 ``[H, W, 3]`` image as a PNG atomically (a full disk leaves no torn file)."""
    from PIL import Image

    from erasekit.checkpoints import write_error_reason

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ErasekitError(f"Could not write '{path}' ({write_error_reason(err)}); free disk space and try again.") from None
    return path


GALLERY = "gallery"  # <run>/gallery/NNN.png: the data step's gallery (forget images with masks, preserve images)
GALLERY_INDEX = "captions.json"  # <run>/gallery/captions.json: the captions, the summary, the data's key


def write_gallery(run_dir, items, summary: str = "") -> list:
    """Save the gallery's (uint8 image, caption) pairs as ``<run>/gallery/NNN.png``, replacing old ones,
    with their captions, ``summary`` and the key of the run's data cache (so a reloaded page shows
    them while they still show that data); returns [(path, caption)]: what a finished data job keeps."""
    folder = Path(run_dir) / GALLERY
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    out = [(str(save_image(folder / f"{i:03d}.png", img)), caption) for i, (img, caption) in enumerate(items)]
    index = {"captions": [c for _, c in out], "summary": summary, "key": data_key(run_dir)}
    (folder / GALLERY_INDEX).write_text(json.dumps(index), encoding="utf-8")
    return out


DATA_HEADERS = ("erasekit.data", "erasekit.ncd_data")  # the caches' headers: INPO's (and ResAlign's) sets, NCD's tuples


def _data_header(run_dir) -> tuple[str, dict]:
    """(header name, its JSON) of the run's data cache, read from the file's header alone; ("", {}):
    missing, torn, not a cache."""
    from safetensors import safe_open

    path = Path(run_dir) / "data.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        name = next((name for name in DATA_HEADERS if name in meta), "")
        header = json.loads(meta[name]) if name else {}
        return (name, header) if isinstance(header, dict) else ("", {})
    except (OSError, ValueError, RuntimeError):
        return "", {}


def data_key(run_dir) -> str | None:
    """The key of the run's data cache (``data.safetensors``, any method's); None: no cache."""
    return _data_header(run_dir)[1].get("key")


def read_gallery(run_dir) -> tuple[list, str]:
    """([(path, caption)], summary) of the run's gallery as the data step left it; ([], sentence) when
    the run has data but no gallery of it (made by a training or the CLI, or remade since)."""
    folder = Path(run_dir) / GALLERY
    key = data_key(run_dir)
    if key is None:
        return [], ""
    try:
        index = json.loads((folder / GALLERY_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    captions = index.get("captions") if isinstance(index, dict) else None
    if index.get("key") != key or not isinstance(captions, list):
        return [], (f"The run '{Path(run_dir).name}' has data (data.safetensors) but no pictures of it here; press "
                    "'Generate data' to show it (it is read from the run, not drawn again).")
    items = [(str(folder / f"{i:03d}.png"), str(c)) for i, c in enumerate(captions)]
    return [(p, c) for p, c in items if os.path.isfile(p)], str(index.get("summary") or "")


CHECK_ROWS = "check.json"  # <run>/check.json: the judge's counts of the run's last check (beside check.png)


def write_check_rows(run_dir, rows) -> None:
    (Path(run_dir) / CHECK_ROWS).write_text(json.dumps(rows), encoding="utf-8")


def read_check(run_dir) -> tuple[Path | None, list]:
    """(check.png, its judge rows) of the run's last check; (None, []) when it has none."""
    grid = Path(run_dir) / "check.png"
    if not grid.is_file():
        return None, []
    try:
        rows = json.loads((Path(run_dir) / CHECK_ROWS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rows = []
    return grid, rows if isinstance(rows, list) else []


def open_image(path):
    """A PIL image read into memory from ``path`` (the file stays closed), or None: gone or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=["PNG"]) as img:  # the app's own previews and grids
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError, ValueError):
        return None


# ----------------------------------------------------------------------------- forget images under review

REVIEW = "review"  # <run>/review/forget-NNN.png: the forget images as decoded when the data was made


def write_review_images(run_dir, images, key: str) -> None:
    """Save the decoded forget images (uint8 ``[H, W, 3]`` each) for the mask editor, replacing old
    ones, with the key of the data they show (``EraseData.key``)."""
    from PIL import Image

    folder = Path(run_dir) / REVIEW
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("forget-*.png"):
        old.unlink()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"forget-{i:03d}.png")
    (folder / "key.txt").write_text(key, encoding="utf-8")


def _review_data(run_dir, index: int):
    """(EraseData of the run's cache, 0-based index), the index checked against the forget set."""
    from erasekit.erase.data import EraseData

    cache = Path(run_dir) / "data.safetensors"
    if _data_header(run_dir)[0] == "erasekit.ncd_data":  # NCD's tuples: the concept's pictures and safe ones
        raise ErasekitError(f"The run '{Path(run_dir).name}' holds NCD's pictures (three of the concept and a safe one "
                            "per prompt), which have no masks to fix; the review is for INPO's and ResAlign's forget "
                            "images.")
    if not cache.is_file() or not (Path(run_dir) / REVIEW).is_dir():
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no data yet; press 'Generate data' first.")
    if busy_with(run_dir) is not None:
        raise ErasekitError(f"The run '{Path(run_dir).name}' is busy with a job; review its images when it is done.")
    holder = lock_holder(run_dir)
    if holder is not None:  # another process (the CLI, another app) writes the run
        raise ErasekitError(busy_sentence(run_dir, holder))
    data = EraseData.load(str(cache))
    if data is None:  # replaced by another kind of data since the header was read
        raise ErasekitError(f"The run '{Path(run_dir).name}' has no forget images to review; press 'Generate data' "
                            "first.")
    key_file = Path(run_dir) / REVIEW / "key.txt"
    n = len(data.forget)
    if not key_file.is_file() or key_file.read_text(encoding="utf-8") != data.key or \
            any(not (Path(run_dir) / REVIEW / f"forget-{i:03d}.png").is_file() for i in range(n)):
        raise ErasekitError(f"The run '{Path(run_dir).name}' has new data since its images were shown (a training with "
                            "other data settings remakes them); press 'Generate data' to review them again.")
    if not 1 <= int(index) <= n:
        raise ErasekitError(f"There is no forget image {index}: the run has {n} (1 to {n}).")
    return data, int(index) - 1


def forget_for_review(run_dir, index: int):
    """(image uint8 ``[H, W, 3]``, mask bool ``[H, W]`` at the image's size, prompt, count) of forget image ``index`` (1-based)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    data, i = _review_data(run_dir, index)
    with Image.open(Path(run_dir) / REVIEW / f"forget-{i:03d}.png", formats=["PNG"]) as img:
        image = np.asarray(img.convert("RGB"))
    m = data.forget.masks[i : i + 1] if data.forget.masks is not None else torch.ones(1, 1, 1, 1)
    mask = F.interpolate(m.float(), size=image.shape[:2], mode="nearest")[0, 0].numpy() >= 0.5
    return image, mask, data.forget.prompts[i], len(data.forget)


def save_forget_mask(run_dir, index: int, mask) -> float:
    """Replace forget image ``index``'s mask (bool ``[H, W]`` at any size; area-averaged to the
    latent grid) in the run's data cache, written atomically. Returns the masked fraction."""
    import torch
    import torch.nn.functional as F

    data, i = _review_data(run_dir, index)
    hw = tuple(data.forget.latents.shape[-2:])
    m = F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None, None], size=hw, mode="area")[0]
    masks = data.forget.masks if data.forget.masks is not None else torch.ones(len(data.forget), 1, *hw)
    masks = masks.clone()
    masks[i] = m
    data.forget.masks = masks
    data.save(str(Path(run_dir) / "data.safetensors"))
    return float(m.mean())


def remove_forget_image(run_dir, index: int) -> int:
    """Drop forget image ``index`` from the run's data cache (atomically) and its review image;
    returns how many remain. The last image cannot be removed: training needs one."""
    from erasekit.erase.data import ImageSet

    data, i = _review_data(run_dir, index)
    n = len(data.forget)
    if n == 1:
        raise ErasekitError("This is the only forget image; training needs at least one. Generate or upload more first.")
    keep = [j for j in range(n) if j != i]
    f = data.forget
    data.forget = ImageSet(f.latents[keep], f.embeds[keep], f.ids[keep], [f.prompts[j] for j in keep],
                           *(None if x is None else x[keep] for x in (f.masks, f.pooled, f.time_ids)))  # SDXL's too
    data.save(str(Path(run_dir) / "data.safetensors"))
    folder = Path(run_dir) / REVIEW
    (folder / f"forget-{i:03d}.png").unlink(missing_ok=True)
    for j in range(i + 1, n):  # renumber the later ones so that image k is always forget-(k-1)
        os.replace(folder / f"forget-{j:03d}.png", folder / f"forget-{j - 1:03d}.png")
    (folder / "key.txt").write_text(data.key, encoding="utf-8")
    return n - 1
