"""`crossmodal train` end to end on a tiny real split: features, heads, hubness bank, baseline, files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from crossmodal.indexer.hubness import BANK_FILE_NAME, HubnessBank
from crossmodal.indexer.train import VIEWS, TrainConfig, feature_cache_file, run_training
from tests.test_evaluate import _class_folder


def _split(root, sample_source, names):
    (root / "images").mkdir(parents=True)
    rows = [line for line in (sample_source / "captions.tsv").read_text().splitlines()[1:]
            if line.split("\t")[0] in names]
    for name in names:
        shutil.copy(sample_source / name, root / "images" / name)
    (root / "captions.tsv").write_text("image\tcaption\n" + "\n".join(rows) + "\n")


def test_training_writes_heads_bank_and_report_that_load(tmp_path, sample_source):
    names = sorted(p.name for p in sample_source.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    _split(tmp_path / "data" / "train", sample_source, names[:10])
    _split(tmp_path / "data" / "dev", sample_source, names[10:])
    out = tmp_path / "model" / "heads.safetensors"
    classes = _class_folder(tmp_path / "classes", sample_source)
    report = run_training(tmp_path / "data", tmp_path / "cache", [0, 1], TrainConfig(epochs=2, batch_size=8),
                          torch.device("cpu"), out_dir=out.parent, zero_shot_dir=classes)

    cached = np.load(feature_cache_file(tmp_path / "cache", "train", VIEWS))
    assert cached["image"].shape[:2] == (len(VIEWS), 10)  # every view of every training image
    assert not np.allclose(cached["image"][0], cached["image"][1])  # the mirrored view differs
    assert [run["seed"] for run in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert set(run["dev"]) == {"text_to_image", "image_to_text"} and len(run["history"]) == 2
    assert set(report["label_bridged_baseline"]) == {"text_to_image", "image_to_text"}
    bank = HubnessBank.load(out.parent / BANK_FILE_NAME)
    assert bank.text.shape[1] == bank.image.shape[1] == 512 + 384 and bank.k <= len(bank.image)  # heads + bridge
    for run in report["runs"]:  # measured on the zero-shot folder too, never trained on
        assert 0 <= run["zero_shot"]["text_to_image_precision_at_10"] <= 1
        assert 0 < run["zero_shot"]["image_to_caption_top1"] <= 1
    from safetensors.torch import load_file
    heads = load_file(str(out))
    assert {"visual.head.proj.proj.weight", "text.proj.proj.weight", "visual.head.proj.bridge.class_text",
            "visual.head.proj.bridge.center"} <= set(heads)
    assert heads["visual.head.proj.bridge.class_text"].shape == (1000, 384)
    config = json.loads((out.parent / "open_clip_config.json").read_text())
    bridge = config["crossmodal"]["label_bridge"]
    assert bridge["weight"] == TrainConfig().bridge_weight and bridge["temperature"] == TrainConfig().bridge_temperature
    # the training captions the model keeps to tell a familiar text from an unfamiliar one: all of so few
    n_train = len((tmp_path / "data" / "train" / "captions.tsv").read_text().splitlines()) - 1
    assert bridge["unfamiliar"] == {"weight": 0.8, "similarity": [0.45, 0.6], "captions": n_train}
    familiar = heads["visual.head.proj.bridge.familiar.captions"]
    assert familiar.shape == (n_train, 384) and familiar.dtype == torch.float16
    np.testing.assert_allclose(familiar.float().norm(dim=1).numpy(), 1.0, atol=1e-3)
    glossary_file = out.parent / config["crossmodal"]["glossary"]  # the training captions' words are the known ones
    train_words = " ".join(line.split("\t")[1] for line in
                           (tmp_path / "data" / "train" / "captions.tsv").read_text().splitlines()[1:]).lower()
    glossed = glossary_file.read_text().splitlines()
    assert "okapi" in glossed and not [p for p in glossed if p.isalpha() and p in train_words.split()]
    np.testing.assert_allclose(np.linalg.norm(bank.text, axis=1), 1.0, atol=1e-2)
    saved = json.loads((out.parent / "training_report.json").read_text())
    assert saved["saved_bytes"] == sum(f.stat().st_size for f in (out, out.parent / BANK_FILE_NAME, glossary_file))
