"""Issue #23, the trainer's side: every file a user or a workflow hands the trainer is validated, fails
closed, and loses nothing. The app's server refuses a rebound Host name, asks a password on
127.0.0.1 too (from a file or the environment), caps uploads; Export keeps a file of the same
name; a run folder is locked by the process writing it (a live lock refused, a stale one taken
over); settings files are type-checked field by field; a corrupt metrics line, a torn preview or a
full disk end in one sentence; finished jobs keep paths, not images; Detect reads configs and
headers, not a pipeline."""

import errno
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from erasekit.errors import ErasekitError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- shared set-up


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random toy model saved as a diffusers folder (what --base and the page take)."""
    from erasekit.toyworld.model import build_toy_pipeline, save_toy_pipeline

    path = tmp_path_factory.mktemp("toy") / "toy"
    save_toy_pipeline(build_toy_pipeline(0, tiny=True), path)
    return path


@pytest.fixture(scope="module")
def components(toy):
    from erasekit import models

    return lambda: models.load(str(toy))


@pytest.fixture(scope="module")
def data(components):
    from erasekit.erase.data import EraseData, toy_scene_set

    comps = components()
    forget = toy_scene_set(comps, [("red", "circle")], 4, seed=0)
    preserve = toy_scene_set(comps, [("blue", "square")], 4, seed=100, masks=False)
    return EraseData("red circle", forget, preserve, ["blue square"])


def train_config(out, toy, **kw):
    from erasekit.erase.engine import TrainConfig

    base = dict(out=str(out), target="red circle", base=str(toy), steps=4, batch_size=2, lr=5e-3, checkpoint_every=2,
                tensorboard=False, export=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy, components, data):
    """An output root with one finished run ('trained', its LoRA exported into the run folder)."""
    from erasekit.erase.engine import train
    from erasekit.erase.inpo import InpoObjective

    root = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(train_config(root / "trained", toy, steps=2, export=True), InpoObjective(), data, components())
    finally:
        torch.set_num_threads(n)
    assert result.lora is not None
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(port, method, path, host, body=None, headers=None):
    """An HTTP request to 127.0.0.1:port with exactly this Host header: (status, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    conn.close()
    return resp.status, text


def app_args(*flags):
    from trainer.arguments import build_parser

    return build_parser().parse_args(["app", *flags])


# ----------------------------------------------------------------------------- the server: Host, password, uploads


@pytest.fixture(scope="module")
def server(tmp_path_factory, toy):
    """The trainer page served as `python -m trainer app --port P --allowed-host trainer.lan --max-upload-mb 1`
    serves it, with the password from ERASEKIT_AUTH."""
    from trainer.app import TrainerApp
    from trainer.serve import launch_options

    port = free_port()
    args = app_args("--port", str(port), "--allowed-host", "trainer.lan", "--max-upload-mb", "1")
    opts = launch_options(args, environ={"ERASEKIT_AUTH": "me:s3cret"})
    app = TrainerApp(tmp_path_factory.mktemp("served"), base=str(toy), threads=1, upload_mb=1)
    demo = app.build()
    demo.launch(**opts, prevent_thread_lock=True, quiet=True)
    try:
        yield {"port": port, "url": demo.local_url, "app": app}
    finally:
        demo.close()


def test_a_rebound_host_name_is_refused_before_gradio(server):
    """DNS rebinding: a page at http://evil.example:P whose name now resolves to 127.0.0.1 sends
    Host: evil.example:P (and a same-origin Origin, which Gradio's own check lets through)."""
    port = server["port"]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost.evil:{port}", ""):
        for method, path, body in (("GET", "/", None), ("GET", "/config", None),
                                   ("POST", "/gradio_api/call/start_training", b'{"data": []}'),
                                   ("POST", "/login", b"username=me&password=s3cret")):
            status, text = raw(port, method, path, host, body,
                               {"Origin": f"http://{host}", "Content-Type": "application/json"})
            assert status == 403, (host, path, status, text)
            assert text.startswith("Refused: this Erasekit trainer answers to 127.0.0.1, localhost, [::1]")
            assert "--allowed-host NAME" in text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}", f"trainer.lan:{port}"):
        status, text = raw(port, "GET", "/", host)
        assert status == 200 and "<html" in text.lower(), (host, status)
    # an IP address other than the loopback's is only taken with --listen
    assert raw(port, "GET", "/", f"192.168.1.5:{port}")[0] == 403


