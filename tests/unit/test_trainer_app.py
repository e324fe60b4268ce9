"""The trainer app (``python -m trainer app``) driven end to end through its API with gradio_client,
on a tiny random toy model: data, training with previews, check, export (the LoRA loads), a
reloaded page sees the running job, Stop then Resume, paths outside the output root and
--listen without --auth are refused with one sentence."""

import html
import json
import os
import time

import pytest
import torch

from erasekit import lora_io


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client

    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline
    from trainer.app import TrainerApp

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("trainer-app")
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), tmp / "toy")
    trainer = TrainerApp(tmp / "runs", base=str(tmp / "toy"), threads=1)
    demo = trainer.build()
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield {"client": Client(demo.local_url, verbose=False), "url": demo.local_url, "root": tmp / "runs",
               "base": str(tmp / "toy"), "app": trainer}
    finally:
        demo.close()
        torch.set_num_threads(n)


def small(app, run_name, **kw):
    """The page's fields for a run that takes seconds: few images, few sampling and training steps."""
    return {"base": app["base"], "run_name": run_name, "target": "red circle", "preserve": "", "forget_images": 2,
            "images_per_concept": 1, "neighbours": 1, "unrelated": 1, "data_steps": 3, "steps": 4, "lr": 0.01,
            "rank": 2, "batch_size": 1, "sample_every": 2, "sample_steps": 2, "checkpoint_every": 2, **kw}


