"""What the trainer page tells a first-time user: progress with a rate and the time left (the data
builder reports its images), messages in the page's words, the plots' series, help and presets,
the warning for a concept the toy model cannot draw, a run's data shown from its folder, and a
renamed export saying so."""

import json

import pytest
import torch

from trainer.progress import Progress


def test_progress_rate_and_time_left_per_phase():
    p = Progress()
    p.update(0, 40, "steps", now=100.0)
    assert p.text(now=100.0) == "step 0/40"  # nothing measured yet: no rate, no guess
    p.update(10, 40, now=105.0)
    assert p.text(now=105.0) == "step 10/40, 2.0 steps/s, about 15 s left"
    p.update(1, 18, "images", now=200.0)  # a new phase: the rate starts again
    assert p.rate(now=200.0) is None
    p.update(5, 18, now=220.0)
    assert p.text(now=220.0) == "images 5/18, 5.0 s/image, about 65 s left"
    p.update(18, 18, now=300.0)
    assert "left" not in p.text(now=300.0)


def test_page_words_replace_the_clis_flags_and_commands():
    from trainer.words import page_words

    base = page_words("The base model '/x' does not exist; pass --base <a diffusers folder or a .safetensors "
                      "checkpoint> (the toy model is made by `python -m erasekit.toyworld train --out models/toy`).")
    assert "--" not in base and "python -m" not in base and "step 1 (Base model)" in base
    nan = page_words("lower the learning rate (now 0.1) and run again with --resume.")
    assert nan.endswith("press Resume.")
    masks = page_words("Masks from a guideline embedding need its file: pass --guideline <file.safetensors> "
                       "(python -m trainer guideline makes one).")
    assert "'Guideline embedding for masks'" in masks and "python" not in masks
    assert page_words("set --steps and --lambda-prior") == "set 'Steps' and 'lambda_prior (preservation)'"


def test_runner_sentences_reach_the_page_without_cli_syntax(tmp_path):
    """The runner's own refusals (a missing base model, no target) through the page's words."""
    from erasekit.errors import ErasekitError
    from trainer.arguments import build_parser
    from trainer.runner import prepare
    from trainer.words import page_words

    for argv in (["train", "--base", str(tmp_path / "nowhere"), "--target", "red circle", "--out", str(tmp_path / "r")],
                 ["train", "--target", "", "--out", str(tmp_path / "r2")]):
        with pytest.raises(ErasekitError) as err:
            prepare(build_parser().parse_args(argv), log=lambda _: None, with_data=False)
        shown = page_words(str(err.value))
        assert "--" not in shown and "python -m" not in shown, shown


def test_loss_smoothing_and_the_inpo_signal_with_its_tau_line():
    from trainer.plots import loss_frame, signal_frame, smoothed

    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0
    jumpy = smoothed([1.0, 5.0, 1.0, 5.0, 1.0, 5.0])
    assert max(jumpy) - min(jumpy) < 4.0
    rows = [{"step": i, "loss": float(i % 2), "delta_s": 0.02 * i} for i in range(1, 11)]
    frame = loss_frame(rows)
    assert list(frame["series"].unique()) == ["loss", "loss, smoothed"] and len(frame) == 20
    sig, note = signal_frame(rows, "inpo", {"tau": 0.1})
    tau = sig[sig["series"] == "tau (the margin)"]
    assert list(tau["value"]) == [0.1, 0.1] and list(tau["step"]) == [1, 10]
    assert "Erased looks like Delta S rising above the tau line" in note
    empty, other = signal_frame(rows, "some-new-method", {})
    assert empty.empty and "no erasure signal" in other


def test_strength_presets_and_help_on_every_setting():
    from erasekit.erase.inpo import preset
    from trainer.fields import KEYS
    from trainer.help import HELP, strength_values

    assert set(KEYS) <= set(HELP) | {"mask_from"}  # Masks has its own info on the page
    row = preset("object")
    assert strength_values(row, "default") == (300, 0.6)
    gentle, strong = strength_values(row, "gentle"), strength_values(row, "strong")
    assert gentle[1] > 0.6 > strong[1] and strong[0] > 300


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    path = tmp_path_factory.mktemp("feedback") / "toy"
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), path)
    return path


def test_nudity_on_the_toy_model_gets_a_warning(toy, tmp_path):
    from trainer.app import TrainerApp

    app = TrainerApp(tmp_path / "runs", base=str(toy))
    assert "toy model draws no people" in app.concept_note("nudity", str(toy))
    assert app.concept_note("object", str(toy)) == ""
    assert app.concept_note("nudity", str(tmp_path / "an-sd-checkpoint.safetensors")) == ""


