"""The trainer app's data step for the method chosen (NCD here): Generate data makes NCD's tuples
through the method registry, counts their images, shows them in the gallery and keeps them as the
run's data; a reload (or data made by the CLI) is recognised as the run's NCD data; Start before
Generate data loads the model once. On the bundled toy model (NCD needs a model that draws the
concept: the judge keeps only tuples it confirms), 10 sampling steps: a few seconds each."""

import os

import pytest

from erasekit.errors import ErasekitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = os.path.join(REPO, "models", "toy")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SETTINGS = {"method": "ncd", "target": "red circle", "base": TOY, "anchor": "green circle", "forget_images": 2,
            "images_per_concept": 1, "neighbours": 1, "unrelated": 1, "data_steps": 10, "threads": 1}


def recording_progress(monkeypatch):
    from trainer import jobs

    calls = []
    real = jobs.Job.set_progress

    def recording(self, step, total, text=None, unit=None):
        calls.append((unit or "steps", step, total))
        return real(self, step, total, text, unit)

    monkeypatch.setattr(jobs.Job, "set_progress", recording)
    return calls


def test_generate_data_makes_ncd_tuples_with_progress_and_a_reload_shows_them(tmp_path, monkeypatch):
    from erasekit.erase.data import EraseData
    from erasekit.erase.ncd_data import NcdData
    from trainer import jobs, runs, work

    calls = recording_progress(monkeypatch)
    run = tmp_path / "runs" / "ncd-data"
    job = jobs.wait(jobs.submit("data", "ncd data", work.data_job(SETTINGS, run), run), 300)
    assert job.state == "done", (job.message, job.lines[-5:])
    data = NcdData.load(str(run / "data.safetensors"))
    assert data is not None and len(data) == 2 and data.latents.shape[1] == 4  # NCD's tuples, not INPO's sets
    assert EraseData.load(str(run / "data.safetensors")) is None
    assert data.preserve is not None and len(data.preserve) == 2
    images = [(s, t) for u, s, t in calls if u == "images"]
    assert images and all(t == 2 * 4 + 2 for _, t in images)  # 2 tuples of 1 safe + 3 of the concept, 2 preserve
    done = [s for s, _ in images]
    assert done == sorted(done) and done[-1] == 10 and done[0] < 10  # counted as they were drawn, never back
    assert job.result["summary"].startswith("2 tuples of 'red circle' (a safe picture and 3 of the concept each)")
    captions = [c for _, c in job.result["gallery"]]
    assert captions[0] == f"safe: {data.safe_prompts[0]}" and "green circle" in captions[0]
    assert captions[1:4] == [f"concept {j}/3: {data.prompts[0]}" for j in (1, 2, 3)]
    assert sum(c.startswith("preserve: ") for c in captions) == 2

    # a reload: the gallery and its summary read from the run's folder, for NCD's data as for INPO's
    items, summary = runs.read_gallery(run)
    assert [c for _, c in items] == captions and summary == job.result["summary"]
    assert runs.data_key(run) == data.key
    # the mask review is for forget images with masks: one sentence, in the page's words
    with pytest.raises(ErasekitError, match="holds NCD's pictures .* no masks to fix"):
        runs.forget_for_review(run, 1)

    # Generate data again with the same settings: read from the run, not drawn again
    calls.clear()
    again = jobs.wait(jobs.submit("data", "ncd data again", work.data_job(SETTINGS, run), run), 300)
    assert again.state == "done" and not [c for c in calls if c[0] == "images"]
    assert any("2 tuples, 2 preserve images from" in line for line in again.lines)


