"""The text tower exported to ONNX once, so a text query needs neither torch nor open_clip (issue 18).

A one-shot `crossmodal search` spent about 6 of its 8 s importing torch and open_clip and loading
the towers; ONNX Runtime loads the exported text tower in a fraction of a second. The indexer
exports it whenever a build finds none for its model (it has the model at hand, or loads it once),
into `text_towers/` in the index directory, and search uses it where it exists. Nothing here
imports torch at module level: `export` (the indexer's side) imports it when called.

Files per model, named by a key of the model name, the torch version it was exported with, and,
for a local checkpoint, that file's size and modification time (a model's name pins its weights
otherwise: crossmodal-lite versions and open_clip tags never change):

    KEY.onnx              tokens [batch, length] int64 -> unnormalised text vectors [batch, dim]
    KEY.int8.onnx         the same with int8 weights: the query tower searches use by default
    KEY.tokenizer.json    the Hugging Face fast tokenizer the tower was trained with
    KEY.json              model name, dim, context length, pad token id, and what became of int8

The int8 query tower (onnx_towers.quantize_query_tower) costs a text query 3.4 instead of 5.5 ms of
CPU, about half of what a search cost the service; it is checked against float32 on typical
queries when written, and refused (recorded in KEY.json) below QUERY_INT8_AGREEMENT. Only queries
use it: the captions a build indexes are the model's own vectors (Settings.text_query_precision).

Only towers with a Hugging Face tokenizer are exported (crossmodal-lite's MiniLM; its tokens are
reproduced here with `tokenizers`, the same Rust library transformers runs). open_clip's own BPE
towers keep loading the model; so does any tower whose export fails or disagrees with it.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crossmodal.indexer import glossary
from crossmodal.indexer.glossary import Glossary
from crossmodal.indexer.model_names import ModelSpec, default_model_version, split_variant

if TYPE_CHECKING:
    from crossmodal.indexer.encoder import Encoder

log = logging.getLogger(__name__)

FOLDER = "text_towers"
AGREEMENT = 1e-4  # largest difference allowed between the export's vectors and the model's
QUERY_PRECISIONS = ("int8", "float32")
QUERY_INT8_AGREEMENT = 0.99  # least cosine of the int8 query tower to float32 on QUERY_PROBE (0.9943 seen)
QUERY_PROBE = ["a dog", "two dogs play in the snow beside a red fence while a man watches them",
               "a child in a pink dress climbs the stairs", "a red car parked on a city street at night",
               "people sitting at a table in a restaurant", "a bowl of soup", "an airplane in a blue sky",
               "a man rides a bicycle down a dirt road", "sunset over the ocean", "a cat sleeping on a sofa",
               "a black and white photo of an old building", "Two   DOGS &amp; a “cat”", "x" * 300]


def key(model: str, torch_version: str) -> str:
    """The files' name for `model` as exported by `torch_version` (and, for a compressed variant, quantized
    by the installed ONNX Runtime: onnx_towers.py)."""
    parts = [model, torch_version]
    base, variant = split_variant(model)
    if default_model_version(base) is None:
        checkpoint = ModelSpec.parse(base).pretrained
        if checkpoint and os.path.isfile(checkpoint):
            stat = os.stat(checkpoint)
            parts += [str(stat.st_size), str(stat.st_mtime_ns)]
    if variant:
        parts.append(_installed("onnxruntime") or "")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _installed(package: str) -> str | None:
    """A package's version without importing it (its metadata), None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def installed_torch_version() -> str | None:
    """torch's version without importing it (the package metadata), None where it is not installed."""
    return _installed("torch")


