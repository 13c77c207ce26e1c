"""Starting the UI (Streamlit) and, for `crossmodal up`, the search service beside it.

Both run as child processes: the UI needs Streamlit's own server, and keeping the
service in its own process keeps the model out of the UI's memory.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import crossmodal.ui
from crossmodal.ui.settings import UISettings

APP_FILE = Path(crossmodal.ui.__file__).resolve().parent / "app.py"


def streamlit_command(host: str, port: int, max_upload_bytes: int, allowed_hosts: list[str]) -> list[str]:
    """`streamlit run` for the app; Streamlit itself refuses WebSocket sessions (the whole app)
    whose Host header is not allowed, which stops DNS-rebinding pages."""
    hosts = [flag for name in allowed_hosts for flag in ("--server.allowedHosts", name)]
    return [sys.executable, "-m", "streamlit", "run", str(APP_FILE),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
            # Twice the service's limit: a photo somewhat over it reaches the service, whose refusal says why
            # in words; the uploader's own refusal is a small "!" explained on hover only (issue 20 item 7).
            "--server.maxUploadSize", str(max(1, math.ceil(2 * max_upload_bytes / 2**20))),
            "--client.toolbarMode", "minimal",
            # Blue, not Streamlit's red: a red border around the focused query box read as an error.
            "--theme.primaryColor", "#1f5fbf", *hosts]


def start_ui(ui: UISettings, max_upload_bytes: int, allowed_hosts: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CROSSMODAL_API_URL": ui.api_url}
    return subprocess.Popen(streamlit_command(ui.ui_host, ui.ui_port, max_upload_bytes, allowed_hosts), env=env)


def start_service(host: str, port: int, index_dir: Path | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "crossmodal.cli", "serve", "--host", host, "--port", str(port)]
    if index_dir is not None:
        command += ["--index-dir", str(index_dir)]
    return subprocess.Popen(command)


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything, rather than report a URL that another program answers."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"{host}:{port} is already in use ({err.strerror}); stop what listens there "
                               "or choose another port") from err


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Until `url` answers at all (any status), or the process dies, or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {process.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def run_until_interrupted(processes: list[subprocess.Popen]) -> int:
    """Wait for the first child to exit (or Ctrl-C / SIGTERM), then stop the others."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the children too
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return max((p.returncode or 0) for p in processes)
