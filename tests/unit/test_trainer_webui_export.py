"""The trainer's export straight into an Automatic1111 / Forge folder (``python -m trainer app --webui
PATH``): the LoRA into ``<PATH>/models/Lora`` with the Lora tab's card ``<name>.json`` beside it
(A1111's per-LoRA user metadata), never over a file of the same name unless told, and the card's
contents (:func:`erasekit.webui_card.webui_user_metadata`). The real web UI reading them is
``tests/a1111/test_lora_a1111.py``."""

import json
import os

import pytest
import torch

from erasekit import checkpoints, lora_io, webui_card


def _lora(width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
            lora_io.LoraWeights(torch.randn(2, width, generator=gen), torch.randn(32, 2, generator=gen), 2.0)}


@pytest.fixture
def setup(tmp_path):
    """An output root with a finished SD1 run ('sd1': an erasure LoRA for an SD1-layout model of text
    width 32) and a toy one ('toy'), and a web UI folder with one checkpoint."""
    root = tmp_path / "runs"
    for run, arch in (("sd1", checkpoints.sd_v1(32)), ("toy", checkpoints.toy(32))):
        (root / run).mkdir(parents=True)
        lora_io.save_lora(_lora(32), str(root / run / f"erase-red-circle-{run}.safetensors"), arch,
                          erased_concept="red circle", method="inpo", preserved=["blue square"],
                          base_model="v1-5.safetensors" if run == "sd1" else "", model_card=False)
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion" / "sd").mkdir(parents=True)
    (webui / "models" / "Stable-diffusion" / "sd" / "v15.safetensors").write_bytes(b"")
    from trainer.app import TrainerApp

    return {"app": TrainerApp(root, webui=str(webui)), "webui": webui.resolve(), "root": root}


def test_a_web_ui_gives_models_and_an_export_folder(setup):
    app, webui = setup["app"], setup["webui"]
    assert app.export_roots()["Web UI models/Lora"] == webui / "models" / "Lora"
    assert str(webui / "models" / "Stable-diffusion" / "sd" / "v15.safetensors") in app.base_choices()


def test_export_into_the_web_ui_writes_the_lora_and_its_card(setup):
    app, webui = setup["app"], setup["webui"]
    text, path = app.export("sd1", "erase-red-circle", "Made for a test.", "", "Web UI models/Lora", "")
    lora_dir = webui / "models" / "Lora"
    assert path == str(lora_dir / "erase-red-circle.safetensors"), text
    assert "`<lora:erase-red-circle:1>`" in text and "erase-red-circle.json" in text
    assert sorted(os.listdir(lora_dir)) == ["erase-red-circle.json", "erase-red-circle.md", "erase-red-circle.safetensors"]
    lora, meta = lora_io.load_lora(path)
    original = lora_io.load_lora(str(setup["root"] / "sd1" / "erase-red-circle-sd1.safetensors"))[0]
    assert all(torch.equal(lora[m].delta(), original[m].delta()) for m in original)
    assert meta["ss_output_name"] == "erase-red-circle"  # A1111's alias: <lora:erase-red-circle:1>
    card = json.loads((lora_dir / "erase-red-circle.json").read_text(encoding="utf-8"))
    assert card == {
        "description": "Erases: red circle. Method: inpo. Base: Stable Diffusion 1.x (v1-5.safetensors). Keeps: blue "
                       "square. Made for a test.",
        "sd version": "SD1", "preferred weight": 1.0, "activation text": "", "negative text": "",
        "notes": card["notes"]}
    # into the output root: no card (only a web UI reads it)
    text, other = app.export("sd1", "plain", "", "", "output root", "loras")
    assert other.endswith("plain.safetensors") and not os.path.exists(other[: -len(".safetensors")] + ".json")


