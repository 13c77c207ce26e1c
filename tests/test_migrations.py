"""Schema revisions: a new database is created at head, a wave-1 database is upgraded in place."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from crossmodal.cli import app
from crossmodal.indexer import store as store_module
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.settings import get_settings
from crossmodal.indexer.store import (SCHEMA_REVISION, Base, CaptionRow, SchemaError, Store, caption_key,
                                      create_db_engine, described_by_models, schema_revision)
from crossmodal.search.engine import SearchEngine
from tests.conftest import BOTH_DATABASES, free_port

DATABASES = BOTH_DATABASES


def alembic_config(connection=None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(store_module.__file__).with_name("migrations")))
    config.attributes["connection"] = connection
    return config


def back_to_wave_one(url: str) -> None:
    """Turn a database into what wave 1 wrote: revision 0001's tables and no alembic_version."""
    engine = create_db_engine(url, migrate=False)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
        connection.execute(text("DROP TABLE alembic_version"))
    with engine.connect() as connection:
        assert "key" not in {c["name"] for c in inspect(connection).get_columns("captions")}
        assert not inspect(connection).has_table("jobs")
    engine.dispose()


def test_the_revision_checked_at_open_is_the_newest_migration():
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_REVISION


def test_a_new_database_is_created_at_head_exactly_as_the_models_say(database):
    store = Store(database)
    assert schema_revision(store.engine) == SCHEMA_REVISION
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_name": described_by_models})
        assert compare_metadata(context, Base.metadata) == []
        assert store.keyword_search("anything", 5) == []  # the keyword index exists, empty
    store.close()


def test_a_wave_one_index_is_upgraded_in_place_by_serve_and_by_index(indexed, encoder, collection):
    url = indexed.resolved_database_url()
    before = SearchEngine(indexed, encoder=encoder).images_by_text("a man with a camera", k=3)
    back_to_wave_one(url)

    engine = SearchEngine(indexed, encoder=encoder)  # what `crossmodal serve` opens
    assert [h.path for h in engine.images_by_text("a man with a camera", k=3)] == [h.path for h in before]
    assert schema_revision(engine.store.engine) == SCHEMA_REVISION
    with engine.store.session() as s:
        rows = s.execute(select(CaptionRow.text, CaptionRow.key)).all()
    assert rows and all(key == caption_key(text) for text, key in rows)
    engine.store.close()

    back_to_wave_one(url)
    report = IndexBuilder(indexed, encoder=encoder).build(collection)  # what `crossmodal index` runs
    assert report.n_embedded == 0 and report.n_images == 18  # nothing embedded again
    assert schema_revision(Store(url).engine) == SCHEMA_REVISION


@pytest.fixture
def cli_database(settings, monkeypatch):
    """The CLI, run in this process, on the test's database (its settings are read once and cached)."""
    monkeypatch.setenv("CROSSMODAL_DATABASE_URL", settings.resolved_database_url())
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_a_database_from_a_newer_version_is_a_clear_error(cli_database):
    settings = cli_database
    url = settings.resolved_database_url()
    store = Store(url)
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with pytest.raises(SchemaError, match="newer crossmodal"):
        Store(url)
    result = subprocess.run([sys.executable, "-m", "crossmodal.cli", "index", str(settings.index_dir)],
                            capture_output=True, text=True, env={**os.environ, "CROSSMODAL_DATABASE_URL": url})
    assert result.returncode == 1 and "newer crossmodal" in result.stderr and "Traceback" not in result.stderr
    # The service opens the database before its port (the model loads behind the port), so it stops too.
    served = subprocess.run([sys.executable, "-m", "crossmodal.cli", "serve", "--index-dir", str(settings.index_dir),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CROSSMODAL_DATABASE_URL": url})
    assert served.returncode != 0 and "newer crossmodal" in served.stderr


def test_migrate_command_reports_the_revision(cli_database):
    settings = cli_database
    result = CliRunner().invoke(app, ["migrate", "--index-dir", str(settings.index_dir)])
    assert result.exit_code == 0 and f"revision {SCHEMA_REVISION}" in result.output
    assert "upgraded from" in result.output
    again = CliRunner().invoke(app, ["migrate", "--index-dir", str(settings.index_dir)])
    assert again.exit_code == 0 and "upgraded" not in again.output
