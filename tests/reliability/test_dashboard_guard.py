"""The dashboard no other site can drive and no path can lead out of its folders.

* A real ``workbench dashboard`` server (127.0.0.1, a free port, stopped by its process group): a WebSocket
  upgrade whose ``Host`` is a foreign name (DNS rebinding: ``evil.example:P`` with a matching ``Origin``) is
  refused, as is a foreign ``Origin`` with the right Host; the page's own names are let in (so the refusal is
  the Host's, not a broken request). Plain HTTP routes (the static page, health) carry no run data.
* The page (AppTest): a YAML config, a CSV file or a runs folder typed into it from outside the runs root and
  the app's configs/ (directly, through ``..``, through a symbolic link inside the root, or as a ``--set``
  line) is refused with the field's name, and nothing of the refused file reaches the page: no YAML key, no
  CSV column name.
"""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from workbench import handle, registry, runs

from conftest import ROOT, stop_group, wait_for

APP = ROOT / "app" / "dashboard.py"
SECRET_KEY = "zz_secret_key_q7"
SECRET_COLUMN = "zz_secret_col_k3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upgrade(port: int, host: str, origin: str | None) -> str:
    """The status line the server answers a WebSocket upgrade of its stream with."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n" + (f"Origin: {origin}\r\n" if origin else "")
            + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        return s.recv(4096).decode("latin-1").split("\r\n", 1)[0]


@pytest.mark.slow
def test_the_server_refuses_a_foreign_host_and_origin(tmp_path):
    port = _free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "dashboard", "--runs", str(tmp_path / "runs"),
                             "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5).status == 200
            except OSError:
                return False
        wait_for(healthy, timeout=120, poll=0.5)
        evil = f"evil.example:{port}"
        assert _upgrade(port, evil, f"http://{evil}").split()[1] == "403"
        assert _upgrade(port, evil, None).split()[1] == "403"
        assert _upgrade(port, f"127.0.0.1:{port}", "http://evil.example").split()[1] == "403"
        for name in ("127.0.0.1", "localhost"):
            assert _upgrade(port, f"{name}:{port}", f"http://{name}:{port}").split()[1] == "101"
        # bound to this machine only
        assert all(a[4][0] in ("127.0.0.1",) for a in socket.getaddrinfo("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            stop_group(proc, 30)
        log.close()


# ---------------------------------------------------------------------------- the page: paths typed into it
@pytest.fixture
def page(runs_root, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs_root))
    monkeypatch.delenv("WORKBENCH_DEMO", raising=False)
    monkeypatch.delenv("WORKBENCH_ALLOW", raising=False)
    at = AppTest.from_file(str(APP), default_timeout=60)
    yield at
    registry.stop_all(under=runs_root)
    handle.close_all()
    runs.clear_cache()


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.yaml").write_text(f"{SECRET_KEY}: 1\nlr: 0.1\n")
    (folder / "secret.csv").write_text(f"a,{SECRET_COLUMN}\n1,0\n2,1\n3,0\n4,1\n5,0\n")
    return folder


def _page_text(at: AppTest) -> str:
    """Every message the page shows (errors, warnings, infos, successes, captions, markdown)."""
    parts = []
    for kind in ("error", "warning", "info", "success", "caption", "markdown", "exception"):
        parts += [str(getattr(e, "value", "")) or str(getattr(e, "message", "")) for e in getattr(at, kind)]
    return "\n".join(parts)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def _trainers_under(folder: Path) -> list:
    return [t for k, t in registry.trainers().items() if Path(k).resolve().is_relative_to(folder.resolve())]


def test_a_yaml_file_outside_the_folders_is_refused_unread(page, runs_root, outside):
    (runs_root / "link.yaml").symlink_to(outside / "secret.yaml")
    page.run()
    page.radio(key="launch_source").set_value("YAML config").run()
    for typed in (str(outside / "secret.yaml"), f"{runs_root}/../outside/secret.yaml", str(runs_root / "link.yaml")):
        page.text_input(key="launch_yaml").set_value(typed).run()
        assert not page.exception
        said = _errors(page)
        assert any("config:" in e and "outside the folders" in e and "allowed" in e for e in said), said
        assert SECRET_KEY not in _page_text(page)
    # a file inside the root is read (so the refusal above is the folder's)
    (runs_root / "mine.yaml").write_text("lr: 0.02\n")
    page.text_input(key="launch_yaml").set_value(str(runs_root / "mine.yaml")).run()
    assert not _errors(page) and page.text_input(key="launch_lr").value == "0.02"


def test_a_csv_file_outside_the_folders_is_refused_unread(page, runs_root, outside):
    page.run()
    page.selectbox(key="launch_dataset").set_value("csv").run()
    for typed in (str(outside / "secret.csv"), f"{runs_root}/../outside/secret.csv"):
        page.text_input(key="launch_csv").set_value(typed)
        page.text_input(key="launch_csv_target").set_value("nope")  # a missing target would list the columns
        page.button(key="launch_start").click().run()
        assert not page.exception
        assert "outside the folders" in _page_text(page) and "dataset" in _page_text(page), _page_text(page)
        assert SECRET_COLUMN not in _page_text(page)
    # the same file through a --set line, in any spelling the data loader accepts
    page.selectbox(key="launch_dataset").set_value("digits").run()
    for line in (f"dataset=csv:{outside / 'secret.csv'}", f"dataset=CSV:{outside / 'secret.csv'}",
                 f"dataset= csv:{outside / 'secret.csv'}"):
        page.text_area(key="launch_overrides").set_value(f"{line}\ndataset_options={{target: nope}}")
        page.button(key="launch_start").click().run()
        assert not page.exception
        assert "outside the folders" in _page_text(page), (line, _page_text(page))
        assert SECRET_COLUMN not in _page_text(page), line
    assert not _trainers_under(outside) and not list(runs_root.iterdir())


def test_a_runs_folder_outside_the_root_is_refused(page, runs_root, outside):
    page.run()
    for typed in (str(outside), f"{runs_root}/..", "/"):
        page.text_input(key="runs_root").set_value(typed).run()
        assert not page.exception
        said = _errors(page)
        assert any("runs folder" in e and "outside the folders" in e for e in said), (typed, said)
    # launching now still puts the run under the runs root, never under the folder typed
    page.text_input(key="runs_root").set_value(str(outside))
    page.text_area(key="launch_overrides").set_value(f"runs_root={outside}")
    page.button(key="launch_start").click().run()
    assert "outside the folders" in _page_text(page)
    assert not _trainers_under(outside) and not [p for p in outside.iterdir() if p.is_dir()]
