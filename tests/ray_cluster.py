"""A real Ray cluster for the tests: `ray start --head` with 2 CPUs, `ray stop` at the end.

The cluster uses Ray's token authentication, as Ray's own local clusters do by default now,
with a token of its own: RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH go to this process's
environment, so the tests' drivers (and the CLI processes they start) present it.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'crossmodal[ray]' (make test installs it)"


def ray_command() -> Path | None:
    command = Path(sys.executable).with_name("ray")
    return command if command.is_file() else None


def start_head(port: int, token_file: Path, cpus: int = 2) -> str:
    """Start a head node; returns its address for `ray.init(address=...)` and `--ray`."""
    token_file.write_text(secrets.token_hex(32))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    subprocess.run([str(ray_command()), "start", "--head", "--port", str(port), "--num-cpus", str(cpus),
                    "--num-gpus", "0", "--object-store-memory", str(1_000_000_000), "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
    return f"127.0.0.1:{port}"


def stop() -> None:
    subprocess.run([str(ray_command()), "stop", "--force"], capture_output=True, timeout=120)