def test_data_builder_reports_its_images(toy):
    from erasekit import models
    from erasekit.erase.data import DataConfig, build_erase_data

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comps = models.load(str(toy))
        seen = []
        config = DataConfig(forget_images=2, neighbours=1, unrelated=1, images_per_concept=2, sample_steps=3, batch=2)
        data = build_erase_data(comps, "red circle", config, log=lambda _: None,
                                progress=lambda done, total: seen.append((done, total)))
    finally:
        torch.set_num_threads(n)
    totals = {t for _, t in seen}
    assert totals == {2 + 4}  # two forget images, then 2 x 2 preserve images
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[-1] == 6 and len(seen) >= 3 * 3  # every denoising step of each batch
    assert len(data.preserve) == 4


def test_a_runs_gallery_is_read_from_its_folder(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from trainer import runs

    run = tmp_path / "r"
    run.mkdir()
    assert runs.read_gallery(run) == ([], "")  # no data: nothing to say
    save_file({"x": torch.zeros(1)}, str(run / "data.safetensors"), {"erasekit.data": json.dumps({"key": "k1"})})
    items, sentence = runs.read_gallery(run)
    assert items == [] and "press 'Generate data' to show it" in sentence  # data made elsewhere
    runs.write_gallery(run, [(np.zeros((8, 8, 3), np.uint8), "forget: a red circle")], "1 forget image.")
    items, summary = runs.read_gallery(run)
    assert [c for _, c in items] == ["forget: a red circle"] and summary == "1 forget image."
    save_file({"x": torch.ones(1)}, str(run / "data.safetensors"), {"erasekit.data": json.dumps({"key": "k2"})})
    assert runs.read_gallery(run)[0] == []  # remade data: the old pictures would show other images


def test_outline_is_white_inside_and_black_outside():
    from trainer.work import outline_masks

    images = torch.full((1, 3, 64, 64), 0.5)
    images[:, 0] = 1.0  # a red picture: a red tint would not show on it
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:40, 20:40] = 1
    out = outline_masks(images, mask)
    assert torch.all(out[0, :, 20, 30] == 1.0) and torch.all(out[0, :, 19, 30] == 0.0)
    assert torch.equal(out[0, :, 30, 30], images[0, :, 30, 30])  # inside: as drawn
    assert out[0, 0, 5, 5] < images[0, 0, 5, 5]  # outside: dimmed


def test_a_renamed_export_says_so(tmp_path):
    from trainer.app import _renamed

    assert _renamed("erase-red-circle", tmp_path / "erase-red-circle.safetensors") == ""
    assert _renamed("erase-red-circle.safetensors", tmp_path / "erase-red-circle.safetensors") == ""
    said = _renamed("red circle (v2)", tmp_path / "red-circle-v2.safetensors")
    assert "Saved as `red-circle-v2.safetensors`" in said and "'red circle (v2)'" in said


def test_start_without_data_counts_its_images_then_its_steps(toy, tmp_path, monkeypatch):
    """Start pressed before Generate data: the job draws the data the data step's way (images done /
    total, the gallery of step 3), then trains from the run's cache (steps done / total)."""
    from trainer import jobs, runs, work

    units = []
    real = jobs.Job.set_progress

    def recording(self, step, total, text=None, unit=None):
        units.append((unit or "steps", total))
        return real(self, step, total, text, unit)

    monkeypatch.setattr(jobs.Job, "set_progress", recording)
    settings = {"target": "red circle", "base": str(toy), "forget_images": 2, "images_per_concept": 1, "neighbours": 1,
                "unrelated": 1, "data_steps": 2, "steps": 2, "lr": 0.01, "rank": 2, "sample_every": 0,
                "checkpoint_every": 2, "threads": 1}
    run = tmp_path / "no-data-first"
    job = jobs.wait(jobs.submit("train", "train first", work.train_job(settings, run), run))
    assert job.state == "done", job.message
    assert ("images", 4) in units and units[-1] == ("steps", 2)  # 2 forget + 2 preserve images, then 2 steps
    assert units.index(("images", 4)) < units.index(("steps", 2))
    assert any("preserve images from" in line for line in job.lines)  # the training read the sets just made
    items, summary = runs.read_gallery(run)
    assert items and "forget images of 'red circle'" in summary
