"""Alembic migrations of the metadata database (SQLite and PostgreSQL); `store.migrate` runs them."""