def wait(client, job_id, timeout=300, until=None):
    end = time.time() + timeout
    while time.time() < end:
        st = client.predict(job_id=job_id, api_name="/job_status")
        if (until or (lambda s: s["state"] not in ("queued", "running")))(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {st}")


def view(client, run_name):
    """What the page shows (/refresh is what the timer runs): a dict by output name."""
    from trainer.view import POLL_OUTPUTS

    return dict(zip(POLL_OUTPUTS, client.predict(run_name=run_name, api_name="/refresh")))


def test_detect_and_concept_presets(app):
    from erasekit import checkpoints
    from erasekit.toyworld.model import load_toy_pipeline

    pipe = load_toy_pipeline(app["base"])
    n = sum(p.numel() for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())
    assert checkpoints.parameter_count(app["base"]) == n  # read from the safetensors headers alone
    fresh = app["app"]._memory(app["base"]) if not list(app["root"].glob("*/metrics.jsonl")) else None
    assert fresh is None or f"about **{n * 2 / 2**20:.0f} MB** for the weights in fp16" in fresh
    c = app["client"]
    assert "Erasekit toy model" in c.predict(base=app["base"], api_name="/detect_model")
    assert "does not exist" in c.predict(base="/nowhere/model", api_name="/detect_model")
    target, anchor, preserve, preset, steps, *_, lam, run_name = c.predict(concept_type="style", base=app["base"],
                                                                          api_name="/concept_type")
    assert (target, preset, steps) == ("striped background", "style", 400) and run_name == "erase-striped-background"
    from erasekit.erase.inpo import TOY_TUNING

    assert lam == TOY_TUNING["lambda_prior"] != 0.6  # the toy model's tuning over the paper's 0.6
    assert app["app"].preset_changed("object", "/not/a/toy")[-1] == 0.6  # other models: the paper's preset
    assert len(preserve.splitlines()) == 7  # 3 other styles + 4 unrelated concepts
    assert c.predict(target="bobo", neighbours=2, unrelated=1, api_name="/suggest_preserve").count("\n") == 2
    # the method switch: DAG guideline tokens take 40 images (100 steps each), INPO its 16 and its preset's
    # steps; a count the user typed is kept
    assert tuple(c.predict(method="guideline", forget_images=16, preset="object", api_name="/method")) == (4000, 40)
    assert tuple(c.predict(method="inpo", forget_images=40, preset="object", api_name="/method")) == (300, 16)
    assert tuple(c.predict(method="guideline", forget_images=8, preset="object", api_name="/method")) == (800, 8)


def test_generate_train_check_export(app):
    c = app["client"]
    kw = small(app, "flow")
    msg, job_id = c.predict(**kw, api_name="/generate_data")
    assert msg.startswith("Queued: data") and job_id > 0
    st = wait(c, job_id)
    assert st["state"] == "done", st
    page = view(c, "flow")
    assert len(page["gallery"]) >= 2 and "forget images of 'red circle'" in page["data_summary"]
    assert any("mask outlined" in (g.get("caption") or "") for g in page["gallery"])

    msg, job_id = c.predict(**kw, api_name="/start_training")
    st = wait(c, job_id)
    assert st["state"] == "done" and st["step"] == 4, st
    assert st["result"]["lora"].endswith("erase-red-circle-inpo.safetensors")
    page = view(c, "flow")
    assert "preserve images from" in page["log"]  # the data step's sets were reused from the run's cache
    plot = page["plot"]["value"] if "value" in page["plot"] else page["plot"]
    assert [row[0] for row in plot["data"]] == [1, 2, 3, 4] * 2  # the loss, then its moving average
    assert {row[2] for row in plot["data"]} == {"loss", "loss, smoothed"}
    signal = page["signal"]["value"] if "value" in page["signal"] else page["signal"]
    assert {row[2] for row in signal["data"]} >= {"tau (the margin)"} and "tau line" in page["signal_note"]
    assert page["preview"] and os.path.isfile(page["preview"]) and "step-000004" in page["preview_caption"]
    assert ["flow", "red circle", "4/4", "done", "erase-red-circle-inpo.safetensors"] in page["runs"]["data"]
    # the estimate now reads this run's measured peak memory (before: the weights' size from the headers)
    here = app["app"].estimate(app["base"], 10, 1, 0)
    assert "peak" in here and "s/step, measured on the run 'flow'" in here
    # another base model: neither this run's time nor its memory stand for it
    other = app["app"].estimate(str(app["base"]) + "-another", 10, 1, 0)
    assert "measured" not in other and "guess" in other

    msg, job_id = c.predict(run_name="flow", seeds=2, steps=3, api_name="/check")
    st = wait(c, job_id)
    assert st["state"] == "done", st
    page = view(c, "flow")
    assert [r[0] for r in page["counts"]["data"]] == ["target", "neighbour", "unrelated"]
    assert page["grid"] and os.path.isfile(page["grid"])
    assert str(app["app"].run_dir("flow").resolve() / "report.html") in page["report_note"]
    # the Check's strength reaches the job; at 0 the LoRA is off (after = before, pixel for pixel), at 1 not
    msg, job_id = c.predict(run_name="flow", seeds=2, steps=3, strength=0.0, api_name="/check")
    assert wait(c, job_id)["state"] == "done"
    assert "LoRA applied at strength 0" in view(c, "flow")["log"]
    import numpy as np
    from PIL import Image

    from trainer import jobs, work

    for strength in (0.0, 1.0):
        job = jobs.Job("check", "test", None)
        out = work.check_job(app["app"].run_dir("flow"), 2, 3, strength=strength)(job)
        g = np.asarray(Image.open(out["grid"]))
        side = g.shape[0] // 3 * 2  # 3 prompt rows of square images, 2 seeds per panel
        assert (g[:, :side] == g[:, -side:]).all() == (strength == 0.0), strength
        # the same images as the evaluation harness's page: at strength 0 every kept pair is identical
        page_html = open(out["report"], encoding="utf-8").read()
        figures = json.loads(html.unescape(page_html.split('<pre id="json">')[1].split("</pre>")[0]))
        assert figures["prompts_total"] == 3 and figures["seeds"] == [0, 1] and figures["detector"] == "toy-judge"
        assert (figures["identical"] == 1.0) == (strength == 0.0) and page_html.count("<img") == 2 * 3 * 2

    text, path = c.predict(run_name="flow", lora_name="my erasure", description="Removes red circles.",
                           license="mit", destination="output root", folder="loras/v1", api_name="/export")
    assert path == str(app["root"].resolve() / "loras" / "v1" / "my-erasure.safetensors") and "Load Erasure LoRA" in text
    lora, meta = lora_io.load_lora(path)
    assert len(lora) > 0 and meta["modelspec.title"] == "my-erasure"
    assert meta["modelspec.description"] == "Removes red circles." and meta["modelspec.license"] == "mit"
    assert meta["erasekit.erased_concept"] == "red circle" and meta["ss_base_model_version"] == "toy"
    assert os.path.isfile(path[: -len(".safetensors")] + ".md")


def test_guideline_tokens_train_check_export(app, tmp_path):
    """Method "DAG guideline tokens": the embedding is trained from the run's images (uploaded: the
    tiny random model draws no red circle the judge would see), Check samples Detect-and-Guide with
    it, Export writes a file Load Guideline Embedding reads."""
    from erasekit.dag.guideline import GuidelineEmbedding

    c = app["client"]
    assert "3 uploaded images (3 with a mask" in upload_scenes(app, "tokens", tmp_path, with_masks=3)
    assert tuple(c.predict(method="guideline", forget_images=2, preset="object", api_name="/method")) == (200, 2)
    assert tuple(c.predict(method="inpo", forget_images=2, preset="style", api_name="/method")) == (400, 2)
    kw = small(app, "tokens", method="guideline", steps=6)
    st = wait(c, c.predict(**kw, api_name="/generate_data")[1])  # the data step works whatever the method
    assert st["state"] == "done", st
    msg, job_id = c.predict(**kw, api_name="/start_training")
    assert msg.startswith("Queued: guideline tokens for 'red circle'"), msg
    st = wait(c, job_id)
    assert st["state"] == "done" and st["step"] == 6, st
    made = st["result"]["guideline"]
    assert made.endswith("guideline-red-circle.safetensors") and "Detect-and-Guide" in st["message"]
    page = view(c, "tokens")
    plot = page["plot"]["value"] if "value" in page["plot"] else page["plot"]
    assert [row[0] for row in plot["data"]] == list(range(1, 7)) * 2  # the pixel BCE of every step, smoothed too
    assert ["tokens", "red circle", "6/6", "done", "guideline-red-circle.safetensors"] in page["runs"]["data"]

    msg, job_id = c.predict(run_name="tokens", seeds=2, steps=3, api_name="/check")
    st = wait(c, job_id)
    assert st["state"] == "done" and st["result"]["file"] == made, st
    page = view(c, "tokens")
    assert [r[0] for r in page["counts"]["data"]] == ["target", "neighbour", "unrelated"]

    text, path = c.predict(run_name="tokens", lora_name="red circle detector", description="", license="",
                           destination="output root", folder="guideline", api_name="/export")
    assert path == str(app["root"].resolve() / "guideline" / "red-circle-detector.safetensors"), text
    assert "Load Guideline Embedding" in text
    emb = GuidelineEmbedding.load(path)
    assert emb.concept == "red circle" and emb.architecture == "toy"
    # a guideline run has nothing to resume: the message says what to do instead
    assert "press Start" in c.predict(run_name="tokens", steps=10, api_name="/resume")[0]
    # one method's output per run folder, both ways
    assert "holds guideline tokens" in c.predict(**small(app, "tokens"), api_name="/start_training")[0]
    assert "holds an INPO training" in c.predict(**small(app, "flow", method="guideline"), api_name="/start_training")[0]


def test_review_paint_a_mask_and_remove_an_image(app, tmp_path):
    """Step 3's review: a forget image with its mask as a paintable layer; a painted layer saved
    becomes the mask in the run's data cache (training reads it); removing drops the image."""
    import numpy as np

    from erasekit.erase.data import EraseData

    c, trainer = app["client"], app["app"]
    upload_scenes(app, "review", tmp_path, n=3, with_masks=3)
    kw = small(app, "review", forget_images=3)
    st = wait(c, c.predict(**kw, api_name="/generate_data")[1])
    assert st["state"] == "done", st
    value, msg = trainer.review_show("review", 2)
    assert msg.startswith("Image 2 of 3") and value["background"].shape[0] >= 256  # enlarged to paint on
    layer = np.zeros_like(value["layers"][0])
    h, w = layer.shape[:2]
    layer[: h // 2, : w // 2, 3] = 255  # the top-left quarter painted
    assert "Saved the mask of image 2 (25%" in trainer.review_save("review", 2, {"layers": [layer]})
    data = EraseData.load(str(app["root"] / "review" / "data.safetensors"))
    m = data.forget.masks[1, 0]
    q = m.shape[0] // 2
    assert m[:q, :q].min() == 1.0 and m[q:, :].max() == 0.0 and m[:, q:].max() == 0.0
    third = data.forget.prompts[2]
    value, index, msg = trainer.review_remove("review", 2)
    assert index == 2 and msg.startswith("Removed image 2; 2 remain") and third in msg  # the third moved up
    assert len(EraseData.load(str(app["root"] / "review" / "data.safetensors")).forget) == 2
    # the data step's cache is what training reads: a training run on it sees 2 forget images
    st = wait(c, c.predict(**kw, api_name="/start_training")[1])
    assert st["state"] == "done" and "2 forget" in view(c, "review")["log"], st
    assert "no forget image 5" in trainer.review_show("review", 5)[1]
    (app["root"] / "review" / "review" / "key.txt").write_text("other data", encoding="utf-8")
    assert "has new data since" in trainer.review_show("review", 1)[1]  # stale images are never shown


def test_reload_sees_the_job_stop_and_resume(app):
    from gradio_client import Client

    c = app["client"]
    msg, job_id = c.predict(**small(app, "long", steps=400, sample_every=0, checkpoint_every=100), api_name="/start_training")
    wait(c, job_id, until=lambda s: s["state"] == "running" and s["step"] >= 1)
    other = Client(app["url"], verbose=False)  # a reloaded page is a new session
    assert other.predict(job_id=0, api_name="/job_status")["id"] == job_id
    assert view(other, "something-else")["status"].startswith("Running: training 'red circle' in long")
    assert "Stopping job" in other.predict(api_name="/stop")
    st = wait(c, job_id)
    assert st["state"] == "cancelled" and "Resume continues" in st["message"], st
    done = st["step"]
    row = next(r for r in view(c, "long")["runs"]["data"] if r[0] == "long")
    assert row[3] == f"stopped at step {done} (resumable)"
    # Start on a run with checkpoints is refused; Resume continues it
    assert "press Resume" in c.predict(**small(app, "long"), api_name="/start_training")[0]
    # Steps below where the run is (the page's default after a reload) would end it there: refused
    assert "not above the step the run 'long' has reached" in c.predict(run_name="long", steps=done, api_name="/resume")[0]
    msg, job_id = c.predict(run_name="long", steps=done + 2, api_name="/resume")
    st = wait(c, job_id)
    assert st["state"] == "done" and st["step"] == done + 2, st
    assert "--resume" in view(c, "long")["log"] and "stop-when-erased" not in view(c, "long")["log"]  # the run's own
    from erasekit.erase.state import read_metrics

    assert [m["step"] for m in read_metrics(app["root"] / "long")] == list(range(1, done + 3))


def upload_scenes(app, run_name, folder, n=3, with_masks=2, last_as_jpeg=False):
    """Upload ``n`` rendered red-circle scenes (the first ``with_masks`` with their exact masks) as a run's
    forget images: what a user does for a concept the model draws too rarely (the tiny random model)."""
    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    from erasekit.toyworld.scenes import render_scene, upscale_for_display

    files = []
    for i in range(n):
        s = render_scene(i, objects=[("red", "circle")])
        ext = "jpg" if last_as_jpeg and i == n - 1 else "png"  # phones and browsers give JPEGs
        Image.fromarray(upscale_for_display(s.image)).save(folder / f"img{i}.{ext}")
        files.append(handle_file(str(folder / f"img{i}.{ext}")))
        if i < with_masks:
            mask = upscale_for_display(s.objects[0].mask[..., None].repeat(3, -1).astype(np.uint8) * 255)
            Image.fromarray(mask).save(folder / f"img{i}_mask.png")
            files.append(handle_file(str(folder / f"img{i}_mask.png")))
    return app["client"].predict(run_name=run_name, files=files, api_name="/upload_images")


def test_uploaded_images_replace_the_generated_forget_set(app, tmp_path):
    c = app["client"]
    assert "3 uploaded images (2 with a mask" in upload_scenes(app, "up", tmp_path, last_as_jpeg=True)
    msg, job_id = c.predict(**small(app, "up"), api_name="/generate_data")
    assert wait(c, job_id)["state"] == "done"
    assert view(c, "up")["data_summary"].startswith("3 forget images of 'red circle'")


def test_paths_outside_the_root_are_refused(app):
    c = app["client"]
    for bad, words in (("../evil", "contains '..'"), ("/tmp/elsewhere", "is outside")):
        msg, job_id = c.predict(**small(app, bad), api_name="/generate_data")
        assert msg.startswith("**Error:**") and words in msg and job_id == 0
    text, path = c.predict(run_name="flow", lora_name="x", description="", license="", destination="output root",
                           folder="/etc", api_name="/export")
    assert "is outside" in text and path == ""
    assert "contains '..'" in c.predict(file_name="../s.toml", **small(app, "a"), api_name="/save_settings")
    assert not (app["root"].parent / "s.toml").exists() and not os.path.exists("/tmp/elsewhere")


def test_settings_round_trip_as_toml(app):
    c = app["client"]
    assert "Settings saved" in c.predict(file_name="presets/mine.toml", **small(app, "saved", steps=7,
                                                                                stop_when_erased=True),
                                         api_name="/save_settings")
    assert (app["root"] / "presets" / "mine.toml").is_file()
    values = c.predict(file_name="presets/mine.toml", api_name="/load_settings")
    from trainer.fields import KEYS

    loaded = dict(zip(KEYS + ["message"], values))
    assert loaded["steps"] == 7 and loaded["run_name"] == "saved" and "Settings loaded" in loaded["message"]
    assert loaded["stop_when_erased"] is True
    # the page's settings reach the engine as the CLI's flags
    from trainer.work import train_argv

    argv = train_argv(app["app"].settings([loaded[k] for k in KEYS]), app["root"] / "saved")
    assert "--stop-when-erased" in argv and argv[argv.index("--steps") + 1] == "7"


def test_engine_errors_are_one_sentence(app):
    c = app["client"]
    msg, job_id = c.predict(**small(app, "blob", target="red blob"), api_name="/generate_data")
    st = wait(c, job_id)
    assert st["state"] == "error" and "unknown word 'blob'" in st["message"] and "\n" not in st["message"]
    # the error is the data step's, shown under Generate data to a page that saw it end, not under Start
    from trainer.view import POLL_OUTPUTS

    seen_it = dict(zip(POLL_OUTPUTS, app["app"].poll({"since": 0}, "blob")))
    assert seen_it["data_summary"].startswith("**Error:** Cannot erase 'red blob'") and seen_it["action"] == ""
    # a later visitor (a page opened after it ended) is not greeted by it
    later = view(c, "blob")
    assert "Error" not in later["status"] and "Error" not in later["data_summary"]


def test_comfyui_install_gives_models_and_an_export_folder(tmp_path):
    from trainer.app import TrainerApp

    (tmp_path / "comfy" / "models" / "checkpoints" / "sd").mkdir(parents=True)
    (tmp_path / "comfy" / "models" / "checkpoints" / "sd" / "v15.safetensors").write_bytes(b"")
    app = TrainerApp(tmp_path / "runs", comfyui=str(tmp_path / "comfy"))
    assert str((tmp_path / "comfy" / "models" / "checkpoints" / "sd" / "v15.safetensors").resolve()) in app.base_choices()
    assert app.export_roots()["ComfyUI models/loras"] == (tmp_path / "comfy" / "models" / "loras").resolve()


def test_listen_needs_auth(capsys):
    from trainer.arguments import build_parser
    from trainer.cli import main
    from trainer.serve import launch_options

    assert main(["app", "--listen"]) == 2
    err = capsys.readouterr().err
    assert "Refusing to listen on 0.0.0.0 without a password" in err and err.count("\n") == 1
    opts = launch_options(build_parser().parse_args(["app"]))
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False and opts["auth"] is None
    opts = launch_options(build_parser().parse_args(["app", "--listen", "--auth", "me:secret"]))
    assert opts["server_name"] == "0.0.0.0" and opts["auth"] == ("me", "secret")
    assert main(["app", "--auth", "nocolon"]) == 2


def test_removing_an_image_keeps_sdxl_inputs(tmp_path):
    """An SDXL run's forget images carry a pooled embedding and size ids; removing one keeps them
    for the others (training without them failed with an error about SDXL's added inputs)."""
    import torch

    from erasekit.erase.data import EraseData, ImageSet
    from trainer import runs

    n = 3
    forget = ImageSet(torch.zeros(n, 4, 8, 8), torch.zeros(n, 7, 16), torch.zeros(n, 7, dtype=torch.long),
                      [f"p{i}" for i in range(n)], torch.ones(n, 1, 8, 8), torch.arange(n)[:, None].float().repeat(1, 5),
                      torch.zeros(n, 6))
    data = EraseData("x", forget, None, [], "key")
    run = tmp_path / "run"
    (run / runs.REVIEW).mkdir(parents=True)
    data.save(str(run / "data.safetensors"))
    (run / runs.REVIEW / "key.txt").write_text("key", encoding="utf-8")
    for i in range(n):
        (run / runs.REVIEW / f"forget-{i:03d}.png").write_bytes(b"")
    assert runs.remove_forget_image(run, 2) == 2
    left = EraseData.load(str(run / "data.safetensors")).forget
    assert left.prompts == ["p0", "p2"] and left.pooled[:, 0].tolist() == [0.0, 2.0] and left.time_ids.shape == (2, 6)
