"""Where benchmark figures go: `tests/benchmarks/results.json`, committed, one entry per benchmark.

Each entry records the machine, library versions, model and index type beside its
figures, so a number is never separated from what produced it. Re-running a benchmark
replaces its entry (keyed by benchmark name and device kind, so CPU and GPU runs coexist).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"
FLICKR8K = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "flickr8k"


def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
            "commit": _git_commit()}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(benchmark: str, figures: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Store one benchmark's figures (with machine and context) and return the entry."""
    info = machine()
    entry = {"benchmark": benchmark, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "machine": info, **context, "figures": figures}
    key = f"{benchmark}@{'gpu' if info['gpu'] else 'cpu'}"
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = entry
    RESULTS.write_text(json.dumps(dict(sorted(results.items())), indent=2) + "\n")
    print(f"recorded {key} in {RESULTS}")
    return entry
