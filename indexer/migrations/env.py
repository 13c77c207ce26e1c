"""Alembic's entry point: run by `store.migrate` with an open connection (`config.attributes`).

A developer adding a revision runs, from the repository root:
    alembic -c indexer/migrations/alembic.ini revision --autogenerate -m "what changed"
against a database at head (CROSSMODAL_DATABASE_URL or the default index's metadata.db).
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from crossmodal.indexer.store import Base, described_by_models

config = context.config


def run(connection: Connection) -> None:
    # Batch mode: SQLite alters a table by copying it, which plain ALTER cannot do.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      transaction_per_migration=True, include_name=described_by_models)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:  # the `alembic` command line
    from crossmodal.indexer.settings import Settings
    from crossmodal.indexer.store import create_db_engine

    engine = create_db_engine(Settings().resolved_database_url(), migrate=False)
    with engine.connect() as connection:
        run(connection)
