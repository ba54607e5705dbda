"""TensorBoard for a run: the command to open its logs, and a TensorBoard server on 127.0.0.1 (one per run)."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

_procs: dict[str, tuple[subprocess.Popen, int]] = {}
_lock = threading.Lock()


def logdir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "tb"


def command(run_dir: str | os.PathLike) -> str:
    """The shell command that opens the run's TensorBoard logs."""
    return f"tensorboard --logdir {shlex.quote(str(logdir(run_dir)))} --host 127.0.0.1"


def available() -> bool:
    """True when TensorBoard is installed in this environment."""
    return importlib.util.find_spec("tensorboard") is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def running(run_dir: str | os.PathLike) -> str | None:
    """The URL of this run's TensorBoard when the app started one that is still alive."""
    with _lock:
        item = _procs.get(str(run_dir))
        if item is None:
            return None
        proc, port = item
        if proc.poll() is not None:
            del _procs[str(run_dir)]
            return None
        return f"http://127.0.0.1:{port}/"


def start(run_dir: str | os.PathLike) -> str:
    """Start TensorBoard on 127.0.0.1 and a free port for the run's logs (once); returns its URL."""
    url = running(run_dir)
    if url:
        return url
    if not available():
        raise RuntimeError("TensorBoard is not installed here (pip install tensorboard)")
    port = free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    cmd += ["--logdir", str(logdir(run_dir)), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    with _lock:
        _procs[str(run_dir)] = (proc, port)
    return f"http://127.0.0.1:{port}/"


def stop(run_dir: str | os.PathLike) -> None:
    """Stop the TensorBoard the app started for this run (its process group)."""
    with _lock:
        item = _procs.pop(str(run_dir), None)
    if item is not None:
        _terminate(item[0])


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@atexit.register
def _stop_all() -> None:
    with _lock:
        items = list(_procs.values())
        _procs.clear()
    for proc, _ in items:
        _terminate(proc)
