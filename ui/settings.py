"""The UI's own settings: where it listens and which search service it talks to.

Read from the same `CROSSMODAL_*` environment as the service's settings, but owned here:
the UI imports nothing from the indexer or the search engine, only its HTTP client.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class UISettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CROSSMODAL_", env_file=None, extra="ignore")

    ui_host: str = "127.0.0.1"
    ui_port: int = 8501
    api_url: str = "http://127.0.0.1:8000"  # the search service, reached over HTTP only


@lru_cache(maxsize=1)
def get_ui_settings() -> UISettings:
    return UISettings()
