"""The real Automatic1111 v1.10.1 and Forge web UIs (``tools/webui.py``), headless on CPU with this
repository linked as the extension ``erasekit``: one server per kind for the whole session, on a free
loopback port. They skip, with the reason, where the web UIs' sources cannot be had.

``a1111`` serves a tiny SD1-layout checkpoint (widths of 32), ``forge`` a full-size random SD1.5
(Forge accepts only SD1.5's real widths). Each yields a ``tools.webui.WebUI``: ``.url``,
``.txt2img(payload) -> [PIL images]``, ``.scripts()``, ``.extensions()``, ``.get``/``.post`` and
``.log_tail()`` (the server's output, for assertion messages).
"""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    for item in items:  # every test here talks to a real server process
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.server)


def _serve(kind, tmp_path_factory):
    from tools import webui

    try:
        webui.setup(kind)
    except webui.Unavailable as e:
        pytest.skip(str(e))
    with webui.serve(kind, data_dir=str(tmp_path_factory.mktemp(f"{kind}-data"))) as server:
        yield server


@pytest.fixture(scope="session")
def a1111(tmp_path_factory):
    """Automatic1111 v1.10.1 serving the API (``--nowebui``) with a tiny SD1 checkpoint."""
    yield from _serve("a1111", tmp_path_factory)


@pytest.fixture(scope="session")
def forge(tmp_path_factory):
    """Forge (dfdcbab6) serving the API (``--nowebui``) with a full-size random SD1.5."""
    yield from _serve("forge", tmp_path_factory)
