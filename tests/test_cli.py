"""The `crossmodal` command as a user runs it: index, search (text and image, text and JSON), eval."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from crossmodal.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_index_search_eval_round_trip(tmp_path, collection):
    index_dir = tmp_path / "idx"
    code, out = run("index", collection, "--index-dir", index_dir, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["n_images"] == 18 and report["n_captions"] == 22

    code, out = run("search", "a man with a camera", "-k", "3", "--index-dir", index_dir, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["images"][0]["path"] == "camera.png" and len(result["images"]) == 3
    assert result["images"][0]["file"].endswith("camera.png") and result["images"][0]["captions"]

    code, out = run("search", "--image", collection / "horse.png", "--index-dir", index_dir)
    assert code == 0, out
    assert out.index("captions") < out.index("images")
    first_caption = out.splitlines()[1]
    assert "[horse.png]" in first_caption

    code, out = run("eval", "--index-dir", index_dir, "--json")
    assert code == 0, out
    recall = json.loads(out)["recall"]
    assert recall["text_to_image"]["R@10"] >= recall["text_to_image"]["R@1"] > 0

    code, out = run("index", collection, "--index-dir", index_dir)
    assert code == 0 and "0 embedded, 18 reused" in out


def test_user_errors_are_messages_not_tracebacks(tmp_path):
    code, out = run("search", "x", "--index-dir", tmp_path / "empty")
    assert code == 1 and "no published index" in out
    code, out = run("search", "--index-dir", tmp_path)
    assert code == 2 and "either a TEXT query or --image" in out
    code, out = run("index", tmp_path / "missing", "--index-dir", tmp_path / "idx")
    assert code == 1 and "collection folder not found" in out
    code, out = run("eval", "--index-dir", tmp_path / "empty")
    assert code == 1 and "no published index" in out


def test_a_model_without_weights_is_refused_before_any_work(tmp_path, collection):
    code, out = run("index", collection, "--index-dir", tmp_path / "idx", "--model", "RN50")
    assert code == 1 and "architecture without weights" in out and "RN50:" in out
    assert not (tmp_path / "idx" / "builds").exists()  # no build was started


def test_file_names_never_reach_the_terminal_as_escape_sequences(tmp_path, collection):
    (collection / "generated" / "red.png").rename(collection / "evil\x1b[2J\x1b]0;pwned\x07.png")
    index_dir = tmp_path / "idx"
    code, out = run("index", collection, "--index-dir", index_dir)
    assert code == 0, out
    code, out = run("search", "a red square", "-k", "18", "--index-dir", index_dir)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07.png" in out  # shown, escaped


def test_a_query_of_invisible_characters_is_refused(tmp_path):
    code, out = run("search", "\u200b\u200d \u2060", "--index-dir", tmp_path / "empty")
    assert code == 2 and "no visible characters" in out


def test_an_unchanged_re_run_imports_no_model(tmp_path, collection):
    """Nothing new to embed: the re-run imports neither torch nor open_clip (seconds saved per run)."""
    import subprocess
    import sys

    index_dir = tmp_path / "idx"
    assert run("index", collection, "--index-dir", index_dir)[0] == 0
    script = ("import sys\nfrom crossmodal.cli import app\n"
              f"try:\n    app(['index', {str(collection)!r}, '--index-dir', {str(index_dir)!r}])\n"
              "except SystemExit as done:\n    assert not done.code, done.code\n"
              "print('imported:', [m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 embedded, 18 reused" in done.stdout and "imported: []" in done.stdout, done.stdout