def clean(text: str) -> str:
    """open_clip's HFTokenizer cleaning ('whitespace'): ftfy, HTML entities, collapsed whitespace."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split())


@dataclass
class OnnxTextEncoder:
    """Encodes texts as `Encoder.encode_texts` does (normalised float32 rows), with ONNX Runtime."""

    name: str
    dim: int
    session: object  # onnxruntime.InferenceSession
    tokenizer: object  # tokenizers.Tokenizer, truncating at the context length, no padding
    pad_id: int
    precision: str = "float32"  # of the tower's weights: "int8" for the query tower (QUERY_PRECISIONS)
    glossary: Glossary | None = None  # the model's (glossary.py): texts are glossed as its tokenizer does

    def __post_init__(self) -> None:
        # float32 passes take both cores, one at a time; int8 ones run alone, one core each, side by side
        self.lock = threading.Lock() if self.shares_passes else contextlib.nullcontext()

    @property
    def shares_passes(self) -> bool:
        """Whether texts may share a pass. Not with int8: its activations get one scale per pass, so a text's
        vector would depend on the texts beside it (cosine 0.991 between alone and in 16, as far as int8
        from float32), and a query's results on the load. Alone, int8 still costs 3.4 against float32's
        5.5 ms of CPU a query in shared passes."""
        return self.precision != "int8"

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens padded to the longest text (the tower masks padding: the vectors are those of full padding)."""
        texts = self.glossary.expand_all(list(texts)) if self.glossary else texts
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch([clean(t) for t in texts])]
        tokens = np.full((len(ids), max(len(i) for i in ids)), self.pad_id, dtype=np.int64)
        for row, values in enumerate(ids):
            tokens[row, :len(values)] = values
        return tokens

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batch_size = batch_size if self.shares_passes else 1
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            with self.lock:
                vectors = self.session.run(None, {"tokens": self.tokenize([texts[i] for i in rows])})[0]
            out[rows] = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return out


def load(index_dir: Path, model: str, precision: str = "float32") -> OnnxTextEncoder | None:
    """The exported text tower of `model`, where the indexer has written one for this torch; else None.
    `precision` "int8": the int8 query tower, where one was written (else float32)."""
    torch_version = installed_torch_version()
    if torch_version is None:
        return None
    base = index_dir / FOLDER / key(model, torch_version)
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        import onnxruntime  # noqa: F401 (where it is missing, the model answers)
        from tokenizers import Tokenizer
    except (OSError, ValueError, ImportError):
        return None
    int8 = base.parent / meta.get("int8", {}).get("file", "-")
    used = "int8" if precision == "int8" and int8.is_file() else "float32"
    session = inference_session(int8, threads=1) if used == "int8" else inference_session(base.with_suffix(".onnx"))
    tokenizer = Tokenizer.from_file(str(base.with_suffix(".tokenizer.json")))
    tokenizer.enable_truncation(meta["context_length"])
    tokenizer.no_padding()
    return OnnxTextEncoder(meta["model"], meta["dim"], session, tokenizer, meta["pad_id"], used,
                           glossary.for_model(meta["model"]))


def quantize_queries(index_dir: Path, model: str) -> None:
    """Write the int8 query tower beside `model`'s exported one, once: a later call (each build's) only
    reads KEY.json, which records the file or why it was refused. Needs no model, only the export."""
    base = index_dir / FOLDER / key(model, installed_torch_version() or "")
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return  # not exported
    if "int8" in meta:
        return
    from crossmodal.indexer import onnx_towers

    target = base.with_name(f"{base.name}.int8.onnx")
    partial = base.with_name(f"{base.name}.{os.getpid()}.partial.int8.onnx")
    try:
        onnx_towers.quantize_query_tower(base.with_suffix(".onnx"), partial)
        float32 = load(index_dir, model)
        int8 = replace(float32, session=inference_session(partial, threads=1), precision="int8")
        least = float((float32.encode_texts(QUERY_PROBE) * int8.encode_texts(QUERY_PROBE)).sum(1).min())
        if not least >= QUERY_INT8_AGREEMENT:
            raise ValueError(f"its vectors stray from float32's (least cosine {least:.4f} < {QUERY_INT8_AGREEMENT})")
        os.replace(partial, target)
        meta["int8"] = {"file": target.name, "least_cosine": round(least, 4)}
    except (ValueError, onnx_towers.VariantUnavailable) as err:  # refused for good: recorded, not retried
        log.warning("no int8 query tower for %s (%s); text queries use float32", model, err)
        meta["int8"] = {"refused": str(err)}
    except Exception as err:  # e.g. a full disk: tried again by the next build
        log.warning("the int8 query tower of %s was not written (%s: %s)", model, type(err).__name__, err)
        return
    finally:
        partial.unlink(missing_ok=True)
    _write_json(base.with_suffix(".json"), meta)


