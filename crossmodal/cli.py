"""`crossmodal`: the one command-line entry point (index, search, eval, train, serve, ...).

Each command turns its options into a `Settings` (options win over CROSSMODAL_* variables)
and calls the indexer or the search engine; no logic lives here beyond presentation.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from crossmodal.indexer.settings import Settings, get_settings

app = typer.Typer(help="Cross-modal (text <-> image) search: index a folder of images, then search it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

IndexDir = Annotated[Optional[Path], typer.Option("--index-dir", help="Index directory [env CROSSMODAL_INDEX_DIR].")]
Model = Annotated[Optional[str], typer.Option("--model", help="Encoder: crossmodal-lite, ARCH:TAG or ARCH:FILE.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text.")]


def _settings(**overrides) -> Settings:
    updates = {k: v for k, v in overrides.items() if v is not None}
    return get_settings().model_copy(update=updates)


def shown(text: str) -> str:
    """Text for a terminal: control and format characters (escape sequences a file name can
    carry, bidirectional overrides) written as Python escapes, never sent raw."""
    return "".join(ch if ch.isprintable() or ch in " \n" else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def _echo(text: str) -> None:
    typer.echo(shown(text))


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {shown(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class _ProgressBars:
    """One tqdm bar per build phase (images/s and ETA come from tqdm itself)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.phase = enabled, None, None

    def __call__(self, progress) -> None:
        if not self.enabled:
            return
        if progress.phase != self.phase:
            self.close()
            self.phase = progress.phase
            if progress.total and progress.phase in ("images", "captions"):
                unit = "img" if progress.phase == "images" else "caption"
                self.bar = tqdm(total=progress.total, desc=f"embedding {progress.phase}", unit=unit,
                                dynamic_ncols=True)
        if self.bar is not None:
            self.bar.update(progress.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


Ray = Annotated[Optional[str], typer.Option(
    "--ray", metavar="auto|ADDRESS", help="Embed new images on a Ray cluster: 'auto' (the running one, else a local "
                                        "one) or the head's address [env CROSSMODAL_RAY_ADDRESS].")]
Captions = Annotated[Optional[Path], typer.Option(help="TSV, CSV or JSONL with image and caption columns; "
                                                      "default: captions.tsv/csv/jsonl in the folder.")]


@app.command()
def index(
    collections: Annotated[Optional[list[Path]], typer.Argument(
        help="Folders of images (searched recursively): the index becomes these folders. None: read the "
             "index's folders again.", show_default=False)] = None,
    captions: Captions = None,
    index_dir: IndexDir = None,
    model: Model = None,
    index_type: Annotated[Optional[str], typer.Option(help="Force a FAISS index-factory string, e.g. HNSW32.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    ray: Ray = None,
    json_out: JsonOut = False,
) -> None:
    """Build or update the index of COLLECTIONS (only new or changed files are embedded).

    Photos of folders not named are removed from the index; `crossmodal folders add` adds a folder instead."""
    from crossmodal.indexer.folders import Change

    settings = _settings(index_dir=index_dir, model=model, index_factory=index_type, device=device, ray_address=ray)
    if not collections:
        current = [Path(f["path"]) for f in _served_folders(settings)]
        if not current:
            _fail("the index holds no folder yet: name one (crossmodal index FOLDER)")
        collections = current
    _run_build(settings, Change.replace(collections), captions, json_out)


folders_app = typer.Typer(help="The folders an index holds: list them, add one, remove one, read one again.",
                          no_args_is_help=True)
app.add_typer(folders_app, name="folders")


@folders_app.command("list")
def folders_list(index_dir: IndexDir = None, json_out: JsonOut = False) -> None:
    """The index's folders, with their photo and caption counts."""
    found = _served_folders(_settings(index_dir=index_dir))
    if json_out:
        typer.echo(json.dumps(found, indent=2))
    elif not found:
        _echo("no folder indexed yet: crossmodal index FOLDER")
    for folder in [] if json_out else found:
        _echo(f"{folder['name']:<20} {folder['images']:>8,} photos {folder['captions']:>8,} captions  {folder['path']}")


@folders_app.command("add")
def folders_add(folder: Annotated[Path, typer.Argument(help="Folder of images to add.")], captions: Captions = None,
                index_dir: IndexDir = None, model: Model = None, ray: Ray = None, json_out: JsonOut = False) -> None:
    """Add FOLDER to the index; only it is read, the other folders keep their photos."""
    from crossmodal.indexer.folders import Change

    settings = _settings(index_dir=index_dir, model=model, ray_address=ray)
    current = [Path(f["path"]) for f in _served_folders(settings)]
    _run_build(settings, Change.add(current, folder), captions, json_out)


@folders_app.command("remove")
def folders_remove(folder: Annotated[str, typer.Argument(help="The folder's name (crossmodal folders list) or "
                                                              "path.")],
                   index_dir: IndexDir = None, json_out: JsonOut = False) -> None:
    """Remove a folder and its photos from the index (its files are not touched)."""
    from crossmodal.indexer.folders import Change

    settings = _settings(index_dir=index_dir)
    current, chosen = _folder_named(settings, folder)
    _run_build(settings, _change(Change.remove, current, chosen), None, json_out)


@folders_app.command("rescan")
def folders_rescan(folder: Annotated[str, typer.Argument(help="The folder's name or path.")],
                   captions: Captions = None, index_dir: IndexDir = None, ray: Ray = None,
                   json_out: JsonOut = False) -> None:
    """Read one folder again (new, changed and deleted files); the other folders are kept as they are."""
    from crossmodal.indexer.folders import Change

    settings = _settings(index_dir=index_dir, ray_address=ray)
    current, chosen = _folder_named(settings, folder)
    _run_build(settings, _change(Change.rescan_one, current, chosen), captions, json_out)


def _change(make, current: list[Path], chosen: Path):
    try:
        return make(current, chosen)
    except ValueError as err:
        _fail(str(err))


def _served_folders(settings: Settings) -> list[dict]:
    """The published build's folders with their counts (nothing is loaded but its small files)."""
    from crossmodal.indexer.attributes import Attributes
    from crossmodal.indexer.faiss_index import Manifest, build_dir_for
    from crossmodal.indexer.folders import FolderNames, summaries
    from crossmodal.indexer.store import Store

    store = Store(settings.resolved_database_url())
    build = store.published_build()
    if build is None:
        return []
    build_dir = build_dir_for(settings.index_dir, build.id)
    folders = Manifest.read(build_dir).folders or [[f.id, f.name, f.path] for f in store.folders()]
    table = Attributes.open(build_dir) or Attributes.tabulate(*store.photo_attributes(set(store.image_keys())),
                                                              FolderNames({i: name for i, name, _ in folders}))
    return summaries([tuple(f) for f in folders], table.folder_counts())


def _folder_named(settings: Settings, wanted: str) -> tuple[list[Path], Path]:
    """(the index's folders, the one `wanted` names: by name, else by path)."""
    found = _served_folders(settings)
    match = next((f for f in found if f["name"] == wanted), None) or \
        next((f for f in found if Path(f["path"]) == Path(wanted).expanduser().resolve()), None)
    if match is None:
        _fail(f"no folder {wanted!r} in this index; its folders: {', '.join(f['name'] for f in found) or 'none'}")
    return [Path(f["path"]) for f in found], Path(match["path"])


def _run_build(settings: Settings, change, captions: Path | None, json_out: bool) -> None:
    from crossmodal.indexer.builder import IndexBuilder
    from crossmodal.indexer.store import BuildInProgress

    bars = _ProgressBars(enabled=not json_out)
    try:
        report = IndexBuilder(settings).build(change, captions, progress=bars)
    except (FileNotFoundError, NotADirectoryError, ValueError, BuildInProgress) as err:
        _fail(str(err))
    finally:
        bars.close()
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    if report.model_changed:
        typer.secho(f"model changed from {report.previous_model} to {report.model}: everything was re-embedded",
                    fg=typer.colors.YELLOW)
    if report.unchanged:
        _echo(f"nothing changed: build {report.build_id} stays published in {settings.index_dir} (nothing written)")
    else:
        _echo(f"build {report.build_id} published to {settings.index_dir}")
    _echo(f"  images:   {report.n_images} ({report.n_embedded} embedded, {report.n_reused} reused, "
          f"{report.n_removed} removed), index {report.image_index_type}")
    _echo(f"  captions: {report.n_captions}, index {report.caption_index_type}")
    _echo(f"  time:     {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)")
    if report.captions_for_unknown_images:
        _echo(f"  captions naming images not in the collection: {report.captions_for_unknown_images}")
    for title, items in (("skipped files", report.skipped), ("bad caption rows", report.bad_caption_rows)):
        if items:
            typer.secho(f"  {title}: {len(items)}", fg=typer.colors.YELLOW)
            for item in items[:20]:
                _echo(f"    {item.path}: {item.reason}")
            if len(items) > 20:
                _echo(f"    ... and {len(items) - 20} more (see --json)")


@app.command()
def search(
    text: Annotated[Optional[str], typer.Argument(help="Text query or expression: finds images. Expressions: "
                                                       "'beach +2:sunset -people', 'image:42 -dog' (see README).")]
    = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Image query: finds captions and similar images; "
                                                                  "with TEXT, one more term of the expression.")]
    = None,
    more_like: Annotated[Optional[list[int]], typer.Option("--more-like", help="Image id to find more like "
                                                                             "(repeatable).")] = None,
    less_like: Annotated[Optional[list[int]], typer.Option("--less-like", help="Image id to find fewer like "
                                                                             "(repeatable).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="Results per list.")] = 10,
    offset: Annotated[int, typer.Option(min=0, help="Results to skip (the next page).")] = 0,
    folder: Annotated[Optional[str], typer.Option(help="Only images under this folder of the collection.",
                                                  rich_help_panel="Filters")] = None,
    taken_after: Annotated[Optional[str], typer.Option(help="Taken on or after this date (2023-06-01) or time.",
                                                       rich_help_panel="Filters")] = None,
    taken_before: Annotated[Optional[str], typer.Option(help="Taken on or before this date or time.",
                                                        rich_help_panel="Filters")] = None,
    camera: Annotated[Optional[str], typer.Option(help="Camera maker or model (any case).",
                                                  rich_help_panel="Filters")] = None,
    orientation: Annotated[Optional[str], typer.Option(help="landscape, portrait or square.",
                                                       rich_help_panel="Filters")] = None,
    min_width: Annotated[Optional[int], typer.Option(help="Pixels.", rich_help_panel="Filters")] = None,
    max_width: Annotated[Optional[int], typer.Option(help="Pixels.", rich_help_panel="Filters")] = None,
    min_height: Annotated[Optional[int], typer.Option(help="Pixels.", rich_help_panel="Filters")] = None,
    max_height: Annotated[Optional[int], typer.Option(help="Pixels.", rich_help_panel="Filters")] = None,
    has_captions: Annotated[Optional[bool], typer.Option("--has-captions/--no-captions",
                                                         help="Only images with (or without) captions.",
                                                         rich_help_panel="Filters")] = None,
    sort: Annotated[str, typer.Option(help="relevance, date_desc or date_asc (the --top results by relevance, "
                                           "sorted by date taken).", rich_help_panel="Order")] = "relevance",
    min_score: Annotated[Optional[float], typer.Option(help="Leave out results scoring below this.",
                                                       rich_help_panel="Order")] = None,
    top: Annotated[int, typer.Option(help="With a date sort: how many results by relevance to sort.",
                                     rich_help_panel="Order")] = 100,
    mode: Annotated[str, typer.Option(help="vector, keyword (BM25 over captions and file names) or hybrid "
                                           "(both, fused by reciprocal rank).", rich_help_panel="Order")] = "vector",
    index_dir: IndexDir = None,
    json_out: JsonOut = False,
) -> None:
    """Search the published index with TEXT (a query or an expression), --image FILE, or both;
    narrowed by filters and ordered by relevance or date."""
    from crossmodal.indexer.collection import BadImage, decode_reduced
    from crossmodal.search.engine import NoIndex, NotFound, SearchEngine
    from pydantic import ValidationError

    from crossmodal.search.expressions import MAX_FEEDBACK, parse
    from crossmodal.search.options import SearchOptions, wall_clock
    from crossmodal.search.queries import InvalidQuery

    more_like, less_like = more_like or [], less_like or []
    if max(len(more_like), len(less_like)) > MAX_FEEDBACK:
        _fail(f"at most {MAX_FEEDBACK} --more-like and {MAX_FEEDBACK} --less-like ids", code=2)
    if text is None and image is None and not more_like:
        _fail("give either a TEXT query or --image FILE (or --more-like ID)", code=2)
    settings = _settings(index_dir=index_dir)
    try:
        terms = parse(text, settings.max_query_chars) if text is not None else []
        options = SearchOptions(folder=folder, taken_after=taken_after, taken_before=taken_before, camera=camera,
                                orientation=orientation, min_width=min_width, max_width=max_width,
                                min_height=min_height, max_height=max_height, has_captions=has_captions, sort=sort,
                                min_score=min_score, top=top, mode=mode)
    except InvalidQuery as err:
        _fail(str(err), code=2)
    except ValidationError as err:
        first = {str(e["loc"][0]) if e["loc"] else "": e["msg"] for e in reversed(err.errors())}  # one per option
        _fail("; ".join(f"--{name.replace('_', '-')}: {message}" if name else message
                        for name, message in first.items()), code=2)
    plain = len(terms) == 1 and terms[0].text is not None and terms[0].weight > 0 and not more_like and not less_like
    try:
        engine = SearchEngine(settings)
        query = decode_reduced(image.read_bytes(), settings.max_image_pixels, settings.max_image_pixels) \
            if image is not None else None
        if image is not None and not terms and not more_like and not less_like:
            by_relevance = options.model_copy(update={"sort": "relevance", "mode": "vector"})  # captions' only order
            result = {"query": {"image": str(image)},
                      "captions": engine.captions_by_image(query, k, offset, by_relevance),
                      "images": engine.images_by_image(query, k, offset, options)}
        else:
            uploads = [(1.0, query)] if query is not None else []
            hits = engine.images_by_terms(terms, k, offset, more_like, less_like, uploads, options)
            shown_query = {"text": terms[0].text} if plain and query is None else {
                "terms": [t.__dict__ for t in terms], "image": str(image) if image else None,
                "more_like": more_like, "less_like": less_like}
            result = {"query": shown_query, "images": hits, "captions": []}
    except NoIndex as err:
        _fail(str(err))
    except (NotFound, InvalidQuery) as err:
        _fail(str(err), code=2)
    except (OSError, BadImage) as err:
        _fail(f"cannot read {image}: {err}")
    file = lambda hit: engine.image_file(hit.id)[1]
    if json_out:
        as_dict = lambda hit: {**hit.__dict__, **({"file": str(file(hit))} if hasattr(hit, "path") else {})}
        typer.echo(json.dumps({"query": result["query"], "images": [as_dict(h) for h in result["images"]],
                               "captions": [as_dict(h) for h in result["captions"]]}, indent=2))
        return
    if result["captions"]:
        typer.secho("captions", bold=True)
        for rank, hit in enumerate(result["captions"], 1):
            _echo(f"{rank:>3}. {hit.score:.3f}  {hit.text}  [{hit.image_path}]")
    if result["images"]:
        typer.secho("images", bold=True)
        for rank, hit in enumerate(result["images"], 1):
            caption = f"  \"{hit.captions[0]}\"" if hit.captions else ""
            dated = options.sort != "relevance" and hit.taken_at is not None
            taken = f"  {wall_clock(hit.taken_at):%Y-%m-%d %H:%M}" if dated else ""
            _echo(f"{rank:>3}. {hit.score:.3f}  {file(hit)}  image:{hit.id}{taken}{caption}")
    if not result["images"] and not result["captions"]:
        typer.echo("no results: no indexed image matches the filters" if options.has_filters() or
                   options.min_score is not None else "no results: the index is empty")


@app.command("eval")
def evaluate(
    index_dir: IndexDir = None,
    json_out: JsonOut = False,
    zero_shot: Annotated[bool, typer.Option(
        "--zero-shot", help="Zero-shot classes protocol: one caption per image naming its class "
                            "(a folder like caltech101-dev); prints precision@10 and top-1 per class.")] = False,
    modes: Annotated[bool, typer.Option(
        "--modes", help="Text-to-image Recall@K of each search mode (vector, keyword, hybrid), with the query's "
                        "own caption held out of the keyword index, and with all of its photo's.")] = False,
) -> None:
    """Retrieval quality of the indexed, captioned collection, ranked exactly as the service ranks.

    Default: Recall@1/5/10 both ways (Flickr 1k protocol). --zero-shot: text-to-image precision@10
    over classes and image-to-caption top-1 (zero-shot classification accuracy). --modes: text-to-image
    recall of the vector, keyword and hybrid modes.
    """
    from crossmodal.indexer.evaluate import (evaluate_classes, evaluate_modes, evaluate_published, format_class_table,
                                             format_modes_table, format_table)

    settings = _settings(index_dir=index_dir)
    if zero_shot and modes:
        _fail("--zero-shot and --modes are two protocols: give one", code=2)
    try:
        result = evaluate_classes(settings) if zero_shot else evaluate_modes(settings) if modes \
            else evaluate_published(settings)
    except (RuntimeError, ValueError) as err:
        _fail(str(err))
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    if zero_shot:
        _echo(f"model {result['model']} ({result['text_queries']} text queries), {result['n_images']} images, "
              f"{result['n_classes']} classes (worst first)")
        _echo(format_class_table(result))
        _echo(f"text->image precision@10 (mean over classes): {result['text_to_image_precision_at_10']:.3f}\n"
              f"image->caption top-1: {result['image_to_caption_top1']:.3f}")
        return
    _echo(f"model {result['model']} ({result['text_queries']} text queries), {result['n_images']} images, "
          f"{result['n_captions']} captions")
    _echo(format_modes_table(result) if modes else format_table(result["recall"]))


@app.command()
def check(index_dir: IndexDir = None, json_out: JsonOut = False) -> None:
    """Verify that the published index, the stored embeddings and the database agree (exit 1 if not)."""
    from crossmodal.indexer.check import check_index

    report = check_index(_settings(index_dir=index_dir))
    if json_out:
        typer.echo(json.dumps({"ok": report.ok, **report.__dict__}, indent=2))
    else:
        for warning in report.warnings:
            typer.secho(f"warning: {shown(warning)}", fg=typer.colors.YELLOW)
        for problem in report.problems:
            typer.secho(f"problem: {shown(problem)}", fg=typer.colors.RED)
        if report.ok:
            typer.secho(f"ok: build {report.build_id}, {report.counts.get('images', 0)} images and "
                        f"{report.counts.get('captions', 0)} captions agree across index, embeddings and database",
                        fg=typer.colors.GREEN)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Folder with train/ and dev/ splits (images/ + captions.tsv).")]
    = Path("../shared/datasets/flickr8k"),
    zero_shot: Annotated[Optional[Path], typer.Option(
        help="A zero-shot classes folder (like caltech101-dev) to report on; never trained on. Skipped if absent.")]
    = Path("../shared/datasets/caltech101-dev"),
    cache_dir: Annotated[Path, typer.Option(help="Where frozen tower features are cached.")]
    = Path(".cache/train-features"),
    epochs: int = 10,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; the first seed's heads are saved.")] = "0",
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
) -> None:
    """Train the heads of the offline default model (the current crossmodal-lite version) on Flickr8k."""
    from crossmodal.indexer.encoder import _quiet_model_loading, pick_device
    from crossmodal.indexer.evaluate import format_table
    from crossmodal.indexer.train import TrainConfig, run_training

    if not (data / "train").is_dir() or not (data / "dev").is_dir():
        _fail(f"{data} must contain train/ and dev/ splits")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_model_loading()
    report = run_training(data, cache_dir, [int(s) for s in seeds.split(",")], TrainConfig(epochs=epochs),
                          pick_device(device or get_settings().device),
                          zero_shot_dir=zero_shot if zero_shot and (zero_shot / "captions.tsv").is_file() else None)
    _echo(f"zero-shot label-bridged baseline:\n{format_table(report['label_bridged_baseline'])}")
    for run in report["runs"]:
        _echo(f"seed {run['seed']} ({run['seconds']:.0f} s), heads alone (no bridge, no hubness correction):\n"
              f"{format_table(run['dev_without_hubness'])}\n"
              f"as shipped (bridge fused, hubness correction {run['hubness']}):\n{format_table(run['dev'])}")
        if "zero_shot" in run:
            _echo(f"{zero_shot.name}: text->image precision@10 {run['zero_shot']['text_to_image_precision_at_10']:.3f}, "
                  f"image->caption top-1 {run['zero_shot']['image_to_caption_top1']:.3f}")
    _echo(f"saved {', '.join(report['saved'])} ({report['saved_bytes']} bytes)")


@app.command()
def serve(
    index_dir: IndexDir = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on [env CROSSMODAL_HOST].")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [env CROSSMODAL_PORT].")] = None,
) -> None:
    """Start the search service (FastAPI on uvicorn); API docs at /docs."""
    import uvicorn

    from crossmodal.search.server import raise_open_file_limit, server_config
    from crossmodal.search.service import create_app

    settings = _settings(index_dir=index_dir, host=host, port=port)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _echo(f"serving {settings.index_dir} on http://{settings.host}:{settings.port} (docs at /docs)")
    if settings.host not in LOCAL_HOSTS and not settings.admin_token:
        typer.secho("warning: listening beyond localhost without CROSSMODAL_ADMIN_TOKEN: anyone who can reach "
                    "this port can start rebuilds. Set a token (see SECURITY.md).", fg=typer.colors.YELLOW, err=True)
    _warn_if_exposed(settings.host, "the service", "anyone who reaches it can search")
    raise_open_file_limit()
    uvicorn.Server(server_config(create_app(settings), settings)).run()


