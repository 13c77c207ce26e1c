"""The distribution as a user gets it: a wheel, installed into a fresh environment outside the
repository, with the repository nowhere on sys.path. It must carry the default model's files
and the sample captions, and claim no import name but `crossmodal`."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: list, cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env={**env, "CROSSMODAL_DEVICE": "cpu"},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO], tmp_path)
    wheel = next(dist.glob("crossmodal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("crossmodal/cli.py", "crossmodal/indexer/builder.py", "crossmodal/search/service.py",
                    "crossmodal/ui/app.py", "crossmodal/data/models/crossmodal-lite-4/heads.safetensors",
                    "crossmodal/data/models/crossmodal-lite-4/open_clip_config.json",
                    "crossmodal/data/models/crossmodal-lite-4/hubness_bank.safetensors",
                    "crossmodal/data/models/crossmodal-lite-4/glossary.txt",
                    "crossmodal/data/models/crossmodal-lite-2/heads.safetensors",
                    "crossmodal/data/models/crossmodal-lite-1/heads.safetensors",
                    "crossmodal/data/sample/captions.tsv"):
        assert shipped in names, shipped
    assert {name.split("/")[0] for name in names if not name.startswith("crossmodal-")} == {"crossmodal"}

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp_path).strip())
    # Dependencies (torch and the rest) come from the test environment's site-packages, added as a
    # plain path: its .pth files, the editable install's finder among them, are not run.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([venv / "bin" / "python", "-c", "import sys, crossmodal.indexer.settings as s; "
                 "print(s.DATA_DIR); print(any(p.rstrip('/') == sys.argv[1] for p in sys.path))", REPO], work)
    data_dir, repo_on_path = where.split()
    assert data_dir.startswith(str(site)) and repo_on_path == "False"
    crossmodal = venv / "bin" / "crossmodal"
    run([crossmodal, "demo-data", work / "photos"], work)
    run([crossmodal, "index", work / "photos", "--index-dir", work / "index"], work)
    found = run([crossmodal, "search", "a man with a camera", "-k", "1", "--index-dir", work / "index"], work)
    assert "camera.png" in found
    glossed = run([venv / "bin" / "python", "-c", "from crossmodal.indexer import glossary; "
                   "print(glossary.for_model('crossmodal-lite-4').expand('an okapi'))"], work)
    assert "giraffe" in glossed  # the glossary file and timm's definitions, found from the installed package
