"""The fake Messages API (tests/fake_anthropic.py) as a long-running process for the fleet
simulator (bench/fleet.py):

    python tests/fleet_provider.py --latency 0.5 --url-file PATH

It answers as the fake does (the same request checks, the same replies), after ``--latency``
seconds, but keeps no request bodies: the fake records every request for the tests to inspect,
which over a fleet run (thousands of events, each with its frames) would grow without bound.
``GET /stats`` answers how many requests came and how many are being answered right now, so the
simulator can plot the provider's load beside the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_anthropic import FakeAnthropic, until_signalled


class _Counted(list):  # type: ignore[type-arg]
    """A list that counts what is appended and keeps only the last few (the fake's
    ``requests``: its length numbers the next request)."""

    def __init__(self, keep: int = 8) -> None:
        super().__init__()
        self.total = 0
        self.keep = keep

    def append(self, item: Any) -> None:
        self.total += 1
        super().append(item)
        if super().__len__() > self.keep:
            del self[0]

    def __len__(self) -> int:
        return self.total


class FleetProvider(FakeAnthropic):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests = _Counted()
        self.in_flight = 0
        self.answered_total = 0

    async def _messages(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            return await super()._messages(request)
        finally:
            self.in_flight -= 1
            self.answered_total += 1

    async def start(self) -> str:
        url = await super().start()
        # A second little server for /stats: the fake's app is built inside its start().
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        self._stats_runner = web.AppRunner(app, access_log=None)
        await self._stats_runner.setup()
        site = web.TCPSite(self._stats_runner, "127.0.0.1", 0)
        await site.start()
        self.stats_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return url

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests.total, "in_flight": self.in_flight,
                                  "answered": self.answered_total})

    async def stop(self) -> None:
        await self._stats_runner.cleanup()
        await super().stop()


async def serve(latency: float, url_file: Path) -> None:
    fake = FleetProvider(latency_s=latency)
    url = await fake.start()
    tmp = url_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "stats": f"http://127.0.0.1:{fake.stats_port}"}))
    tmp.replace(url_file)  # whole or absent: the simulator polls for it
    await until_signalled(fake)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.5, help="seconds before each answer")
    p.add_argument("--url-file", type=Path, required=True,
                   help="where to write {url, stats} once listening")
    a = p.parse_args()
    asyncio.run(serve(a.latency, a.url_file))


if __name__ == "__main__":
    main()