def test_cli_made_ncd_data_is_the_runs_data_after_a_reload(tmp_path):
    """Data made by the CLI's own function: the page says Generate data shows it (read, not drawn);
    Generate data with NCD chosen then reads it, where INPO's data step would have replaced it."""
    from trainer import jobs, runs, work
    from trainer.arguments import build_parser
    from trainer.runner import prepare

    run = tmp_path / "runs" / "cli-ncd"
    argv = work.train_argv(SETTINGS, run, config=work.write_extra_config(run, SETTINGS))
    made = prepare(build_parser().parse_args(argv), log=lambda m: None)["data"]
    assert runs.data_key(run) == made.key
    items, sentence = runs.read_gallery(run)
    assert items == [] and "press 'Generate data' to show it" in sentence
    job = jobs.wait(jobs.submit("data", "show the cli's data", work.data_job(SETTINGS, run), run), 300)
    assert job.state == "done", job.message
    assert any("2 tuples, 2 preserve images from" in line for line in job.lines)
    assert runs.data_key(run) == made.key and runs.read_gallery(run)[0]


def test_start_before_generate_data_loads_the_model_once_and_trains_on_the_tuples(tmp_path, monkeypatch):
    from erasekit import models
    from erasekit.erase.ncd_data import NcdData
    from trainer import jobs, runs, work

    loads = []
    real_load = models.load

    def counting(*a, **k):
        loads.append(a[0] if a else k.get("source"))
        return real_load(*a, **k)

    monkeypatch.setattr(models, "load", counting)
    calls = recording_progress(monkeypatch)
    run = tmp_path / "runs" / "ncd-start"
    settings = {**SETTINGS, "steps": 2, "batch_size": 1, "sample_every": 0, "checkpoint_every": 2}
    job = jobs.wait(jobs.submit("train", "ncd start", work.train_job(settings, run), run), 300)
    assert job.state == "done", (job.message, job.lines[-5:])
    assert len(loads) == 1, loads  # the data and the training share one loaded model
    units = [u for u, _, _ in calls]
    assert "images" in units and units[-1] == "steps" and units.index("images") < units.index("steps")
    assert any("2 tuples, 2 preserve images from" in line for line in job.lines)  # the training read them
    assert NcdData.load(str(run / "data.safetensors")) is not None
    items, summary = runs.read_gallery(run)
    assert items and summary.startswith("2 tuples of 'red circle'")
    assert any("step 2/2" in line and "implicit_acc" in line for line in job.lines)
    from erasekit import lora_io

    _, meta = lora_io.load_lora(str(runs.find_lora(run)))
    assert meta["erasekit.method"] == "ncd" and meta["erasekit.erased_concept"] == "red circle"


def test_inpo_data_then_ncd_start_remakes_the_data_as_ncds(tmp_path):
    """The run's data was INPO's (Generate data with INPO chosen); Start with NCD makes NCD's tuples
    the data step's way, and the gallery shows them (it no longer shows the INPO sets)."""
    from erasekit.erase.ncd_data import NcdData
    from trainer import jobs, runs, work

    run = tmp_path / "runs" / "switch"
    inpo = {**SETTINGS, "method": "inpo"}
    job = jobs.wait(jobs.submit("data", "inpo data", work.data_job(inpo, run), run), 300)
    assert job.state == "done" and "forget images of 'red circle'" in job.result["summary"]
    assert NcdData.load(str(run / "data.safetensors")) is None
    settings = {**SETTINGS, "steps": 1, "batch_size": 1, "sample_every": 0, "checkpoint_every": 1}
    job = jobs.wait(jobs.submit("train", "ncd start", work.train_job(settings, run), run), 300)
    assert job.state == "done", (job.message, job.lines[-5:])
    assert NcdData.load(str(run / "data.safetensors")) is not None
    assert runs.read_gallery(run)[1].startswith("2 tuples of 'red circle'")


def test_choosing_ncd_sets_its_presets_steps(tmp_path):
    """The method list moves Steps to NCD's preset: the toy tuning's on the toy model, the paper's
    3200 (A.1) on another model, not INPO's."""
    from erasekit.erase import methods
    from trainer.app import TrainerApp

    toy_steps = methods.get("ncd").preset("object", toy=True)[0]["steps"]
    assert TrainerApp(tmp_path / "runs", base=TOY).method_changed("ncd", 16, "object") == (toy_steps, 16)
    other = TrainerApp(tmp_path / "runs", base=str(tmp_path / "sd15.safetensors"))
    assert other.method_changed("ncd", 2, "object") == (3200, 2)
    assert other.method_changed("inpo", 2, "object")[0] != 3200