def test_the_password_is_asked_on_localhost_too(server):
    from gradio_client import Client

    port = server["port"]
    assert raw(port, "GET", "/config", f"127.0.0.1:{port}")[0] == 401  # no session: not authenticated
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server["url"], verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server["url"], auth=("me", "wrong"), verbose=False)
    client = Client(server["url"], auth=("me", "s3cret"), verbose=False)
    assert client.predict(job_id=0, api_name="/job_status")["state"] in ("none", "done", "error", "cancelled", "running",
                                                                         "queued")


def test_uploads_over_the_limit_are_refused(server, tmp_path):
    import httpx

    port = server["port"]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        assert http.post("/login", data={"username": "me", "password": "s3cret"}).status_code == 200
        big = os.urandom(int(1.5 * 2**20))
        resp = http.post("/gradio_api/upload", files=[("files", ("big.png", big, "image/png"))])
        assert resp.status_code == 413 and "maximum allowed size" in resp.text
        small = http.post("/gradio_api/upload", files=[("files", ("small.png", b"x" * 1000, "image/png"))])
        assert small.status_code == 200
    # the handler says the limit in the page's words, too (a file given by path, e.g. through the API)
    big_file = tmp_path / "huge.png"
    big_file.write_bytes(b"\0" * (3 * 2**20))
    msg = server["app"].upload_images("up", [str(big_file)])
    assert msg == "**Error:** The file 'huge.png' is 3 MB; uploads are limited to 1 MB a file."
    assert not (server["app"].root / "up" / "uploads").exists()
    from trainer.serve import launch_options

    assert launch_options(app_args())["max_file_size"] == 50 * 2**20  # the default: 50 MB


def test_host_names_and_listen():
    from trainer.serve import HostAllowlist, allowed_hosts, host_name, launch_options

    assert [host_name(h) for h in ("[::1]:7860", "LocalHost.:80", "127.0.0.1", "a.b:1", "")] == \
        ["::1", "localhost", "127.0.0.1", "a.b", ""]
    names, any_ip = allowed_hosts(app_args("--listen", "--allowed-host", "Box.LAN", "--allowed-host", "fd00::1"))
    guard = HostAllowlist(None, names, any_ip)
    assert any_ip and all(guard.allows(h) for h in ("box.lan:7860", "192.168.1.5:7860", "[fd00::2]:7860", "localhost"))
    assert not guard.allows("evil.example:7860") and not guard.allows("")
    local = HostAllowlist(None, *allowed_hosts(app_args()))
    assert not local.allows("192.168.1.5:7860") and local.allows("127.0.0.1:7860")
    for bad in ("http://box:80", "*", "box:7860", "a b"):
        with pytest.raises(ErasekitError, match="--allowed-host takes a host name"):
            allowed_hosts(app_args("--allowed-host", bad))
    opts = launch_options(app_args("--listen"), environ={"ERASEKIT_AUTH": "me:pw"})
    assert opts["server_name"] == "0.0.0.0" and opts["auth"] == ("me", "pw")
    middleware = opts["app_kwargs"]["middleware"][0]
    assert middleware.cls is HostAllowlist and middleware.kwargs["any_ip"] is True


