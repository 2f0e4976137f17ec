"""Pick the queue and store backends by name (cloud.queue_backend / cloud.store_backend).

An explicit table of lazy imports: the embedded default pulls in nothing but sqlite3, and the
Redis/PostgreSQL backends are imported only when named, so an ingest on SQLite never imports
redis or psycopg. Each row also says which config keys the backend reads, so callers pass the
``[cloud]`` section and never know which backend needs a path and which a URL.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekeeper.cloud.queue.base import EventQueue
from edgekeeper.cloud.store.base import Store
from edgekeeper.config import CloudSection
from edgekeeper.errors import ConfigError

Options = Callable[[Path, CloudSection], dict[str, Any]]


@dataclass(frozen=True)
class Backend:
    module: str
    cls: str
    # (data_dir, [cloud] section) -> keyword arguments of the class's ``open``.
    options: Options


def _file(name: str) -> Options:
    return lambda data_dir, _section: {"path": Path(data_dir) / name}


def _redis(_data_dir: Path, section: CloudSection) -> dict[str, Any]:
    return {"url": section.redis_url, "prefix": section.redis_prefix,
            "fsync_check": section.redis_fsync_check}


def _postgres(_data_dir: Path, section: CloudSection) -> dict[str, Any]:
    return {"dsn": section.postgres_dsn, "pool_size": section.postgres_pool_size}


QUEUE_BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("edgekeeper.cloud.queue.sqlite", "SQLiteQueue", _file("queue.sqlite")),
    "redis": Backend("edgekeeper.cloud.queue.redis_streams", "RedisStreamsQueue", _redis),
}
STORE_BACKENDS: dict[str, Backend] = {
    "sqlite": Backend("edgekeeper.cloud.store.sqlite", "SQLiteStore", _file("store.sqlite")),
    "postgres": Backend("edgekeeper.cloud.store.postgres", "PostgresStore", _postgres),
}


def _resolve(
    table: dict[str, Backend], name: str, key: str, data_dir: Path,
    section: CloudSection | None, overrides: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    try:
        backend = table[name]
    except KeyError:
        raise ConfigError(
            f"cloud.{key} = {name!r} is not a known backend",
            fix=f"use one of: {', '.join(sorted(table))}",
        ) from None
    try:
        module = importlib.import_module(backend.module)
    except ImportError as err:  # redis / psycopg are in the [cloud] extra
        raise ConfigError(
            f"cloud.{key} = {name!r} needs a package that is not installed ({err.name})",
            fix="pip install 'edgekeeper[cloud]'",
        ) from None
    options = backend.options(Path(data_dir), section or CloudSection())
    options.update(overrides)
    return getattr(module, backend.cls), options


async def open_queue(
    name: str, data_dir: Path, *, max_attempts: int = 5, section: CloudSection | None = None,
    **overrides: Any,
) -> EventQueue:
    """Open the queue backend ``name``; connection settings come from ``section`` (defaults
    when None), and ``overrides`` replace single options (tests: a fresh Redis key prefix)."""
    cls, options = _resolve(QUEUE_BACKENDS, name, "queue_backend", data_dir, section, overrides)
    queue: EventQueue = await cls.open(max_attempts=max_attempts, **options)
    return queue


async def open_store(
    name: str, data_dir: Path, *, section: CloudSection | None = None, **overrides: Any
) -> Store:
    """Open the store backend ``name``; see ``open_queue`` for ``section`` and ``overrides``."""
    cls, options = _resolve(STORE_BACKENDS, name, "store_backend", data_dir, section, overrides)
    store: Store = await cls.open(**options)
    return store