def test_export_into_the_web_ui_never_replaces_a_file_unless_told(setup):
    app, webui = setup["app"], setup["webui"]
    lora_dir = webui / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    theirs = lora_dir / "favourite.safetensors"
    theirs.write_bytes(b"someone else's LoRA")
    text, path = app.export("sd1", "favourite", "", "", "Web UI models/Lora", "")
    assert path == "" and text == (f"**Error:** '{theirs}' already exists; tick 'Replace a file of the same name' to "
                                   "overwrite it, or give another name.")
    assert theirs.read_bytes() == b"someone else's LoRA" and not (lora_dir / "favourite.json").exists()

    # a card without its LoRA (the user's notes on a LoRA they removed) is kept too
    (lora_dir / "notes.json").write_text(json.dumps({"description": "mine", "notes": "keep"}), encoding="utf-8")
    text, path = app.export("sd1", "notes", "", "", "Web UI models/Lora", "")
    assert path == "" and "notes.json' already exists (the web UI's card of a LoRA named 'notes')" in text
    assert not (lora_dir / "notes.safetensors").exists()

    # Replace: the LoRA and the card's description are the new ones; what the user set in the web UI stays
    (lora_dir / "favourite.json").write_text(json.dumps(
        {"description": "old", "sd version": "SDXL", "activation text": "my words", "notes": "my notes",
         "preferred weight": 0.7}), encoding="utf-8")
    text, path = app.export("sd1", "favourite", "", "", "Web UI models/Lora", "", True)
    assert path == str(theirs) and lora_io.load_lora(path)[0]
    card = json.loads((lora_dir / "favourite.json").read_text(encoding="utf-8"))
    assert card["description"].startswith("Erases: red circle.") and card["sd version"] == "SD1"
    assert card["preferred weight"] == 1.0
    assert (card["activation text"], card["notes"]) == ("my words", "my notes")
    assert not [n for n in os.listdir(lora_dir) if ".tmp" in n]  # atomic writes leave no temporary file


def test_a_toy_model_lora_is_not_exported_into_a_web_ui(setup):
    app, webui = setup["app"], setup["webui"]
    text, path = app.export("toy", "toy-erase", "", "", "Web UI models/Lora", "")
    assert path == "" and text == ("**Error:** The LoRA of the run 'toy' is for the Erasekit toy model, which "
                                   "Automatic1111 and Forge cannot load; export it into the output root, or train on an "
                                   "SD 1.x, 2.x or XL model for the web UI.")
    assert not (webui / "models" / "Lora").exists()


def test_a_guideline_embedding_goes_to_the_web_uis_guideline_folder(setup):
    from erasekit.dag.guideline import GuidelineEmbedding
    from trainer import runs

    app, webui = setup["app"], setup["webui"]
    run = setup["root"] / "tokens"
    run.mkdir()
    GuidelineEmbedding(torch.randn(2, 32), torch.randn(32), "red circle", "sd_v1").save(
        str(runs.guideline_path(run, "red circle")))
    text, path = app.export("tokens", "red-circle", "", "", "Web UI models/Lora", "")
    assert path == str(webui / "models" / "guideline" / "red-circle.safetensors"), text
    assert "Detect-and-Guide (Erasekit)" in text


def test_the_card_names_the_web_uis_sd_version():
    for arch, version in ((checkpoints.sd_v1(), "SD1"), (checkpoints.sd_v2(), "SD2"), (checkpoints.sdxl(), "SDXL"),
                          (checkpoints.toy(32), "Unknown")):
        meta = {"ss_base_model_version": arch.name, "erasekit.erased_concept": "nudity", "erasekit.method": "inpo"}
        card = webui_card.webui_user_metadata(meta)
        assert card["sd version"] == version
        assert card["description"] == f"Erases: nudity. Method: inpo. Base: {arch.title}."
    assert webui_card.erasure_summary({"ss_base_model_version": "sd_v1", "ss_output_name": "a style"}) == ""


def test_the_webui_option_and_a_missing_folder(tmp_path, capsys, monkeypatch):
    from trainer.arguments import build_parser
    from trainer.cli import main

    assert build_parser().parse_args(["app", "--webui", "/x"]).webui == "/x"
    monkeypatch.setenv("WEBUI_PATH", "/from/env")
    assert build_parser().parse_args(["app"]).webui == "/from/env"
    assert main(["app", "--webui", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"The web UI folder '{tmp_path / 'none'}' does not exist; check --webui or WEBUI_PATH." in err