def test_the_password_comes_from_a_file_or_the_environment(tmp_path, capsys):
    from trainer.cli import main
    from trainer.serve import launch_options, read_auth

    pw = tmp_path / "pw"
    pw.write_text("me:pass word:with colon\nignored second line\n", encoding="utf-8")
    os.chmod(pw, 0o600)
    assert read_auth(app_args("--auth-file", str(pw)), environ={}) == ("me", "pass word:with colon")
    assert capsys.readouterr().err == ""
    os.chmod(pw, 0o644)
    assert read_auth(app_args("--auth-file", str(pw)), environ={})[0] == "me"
    assert "readable by other users" in capsys.readouterr().err
    assert read_auth(app_args(), environ={"ERASEKIT_AUTH": "env:pw"}) == ("env", "pw")
    assert read_auth(app_args("--auth", "flag:pw"), environ={}) == ("flag", "pw")  # still works
    assert read_auth(app_args(), environ={}) is None
    opts = launch_options(app_args("--auth-file", str(pw)), environ={})  # on 127.0.0.1 too
    assert opts["server_name"] == "127.0.0.1" and opts["auth"][0] == "me"
    bad = tmp_path / "bad"
    bad.write_text("nocolon-secret\n", encoding="utf-8")
    cases = [(["--auth-file", str(bad)], {}, f"The first line of the password file '{bad}' must be user:password"),
             (["--auth-file", str(tmp_path / "none")], {}, "does not exist"),
             (["--auth-file", str(tmp_path)], {}, "is a folder"),
             (["--auth-file", str(pw), "--auth", "a:b"], {}, "not both"),
             ([], {"ERASEKIT_AUTH": "secretonly"}, "ERASEKIT_AUTH must be user:password"),
             (["--listen"], {}, "Refusing to listen on 0.0.0.0 without a password")]
    for flags, env, words in cases:
        with pytest.raises(ErasekitError, match=words.replace("(", "\\(").replace(")", "\\)")) as err:
            launch_options(app_args(*flags), environ=env)
        assert "secret" not in str(err.value)  # the password is never echoed
    capsys.readouterr()
    assert main(["app", "--auth-file", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    from trainer.arguments import build_parser

    assert "process list" in build_parser()._subparsers._group_actions[0].choices["app"].format_help()


# ----------------------------------------------------------------------------- export never overwrites


def test_export_keeps_a_file_of_the_same_name_unless_told(trained, tmp_path):
    from erasekit import lora_io
    from trainer.app import TrainerApp

    comfy = tmp_path / "comfy"
    (comfy / "models" / "loras").mkdir(parents=True)
    theirs = comfy / "models" / "loras" / "favourite.safetensors"
    theirs.write_bytes(b"someone else's LoRA")
    app = TrainerApp(trained, comfyui=str(comfy))
    text, path = app.export("trained", "favourite", "", "", "ComfyUI models/loras", "")
    assert path == "" and text == (f"**Error:** '{theirs}' already exists; tick 'Replace a file of the same name' to "
                                   "overwrite it, or give another name.")
    assert theirs.read_bytes() == b"someone else's LoRA"

    text, first = app.export("trained", "mine", "first", "", "output root", "loras")
    assert first.endswith("mine.safetensors"), text
    before = open(first, "rb").read()
    text, again = app.export("trained", "mine", "second", "", "output root", "loras")
    assert again == "" and "already exists" in text and "mine.safetensors" in text
    assert open(first, "rb").read() == before
    text, replaced = app.export("trained", "mine", "second", "", "output root", "loras", True)
    assert replaced == first and lora_io.load_lora(first)[1]["modelspec.description"] == "second"
    text, path = app.export("trained", "favourite", "", "", "ComfyUI models/loras", "", True)
    assert path == str(theirs.resolve()) and lora_io.load_lora(path)[0]


def test_export_of_guideline_tokens_keeps_a_file_too(tmp_path):
    from erasekit.dag.guideline import GuidelineEmbedding
    from trainer import runs

    run = tmp_path / "tokens"
    run.mkdir()
    GuidelineEmbedding(torch.randn(2, 16), torch.randn(16), "red circle", "toy").save(str(runs.guideline_path(run, "red circle")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "det.safetensors").write_bytes(b"keep me")
    with pytest.raises(ErasekitError, match="det.safetensors' already exists; tick 'Replace a file of the same name'"):
        runs.export_guideline(run, tmp_path / "out", "det")
    assert (tmp_path / "out" / "det.safetensors").read_bytes() == b"keep me"
    assert GuidelineEmbedding.load(str(runs.export_guideline(run, tmp_path / "out", "det", overwrite=True))).concept == "red circle"


# ----------------------------------------------------------------------------- the run's lock


HOLD = ("import sys, time\n"
        "from erasekit.erase.state import run_lock\n"
        "with run_lock(sys.argv[1], 'training'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def hold_lock(run_dir):
    """Another process holding the run's lock (as a CLI training would): the Popen, once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO}, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc):
    proc.kill()
    proc.wait()  # reaped: its pid no longer runs


def test_a_run_written_by_another_process_is_refused_and_a_stale_lock_taken_over(data, toy, components, tmp_path):
    from erasekit.erase.engine import train
    from erasekit.erase.inpo import InpoObjective

    run = tmp_path / "run"
    proc = hold_lock(run)
    try:
        with pytest.raises(ErasekitError) as err:
            train(train_config(run, toy), InpoObjective(), data, components())
        text = str(err.value)
        assert text.startswith(f"The run 'run' is in use by process {proc.pid} (training since ") and "\n" not in text
        assert f"delete '{run / '.lock'}'" in text
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the run was written
    finally:
        kill(proc)
    lines = []
    result = train(train_config(run, toy), InpoObjective(), data, components(), log=lines.append)
    assert result.status == "done" and result.step == 4
    assert len(lines) == 1 and lines[0].startswith(f"Took over the lock of the run 'run' left by process {proc.pid} "
                                                   "(no longer running; training since ")
    assert not (run / ".lock").exists()  # released at the end


def test_the_cli_and_the_app_refuse_a_locked_run(toy, tmp_path):
    from trainer import jobs, work
    from trainer.app import TrainerApp

    root = tmp_path / "runs"
    run = root / "busy"
    proc = hold_lock(run)
    try:
        cli = subprocess.run([sys.executable, "-m", "trainer", "train", "--target", "red circle", "--base", str(toy),
                              "--out", str(run), "--steps", "2", "--forget-images", "2", "--images-per-concept", "1",
                              "--neighbours", "1", "--unrelated", "1", "--threads", "1"],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 2 and f"error: The run 'busy' is in use by process {proc.pid}" in cli.stderr, cli.stderr
        assert "Traceback" not in cli.stderr
        settings = {"target": "red circle", "base": str(toy), "forget_images": 2, "images_per_concept": 1,
                    "neighbours": 1, "unrelated": 1, "data_steps": 2, "threads": 1}
        for make in (work.data_job(settings, run), work.train_job({**settings, "steps": 2}, run),
                     work.guideline_job({**settings, "steps": 2}, run)):
            with pytest.raises(ErasekitError, match=f"in use by process {proc.pid}"):
                make(jobs.Job("data", "test", None))
        app = TrainerApp(root, base=str(toy))
        assert f"in use by process {proc.pid}" in app.upload_images("busy", [])
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        kill(proc)


def test_two_threads_of_one_process_and_odd_lock_files(tmp_path):
    from erasekit.erase.state import lock_holder, run_lock

    run = tmp_path / "run"
    inside, release, seen = threading.Event(), threading.Event(), []

    def first():
        with run_lock(run, "data"):
            with run_lock(run, "training"):  # the same thread again: the data step, then the engine
                inside.set()
                release.wait(30)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(ErasekitError, match=f"in use by process {os.getpid()} \\(data since"):
            with run_lock(run):
                seen.append("entered")
        assert lock_holder(run)["what"] == "data"
    finally:
        release.set()
        t.join()
    assert seen == [] and not (run / ".lock").exists() and lock_holder(run) is None
    # a lock file left empty by a kill while it was written: refused while fresh, stale after a while
    (run / ".lock").write_text("", encoding="utf-8")
    with pytest.raises(ErasekitError, match="in use by process \\?"):
        with run_lock(run):
            pass
    old = time.time() - 60
    os.utime(run / ".lock", (old, old))
    lines = []
    with run_lock(run, log=lines.append):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert lines and "Took over the lock of the run 'run'" in lines[0]
    # another machine's lock (a shared folder) cannot be checked: refused, naming the machine
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01 10:00:00",
                                           "what": "training"}), encoding="utf-8")
    with pytest.raises(ErasekitError, match="process 1 on the machine 'elsewhere' \\(training since 2026-01-01"):
        with run_lock(run):
            pass


# ----------------------------------------------------------------------------- settings files


def test_settings_are_type_checked_field_by_field():
    from erasekit.erase.data import DataConfig
    from erasekit.erase.engine import TrainConfig, config_from_dict
    from erasekit.erase.inpo import InpoConfig

    cases = [
        (TrainConfig, {"steps": "300"}, "[train]", "The setting 'steps' in [train] must be a whole number, not the text '300'."),
        (TrainConfig, {"lr": [1e-4]}, "[train]", "The setting 'lr' in [train] must be a number, not the list [0.0001]."),
        (TrainConfig, {"export": "yes"}, "[train]", "The setting 'export' in [train] must be true or false, not the text 'yes'."),
        (TrainConfig, {"steps": 30.5}, "[train]", "The setting 'steps' in [train] must be a whole number, not 30.5."),
        (TrainConfig, {"rank": True}, "[train]", "The setting 'rank' in [train] must be a whole number, not true."),
        (TrainConfig, {"lr": float("nan")}, "[train]", "The setting 'lr' in [train] must be a number (a finite one), not nan."),
        (TrainConfig, {"targets": 3}, "[train]", "The setting 'targets' in [train] must be text, not 3."),
        (TrainConfig, {"sample_seeds": [0, "1"]}, "[train]",
         "The setting 'sample_seeds' in [train] must be a list of whole numbers, not the list [0, '1'] (it holds the text '1')."),
        (TrainConfig, {"sample_prompts": "a red circle"}, "[train]",
         "The setting 'sample_prompts' in [train] must be a list, not the text 'a red circle'."),
        (InpoConfig, {"eta": "strong"}, "[inpo]", "The setting 'eta' in [inpo] must be a number, not the text 'strong'."),
        (DataConfig, {"forget_dir": ["a"]}, "[data]", "The setting 'forget_dir' in [data] must be text, not the list ['a']."),
        (DataConfig, {"preserve_prompts": ["a cat", 2]}, "[data]",
         "The setting 'preserve_prompts' in [data] must be a list of texts, not the list ['a cat', 2] (it holds 2)."),
        (DataConfig, {"colour": "red"}, "[data]", "Unknown setting 'colour' in [data]"),
    ]
    for cls, values, where, sentence in cases:
        with pytest.raises(ErasekitError) as err:
            config_from_dict(cls, values, where)
        assert str(err.value).startswith(sentence), str(err.value)
    ok = config_from_dict(TrainConfig, {"lr": 1, "alpha": None, "sample_seeds": [3], "sample_prompts": ["a"]}, "[train]")
    assert ok.lr == 1 and ok.alpha is None and ok.sample_seeds == [3]
    assert config_from_dict(DataConfig, {"forget_dir": None, "preserve_pairs": 0}, "[data]").forget_dir is None


def test_a_bad_settings_file_is_one_sentence_from_the_cli(toy, tmp_path, capsys):
    from trainer.arguments import build_parser
    from trainer.cli import main
    from trainer.runner import resolve

    cases = [('[train]\nsteps = "many"\n', "The setting 'steps' in [train] must be a whole number, not the text 'many'."),
             ("[train]\nexport = \"yes\"\n", "The setting 'export' in [train] must be true or false, not the text 'yes'."),
             ("[inpo]\neta = [1, 2]\n", "The setting 'eta' in [inpo] must be a number, not the list [1, 2]."),
             ("steps = 3\n", "The setting 'steps' in '{path}' is outside a table; put it under [train], [inpo] or [data].")]
    for i, (text, sentence) in enumerate(cases):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text, encoding="utf-8")
        code = main(["train", "--target", "red circle", "--base", str(toy), "--out", str(tmp_path / f"run{i}"),
                     "--config", str(path)])
        err = capsys.readouterr().err  # (the model's loading bar comes first)
        assert code == 2 and err.endswith(f"\nerror: {sentence.format(path=path)}\n") and "Traceback" not in err, err
    path = tmp_path / "latin1.toml"
    path.write_bytes('[train]\ntarget = "caf\xe9"\n'.encode("latin-1"))
    args = build_parser().parse_args(["train", "--out", str(tmp_path / "x"), "--config", str(path)])
    with pytest.raises(ErasekitError, match="is not valid TOML \\(it is not UTF-8 text\\)"):
        resolve(args, None)


def test_the_page_refuses_a_settings_file_of_wrong_types(tmp_path):
    from trainer.app import TrainerApp

    app = TrainerApp(tmp_path)
    for text, words in (("[app]\nsteps = \"lots\"\n", "The setting 'steps' in [app] of"),
                        ("[app]\nstop_when_erased = \"yes\"\n", "must be true or false, not the text 'yes'"),
                        ("[app]\nlr = [1]\n", "must be a number, not the list [1]"),
                        ("[app]\nstepz = 3\n", "Unknown setting 'stepz' in [app]"),
                        ("app = 3\n", "must be a table ([app]), not 3"),
                        ("[train]\nrank = \"4\"\n", "The setting 'rank' in [train], [inpo], [ncd], [resalign] or [data] of")):
        (tmp_path / "s.toml").write_text(text, encoding="utf-8")
        out = app.load_settings("s.toml")
        assert out[-1].startswith("**Error:** ") and words in out[-1], out[-1]
    (tmp_path / "s.toml").write_text("[app]\nsteps = 7\nlr = 1\nstop_when_erased = true\n", encoding="utf-8")
    assert app.load_settings("s.toml")[-1].startswith("Settings loaded")
    # a run's config.toml: the data's sampling steps are the page's data steps, the preview's stay the preview's
    (tmp_path / "c.toml").write_text("[train]\nsample_steps = 20\n[data]\nsample_steps = 9\n", encoding="utf-8")
    from trainer.fields import KEYS

    values = dict(zip(KEYS, app.load_settings("c.toml")))
    assert values["sample_steps"] == 20 and values["data_steps"] == 9


# ----------------------------------------------------------------------------- what the page reads


def test_a_corrupt_metrics_line_anywhere_does_not_break_the_page(tmp_path, monkeypatch):
    from trainer import jobs

    monkeypatch.setattr(jobs, "JOBS", {})  # the page shows the process's current job: none here
    from erasekit.erase.state import _truncate_metrics, read_metrics
    from trainer import estimate
    from trainer.app import TrainerApp
    from trainer.runs import list_runs

    run = tmp_path / "corrupt-metrics"  # a name no other test's job (module-wide JOBS) has
    run.mkdir()
    (run / "config.toml").write_text('[train]\ntarget = "red circle"\nsteps = 5\nbase = "b"\n', encoding="utf-8")
    lines = [b'{"step": 1, "loss": 0.5, "seconds": 1.0, "peak_mb": 10}', b"\xff\xfe{garbage",
             b'{"step": 2, "loss": 0.4, "seconds": 2.0, "peak_mb": 11}', b"[1, 2]", b'{"step": "x", "loss": 1}',
             b'{"loss": 2}', b"null", b'{"step": 3, "loss": "high"}', b'{"step": 3, "loss": 0.3, "seconds": 3.0}',
             b'{"step": 4, "lo']
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    app = TrainerApp(tmp_path)
    status, log, plot, *_ = app.poll({}, "corrupt-metrics")
    loss = plot[plot["series"] == "loss"]
    assert loss["step"].tolist() == [1, 2, 3] and loss["value"].tolist() == [0.5, 0.4, 0.3]
    assert list_runs(tmp_path)[0][:3] == ["corrupt-metrics", "red circle", "3/5"]
    assert "s/step, measured" in estimate.time_line(estimate.recent_runs(tmp_path), 10, 1, 0, False, "b")
    _truncate_metrics(run / "metrics.jsonl", 2)  # a resume from step 2 keeps the good lines up to it
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_a_torn_preview_and_a_broken_run_config_do_not_break_the_page(tmp_path, monkeypatch):
    from trainer import jobs

    monkeypatch.setattr(jobs, "JOBS", {})  # the page shows the process's current job: none here
    from trainer.app import TrainerApp

    run = tmp_path / "torn-preview"  # a name no other test's job (module-wide JOBS) has
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "step-000002.png").write_bytes(b"\x89PNG\r\n\x1a\n torn by a full disk")
    (run / "config.toml").write_bytes(b"\xff not toml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    from trainer.view import POLL_OUTPUTS

    out = dict(zip(POLL_OUTPUTS, TrainerApp(tmp_path).poll({}, "torn-preview")))
    assert out["preview"] is None and out["preview_caption"] == "No preview yet."
    assert out["runs"]["run"].tolist() == ["torn-preview"]


def test_uploading_into_a_run_with_checkpoints_is_refused(tmp_path):
    from trainer.app import TrainerApp

    run = tmp_path / "stopped"
    ckpt = run / "checkpoints" / "checkpoint-000002"
    ckpt.mkdir(parents=True)
    for name in ("weights.safetensors", "state.safetensors"):
        (ckpt / name).write_bytes(b"")
    (run / "data.safetensors").write_bytes(b"the data the checkpoints were trained on")
    (run / "uploads" / "forget").mkdir(parents=True)
    (run / "uploads" / "forget" / "a.png").write_bytes(b"earlier upload")
    image = tmp_path / "new.png"
    image.write_bytes(b"new image")
    msg = TrainerApp(tmp_path).upload_images("stopped", [str(image)])
    assert msg == ("**Error:** The run 'stopped' has checkpoints: new images would change its data under a later "
                   "Resume; upload them into a new run name (step 2).")
    assert (run / "data.safetensors").read_bytes() == b"the data the checkpoints were trained on"
    assert [p.name for p in (run / "uploads" / "forget").iterdir()] == ["a.png"]


def walk(value):
    """Every leaf of a job's result."""
    if isinstance(value, dict):
        for v in value.values():
            yield from walk(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from walk(v)
    else:
        yield value


def test_finished_jobs_keep_paths_not_images(trained, toy):
    from trainer import jobs, work
    from trainer.app import TrainerApp

    settings = {"target": "red circle", "base": str(toy), "forget_images": 2, "images_per_concept": 1, "neighbours": 1,
                "unrelated": 1, "data_steps": 2, "threads": 1}
    job = jobs.wait(jobs.submit("data", "data for the test", work.data_job(settings, trained / "gallery-run"),
                                trained / "gallery-run"))
    assert job.state == "done", job.message
    check = jobs.wait(jobs.submit("check", "check for the test", work.check_job(trained / "trained", 1, 2),
                                  trained / "trained"))
    assert check.state == "done", check.message
    for j in (job, check):
        assert j.fn is None  # nor does the work's closure stay alive
        leaves = list(walk(j.result))
        assert leaves and all(isinstance(v, str | int | float | bool | type(None)) for v in leaves), \
            {type(v).__name__ for v in leaves}
    assert all(os.path.isfile(p) for p, _ in job.result["gallery"]) and os.path.isfile(check.result["grid"])
    app = TrainerApp(trained, base=str(toy))
    from trainer.view import POLL_OUTPUTS

    page = dict(zip(POLL_OUTPUTS + ["seen"], app.poll({}, "gallery-run")))
    assert len(page["gallery"]) == len(job.result["gallery"]) >= 3 and page["gallery"][0][0].size[0] > 0
    assert "forget: " in page["gallery"][0][1] and "mask outlined" in page["gallery"][0][1]
    checked = dict(zip(POLL_OUTPUTS + ["seen"], app.poll({}, "trained")))  # the check is the run's, read from disk
    assert checked["grid"] is not None and checked["grid"].size[0] > 0 and len(checked["counts"]) >= 1


def test_detect_reads_configs_and_headers_not_a_pipeline(tmp_path, monkeypatch, toy):
    from safetensors.torch import save_file

    from erasekit import models
    from trainer.app import TrainerApp

    def no_load(*a, **k):
        raise AssertionError("Detect loaded a whole pipeline in the request thread")

    monkeypatch.setattr(models, "load", no_load)
    sd1 = tmp_path / "sd1"
    (sd1 / "unet").mkdir(parents=True)
    (sd1 / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}', encoding="utf-8")
    (sd1 / "unet" / "config.json").write_text('{"cross_attention_dim": 768}', encoding="utf-8")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3),
               "down_blocks.0.attentions.0.proj_in.weight": torch.zeros(8, 8, 1, 1),
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)},
              str(sd1 / "unet" / "diffusion_pytorch_model.safetensors"))
    app = TrainerApp(tmp_path / "runs")
    assert app.detect(str(sd1)) == "Architecture: **Stable Diffusion 1.x** (`sd_v1`)."
    xl = tmp_path / "xl"
    for sub, cfg in (("unet", {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}),
                     ("text_encoder", {"hidden_size": 768}), ("text_encoder_2", {"hidden_size": 1280})):
        (xl / sub).mkdir(parents=True)
        (xl / sub / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (xl / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}', encoding="utf-8")
    assert app.detect(str(xl)) == "Architecture: **Stable Diffusion XL** (`sdxl_base_v1-0`)."
    assert "Erasekit toy model" in app.detect(str(toy))
    (xl / "unet" / "config.json").write_text("{not json", encoding="utf-8")
    assert app.detect(str(xl)).startswith(f"**Error:** The file '{xl / 'unet' / 'config.json'}' cannot be read as JSON")
    (sd1 / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    assert "is not a valid safetensors file" in app.detect(str(sd1))


# ----------------------------------------------------------------------------- a full disk


def enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_metrics_keeps_the_last_good_checkpoint(data, toy, components, tmp_path, monkeypatch):
    import builtins

    from erasekit.erase import engine
    from erasekit.erase.engine import latest_checkpoint, train
    from erasekit.erase.inpo import InpoObjective

    real_open = builtins.open

    class Full:
        """metrics.jsonl on a disk that fills up after two lines."""

        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines > 2:
                self.f.write(text[:5])  # a torn line, as a full disk leaves it
                raise enospc()
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(engine, "open", fake_open, raising=False)
    run = tmp_path / "run"
    with pytest.raises(ErasekitError) as err:
        train(train_config(run, toy, steps=6), InpoObjective(), data, components())
    assert str(err.value) == (f"Could not write the metrics of step 3 (No space left on device); the last good checkpoint "
                              f"'{run / 'checkpoints' / 'checkpoint-000002'}' is kept: free disk space and run again "
                              "with --resume.")
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "checkpoint-000002" and not (run / ".lock").exists()
    result = train(train_config(run, toy, steps=6, resume=True), InpoObjective(), data, components())
    assert result.step == 6
    from erasekit.erase.state import read_metrics

    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]  # the torn line is gone


def test_a_full_disk_while_writing_a_preview_keeps_the_last_good_checkpoint(data, toy, components, tmp_path, monkeypatch):
    from PIL import Image

    from erasekit.erase.engine import latest_checkpoint, train
    from erasekit.erase.inpo import InpoObjective

    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(str(fp))
        if len(calls) == 2:  # the preview before step 1 fits, the one of step 2 does not
            with open(fp, "wb") as f:
                f.write(b"\x89PNG torn")
            raise enospc()
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    run = tmp_path / "run"
    with pytest.raises(ErasekitError) as err:
        train(train_config(run, toy, steps=6, sample_every=2, sample_steps=2, sample_seeds=[0]), InpoObjective(), data,
              components())
    assert str(err.value) == (f"Could not write the preview of step 2 (No space left on device); the last good checkpoint "
                              f"'{run / 'checkpoints' / 'checkpoint-000002'}' is kept: free disk space and run again "
                              "with --resume.")
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "checkpoint-000002"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000.png"]  # no torn PNG for the page


def test_a_full_disk_elsewhere_in_a_job_is_one_sentence():
    from trainer.jobs import one_sentence

    err = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert one_sentence(err) == ("The disk is full (No space left on device) while writing '/runs/x/metrics.jsonl'; "
                                 "free disk space and try again.")


# ----------------------------------------------------------------------------- dependencies


def test_requirements_name_what_the_code_imports():
    import gradio

    text = open(os.path.join(REPO, "requirements.txt"), encoding="utf-8").read()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]
    assert 'tomli>=1.1; python_version < "3.11"' in lines  # state.read_config on Python 3.10
    assert any(ln.startswith("tomli-w") for ln in lines)  # state.write_toml
    assert not any(ln.startswith("torch") for ln in lines)  # users bring their own build
    major = int(gradio.__version__.split(".")[0])
    dev = open(os.path.join(REPO, "requirements-dev.txt"), encoding="utf-8").read()
    pyproject = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    assert f"gradio>={major},<{major + 1}" in dev and f'"gradio>={major},<{major + 1}"' in pyproject
    assert '"tomli-w>=1.0"' in pyproject.split("[project.optional-dependencies]")[0]


def test_a_resalign_runs_config_loads_its_beta_into_its_own_field(tmp_path):
    """NCD and ResAlign both have a beta (different quantities): a ResAlign run's [resalign] beta goes to the
    page's ResAlign field, an NCD run's [ncd] beta to NCD's."""
    from trainer.app import page_values

    values = page_values({"train": {"steps": 5}, "resalign": {"beta": 0.3, "iterations": 2}}, tmp_path / "c.toml")
    assert values["resalign_beta"] == 0.3 and "beta" not in values and values["iterations"] == 2
    assert page_values({"ncd": {"beta": 500.0}}, tmp_path / "c.toml")["beta"] == 500.0