def _write_json(path: Path, value: dict) -> None:
    """Whole or not at all: KEY.json marks an export complete, and searches read it at any moment."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def inference_session(path: Path, threads: int = 0):
    """An ONNX Runtime session on the CPU, as every exported tower is run; `threads` per pass (0: a core each)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # Idle inference threads spin by default: under load they took the cores that search and the other
    # requests needed (100k vectors, 32 clients: 97.1 QPS spinning, against 117.9 with the torch tower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exported(index_dir: Path, model: str) -> bool:
    """Whether `model`'s text tower is exported for this torch (checked without loading it)."""
    torch_version = installed_torch_version()
    return torch_version is not None and (index_dir / FOLDER / f"{key(model, torch_version)}.json").is_file()


def export_tower(tower, example, path: Path, input_name: str) -> None:
    """`tower` as an ONNX graph taking `input_name` [batch, ...] (and, for tokens, any length) to `vectors`."""
    import torch

    axes = {0: "batch", 1: "length"} if input_name == "tokens" else {0: "batch"}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused attention has no ONNX form (open_clip's ViTs use it)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shapes: each caller checks the export on other shapes
            torch.onnx.export(tower.eval(), (example,), str(path), input_names=[input_name], output_names=["vectors"],
                              dynamo=False, dynamic_axes={input_name: axes, "vectors": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export(encoder: Encoder, index_dir: Path) -> bool:
    """Write `encoder`'s text tower for `load`, once, then its int8 query tower; True when the files are
    there. A tower that cannot be exported, or whose export disagrees with the model on a probe, is left
    to the model. (A tower exported already gets its int8 copy from `quantize_queries` alone: builder.py.)"""
    import torch

    from crossmodal.indexer.encoder import SHAPE_CHECK, _TextTower

    hf = getattr(encoder.tokenizer, "tokenizer", None)
    fast = getattr(hf, "backend_tokenizer", None)
    if fast is None or getattr(encoder.tokenizer, "strip_sep_token", False) or \
            getattr(encoder.tokenizer, "tokenizer_mode", "") or not encoder.trims_padding:
        return False
    base = index_dir / FOLDER / key(encoder.name, installed_torch_version() or torch.__version__)
    if base.with_suffix(".json").is_file():
        return True
    base.parent.mkdir(parents=True, exist_ok=True)
    partial = base.with_name(base.name + f".{os.getpid()}.partial.onnx")
    try:
        if encoder.towers is not None and encoder.towers.text_file:  # a compressed variant (onnx_towers.py): its tower
            shutil.copyfile(encoder.towers.text_file, partial)
        else:
            export_tower(_TextTower(encoder.model), encoder.tokenize(SHAPE_CHECK).cpu(), partial, "tokens")
        base.with_suffix(".tokenizer.json").write_text(fast.to_str())
        meta = {"model": encoder.name, "dim": encoder.dim, "context_length": encoder.tokenizer.context_length,
                "pad_id": int(hf.pad_token_id or 0)}
        os.replace(partial, base.with_suffix(".onnx"))
        _write_json(base.with_suffix(".json"), meta)  # last: it marks the export complete
        exported = load(index_dir, encoder.name)
        probe = ["a", *SHAPE_CHECK, "  Two   DOGS &amp; a “cat”  " + "very long " * 60, "an okapi beside a gerenuk"]
        if exported is None or np.abs(exported.encode_texts(probe) - encoder.encode_texts(probe)).max() > AGREEMENT:
            raise ValueError("the exported tower disagrees with the model")
    except Exception as err:  # any failure: search keeps loading the model
        log.warning("the text tower of %s was not exported to ONNX (%s: %s); text queries load the model",
                    encoder.name, type(err).__name__, err)
        for suffix in (".json", ".onnx", ".tokenizer.json"):
            base.with_suffix(suffix).unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        return False
    quantize_queries(index_dir, encoder.name)
    return True
