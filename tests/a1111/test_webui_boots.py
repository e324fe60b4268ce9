"""Each real web UI boots headless with the repository as an extension and generates images: a seeded
txt2img is reproducible, of the requested size, and differs between the two seeds of a batch."""

import os
import subprocess

import numpy as np
import pytest

from tools import REPO

pytestmark = pytest.mark.parametrize("kind", ["a1111", "forge"], scope="module")  # one web UI, then the other


@pytest.fixture
def server(kind, request):
    return request.getfixturevalue(kind)


def test_answers_with_its_checkpoint(server, kind):
    titles = [m["title"] for m in server.get("/sdapi/v1/sd-models")]
    name = {"a1111": "tiny-sd1", "forge": "random-sd15"}[kind]
    assert any(name in t for t in titles), titles
    scripts = server.scripts()
    assert set(scripts) >= {"txt2img", "img2img"}, scripts


def test_extension_is_linked(server):
    link = os.path.join(server.data_dir, "extensions", "erasekit")
    assert os.path.realpath(link) == os.path.realpath(REPO)
    listed = {e["name"]: e for e in server.extensions()}
    remote = subprocess.run(["git", "-C", REPO, "remote", "get-url", "origin"], capture_output=True, text=True)
    if remote.returncode == 0:  # a clone (a user's, CI's checkout)
        assert "erasekit" in listed, (sorted(listed), server.log_tail())
        assert listed["erasekit"]["enabled"]
    else:
        # /sdapi/v1/extensions leaves out extensions without a git remote, as this checkout is; the web
        # UI found the folder all the same: it read its git information (and reported the missing remote)
        assert "erasekit" not in listed
        assert "reading extension data from Git repository (erasekit)" in server.log_tail(10**6)


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_seeded_txt2img_is_reproducible(server, sampler):
    payload = {"prompt": "a photo of a cat on a sofa", "negative_prompt": "blurry", "seed": 1234, "steps": 4,
               "width": 64, "height": 64, "batch_size": 2, "cfg_scale": 7, "sampler_name": sampler,
               "save_images": False, "send_images": True}
    first = server.txt2img(payload)
    second = server.txt2img(payload)
    assert len(first) == len(second) == 2, server.log_tail()
    a = [np.asarray(im.convert("RGB")) for im in first]
    b = [np.asarray(im.convert("RGB")) for im in second]
    for x, y in zip(a, b):
        assert x.shape == (64, 64, 3)
        assert np.array_equal(x, y), f"{sampler}: the same seed gave another image"
    assert not np.array_equal(a[0], a[1]), "seeds 1234 and 1235 gave the same image"
    assert all(x.std() > 0 for x in a), "a flat image"


def test_without_sources_setup_says_why(kind, tmp_path):
    """No archives and no GitHub (git may use file:// only here): set-up raises "... cannot be had: ..."
    (the fixtures skip with it), and `make test`'s set-up prints the reason and goes on."""
    import sys

    env = dict(os.environ, ERASEKIT_A1111_SOURCES=str(tmp_path / "none"), ERASEKIT_WEBUI_CACHE=str(tmp_path / "c"),
               GIT_ALLOW_PROTOCOL="file")
    code = f"from tools import webui\ntry:\n    webui.setup({kind!r})\nexcept webui.Unavailable as e:\n    print('UNAVAILABLE', e)"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "UNAVAILABLE" in p.stdout and " cannot be had: " in p.stdout and "git clone failed" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "tools.webui", "setup", "--if-available", kind], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "SKIPPED" in p.stdout and "cannot be had" in p.stdout, p.stdout + p.stderr
