"""Pick the queue and store backends by name (cloud.queue_backend / cloud.store_backend).

An explicit table of lazy imports: the embedded default pulls in nothing but sqlite3, and the
Redis/PostgreSQL backends (next issue) add a row here without the others importing redis or
psycopg.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edgekeeper.cloud.queue.base import EventQueue
from edgekeeper.cloud.store.base import Store
from edgekeeper.errors import ConfigError

# name -> (module, class, file name under the data dir for file-based backends)
QUEUE_BACKENDS: dict[str, tuple[str, str, str]] = {
    "sqlite": ("edgekeeper.cloud.queue.sqlite", "SQLiteQueue", "queue.sqlite"),
}
STORE_BACKENDS: dict[str, tuple[str, str, str]] = {
    "sqlite": ("edgekeeper.cloud.store.sqlite", "SQLiteStore", "store.sqlite"),
}


def _cls(table: dict[str, tuple[str, str, str]], name: str, key: str) -> tuple[Any, str]:
    try:
        module, cls, filename = table[name]
    except KeyError:
        raise ConfigError(
            f"cloud.{key} = {name!r} is not a known backend",
            fix=f"use one of: {', '.join(sorted(table))}",
        ) from None
    return getattr(importlib.import_module(module), cls), filename


async def open_queue(
    name: str, data_dir: Path, *, max_attempts: int = 5, **kwargs: Any
) -> EventQueue:
    cls, filename = _cls(QUEUE_BACKENDS, name, "queue_backend")
    queue: EventQueue = await cls.open(Path(data_dir) / filename, max_attempts=max_attempts,
                                       **kwargs)
    return queue


async def open_store(name: str, data_dir: Path) -> Store:
    cls, filename = _cls(STORE_BACKENDS, name, "store_backend")
    store: Store = await cls.open(Path(data_dir) / filename)
    return store