@app.command()
def ui(
    api: Annotated[Optional[str], typer.Option(help="URL of the search service [env CROSSMODAL_API_URL].")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address the UI listens on [env CROSSMODAL_UI_HOST].")] = None,
    port: Annotated[Optional[int], typer.Option(help="UI port [env CROSSMODAL_UI_PORT].")] = None,
) -> None:
    """Start the web UI (Streamlit); it talks to a running search service over HTTP."""
    from crossmodal.launch import check_port_free, run_until_interrupted, start_ui

    settings = _settings()
    ui_settings = _ui_settings(api_url=api, ui_host=host, ui_port=port)
    try:
        check_port_free(ui_settings.ui_host, ui_settings.ui_port)
    except RuntimeError as err:
        _fail(str(err))
    _echo(f"UI: http://{ui_settings.ui_host}:{ui_settings.ui_port}  (search service: {ui_settings.api_url})")
    _warn_if_exposed(ui_settings.ui_host, "the UI", "everyone who reaches it can search your photos; rebuilds "
                     "need the admin token typed into its form when the service has one")
    raise typer.Exit(run_until_interrupted([start_ui(ui_settings, settings.max_upload_bytes,
                                                     settings.answered_hosts(ui_settings.ui_host))]))


def _ui_settings(**overrides):
    from crossmodal.ui.settings import get_ui_settings

    return get_ui_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _warn_if_exposed(host: str, what: str, consequence: str) -> None:
    if host not in LOCAL_HOSTS:
        typer.secho(f"warning: {what} listens beyond localhost ({host}): {consequence}. Only the host names in "
                    "CROSSMODAL_ALLOWED_HOSTS are answered. See SECURITY.md.", fg=typer.colors.YELLOW, err=True)


@app.command()
def up(index_dir: IndexDir = None) -> None:
    """Start the search service and the UI together (Ctrl-C stops both)."""
    from crossmodal.launch import check_port_free, run_until_interrupted, start_service, start_ui, wait_for

    settings = _settings(index_dir=index_dir)
    api = f"http://{settings.host}:{settings.port}"
    ui_settings = _ui_settings(api_url=api)
    try:
        check_port_free(settings.host, settings.port)
        check_port_free(ui_settings.ui_host, ui_settings.ui_port)
    except RuntimeError as err:
        _fail(str(err))
    service = start_service(settings.host, settings.port, index_dir)
    interface = start_ui(ui_settings, settings.max_upload_bytes, settings.answered_hosts(ui_settings.ui_host))
    url = f"http://{ui_settings.ui_host}:{ui_settings.ui_port}"
    try:
        wait_for(f"{url}/_stcore/health", interface, timeout=60)
    except (RuntimeError, TimeoutError) as err:
        for process in (service, interface):
            process.terminate()
        _fail(f"the UI did not start: {err}")
    typer.secho(f"\n  Open {url} in your browser  (API {api}, docs at {api}/docs; Ctrl-C stops both)\n",
                fg=typer.colors.GREEN, bold=True)
    raise typer.Exit(run_until_interrupted([service, interface]))


@app.command()
def migrate(index_dir: IndexDir = None) -> None:
    """Bring the metadata database's schema up to date (every command does this on its own when needed)."""
    from crossmodal.indexer.store import SCHEMA_REVISION, create_db_engine, migrate_schema, schema_revision

    url = _settings(index_dir=index_dir).resolved_database_url()
    engine = create_db_engine(url, migrate=False)
    before = schema_revision(engine)
    migrate_schema(engine)
    engine.dispose()
    _echo(f"schema at revision {SCHEMA_REVISION}" + ("" if before == SCHEMA_REVISION
                                                      else f" (upgraded from {before or 'none or 0001'})"))


@app.command("demo-data")
def demo_data(dest: Annotated[Path, typer.Argument(help="Folder to write the sample collection to.")]) -> None:
    """Write the sample collection (scikit-image's photos with our captions) to DEST."""
    from crossmodal.indexer.sample_collection import write_sample_collection

    _echo(f"sample collection written to {write_sample_collection(dest)}")


def main() -> None:
    """The `crossmodal` command: Typer's app, with a database it cannot open reported as one line."""
    from crossmodal.indexer.store import SchemaError

    try:
        app()
    except SchemaError as err:
        typer.secho(f"error: {shown(str(err))}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
