"""Device subcommands: run, replay, record."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # Filled in by the device runtime (run / replay / record).
    return None
