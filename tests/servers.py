"""Real Redis and PostgreSQL servers for the tests, found or started by the harness (and a
Mosquitto broker for tests/test_mqtt.py: ``start_mosquitto`` at the end of this file).

Which server a test run uses, in order:

1. ``EDGEKEEPER_TEST_REDIS_URL`` / ``EDGEKEEPER_TEST_POSTGRES_DSN`` when set (a DSN of a server
   where the tests may create and drop databases). ``EDGEKEEPER_TEST_START_SERVERS=1`` skips
   step 2 (to check, on a machine that has them running, what a fresh CI machine does).
2. The usual local one (127.0.0.1:6379 / 127.0.0.1:5432 as user postgres) when it answers. For
   Redis only if it runs as the deployment must (``appendonly yes``, ``appendfsync always``):
   the queue refuses a non-durable Redis by default, and the tests should exercise the real
   configuration, not a weakened one; we never CONFIG SET someone else's server.
3. Otherwise one started here, in a temporary directory, on a free port of 127.0.0.1:
   ``redis-server --save "" --appendonly yes --appendfsync always``, and a PostgreSQL cluster
   made by Debian's ``initdb`` and run by ``pg_ctl`` (as the ``postgres`` user when we are root,
   since PostgreSQL refuses to run as root), unix socket in the same directory. Both are stopped
   and removed at the end of the session.

Isolation: each test gets a fresh Redis key prefix (deleted afterwards) and a fresh PostgreSQL
database (dropped afterwards), so tests never see each other's data even on a shared server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

USUAL_REDIS = "redis://127.0.0.1:6379/0"
USUAL_POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
MISSING_FIX = "install it (bash scripts/test does: apt-get install redis-server postgresql)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as err:
            last = err
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (last error: {last})")


def _launch(argv: list[str], logfile: Path, answers: Callable[[], bool],
            what: str) -> subprocess.Popen[bytes]:
    """Start a server we own, its output appended to ``logfile``; wait until it answers (a
    server that exits first fails with the end of its log)."""
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(logfile.read_text(errors="replace")[-2000:])
        return answers()

    _wait(up, what)
    return proc


# --- Redis ----------------------------------------------------------------------------------


@dataclass
class RedisServer:
    url: str
    started: bool = False
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    argv: list[str] = field(default_factory=list)

    def launch(self) -> None:
        """Start (or restart, same port and directory) a server we own; wait for PING."""
        assert self.argv and self.workdir is not None, "not a server we started"
        self.proc = _launch(self.argv, self.workdir / "redis.log", self.ping,
                            f"redis-server {self.url}")

    def kill(self) -> None:
        """SIGKILL: a crash. Its files stay for ``launch()`` to start again from."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=3)

    def ping(self) -> bool:
        with contextlib.closing(self.client()) as client:
            return bool(client.ping())

    def durable(self) -> bool:
        with contextlib.closing(self.client()) as client:
            cfg = client.config_get("append*")
        return cfg.get(b"appendonly") == b"yes" and cfg.get(b"appendfsync") == b"always"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(*, durable: bool = True, extra: tuple[str, ...] = ()) -> RedisServer:
    """A redis-server of our own on a free port (``durable=False``: appendfsync everysec, to
    test that the queue refuses it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(f"redis-server is not installed; {MISSING_FIX}")
    workdir = Path(tempfile.mkdtemp(prefix="ek-redis-"))
    port = free_port()
    fsync = ["--appendonly", "yes", "--appendfsync", "always"] if durable else [
        "--appendonly", "no", "--appendfsync", "everysec"]
    server = RedisServer(
        f"redis://127.0.0.1:{port}/0", started=True, workdir=workdir,
        argv=[binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *fsync,
              "--dir", str(workdir), "--daemonize", "no", *extra],
    )
    try:
        server.launch()
    except BaseException:
        server.stop()
        raise
    return server


def find_or_start_redis() -> RedisServer:
    url = os.environ.get("EDGEKEEPER_TEST_REDIS_URL")
    if url:
        return RedisServer(url)
    if os.environ.get("EDGEKEEPER_TEST_START_SERVERS") == "1":
        return start_redis()
    usual = RedisServer(USUAL_REDIS)
    with contextlib.suppress(Exception):
        if usual.ping() and usual.durable():
            return usual
    return start_redis()


def delete_prefix(server: RedisServer, prefix: str) -> None:
    client = server.client()
    try:
        keys = list(client.scan_iter(match="{" + prefix + "}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- PostgreSQL -----------------------------------------------------------------------------


@dataclass
class PostgresServer:
    # libpq keyword DSN without dbname: host=... port=... user=...
    base: str
    started: bool = False
    workdir: Path | None = None
    bindir: Path | None = None
    databases: list[str] = field(default_factory=list)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"{self.base} dbname={dbname}"

    def url(self, dbname: str) -> str:
        """The same as a postgresql:// URL (what a user writes in cloud.postgres_dsn)."""
        parts = dict(p.split("=", 1) for p in self.base.split())
        return (f"postgresql://{parts.get('user', 'postgres')}@{parts.get('host', '127.0.0.1')}"
                f":{parts.get('port', '5432')}/{dbname}")

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn(), autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        name = f"ektest_{uuid.uuid4().hex[:16]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.started and self.workdir is not None and self.bindir is not None:
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"),
                              "-m", "immediate", "-w", "stop"]),
                capture_output=True, check=False, timeout=60,
            )
            shutil.rmtree(self.workdir, ignore_errors=True)


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's postgres user owns its files.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        pytest.fail(f"PostgreSQL (initdb) is not installed; {MISSING_FIX}")
    return Path(initdb).parent


def start_postgres() -> PostgresServer:
    bindir = _pg_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="ek-pg-"))
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
    port = free_port()
    run = subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(workdir / "data"), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"]),
        capture_output=True, text=True, check=False, timeout=120,
    )
    if run.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {run.stderr[-2000:]}")
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c max_connections=200"
    run = subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(workdir / "data"), "-o", opts,
                      "-l", str(workdir / "postgres.log"), "-w", "-t", "60", "start"]),
        capture_output=True, text=True, check=False, timeout=90,
    )
    server = PostgresServer(f"host=127.0.0.1 port={port} user=postgres connect_timeout=5",
                            started=True, workdir=workdir, bindir=bindir)
    if run.returncode != 0:
        log = (workdir / "postgres.log")
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else run.stderr
        server.stop()
        raise RuntimeError(f"pg_ctl start failed: {detail}")
    return server


def find_or_start_postgres() -> PostgresServer:
    dsn = os.environ.get("EDGEKEEPER_TEST_POSTGRES_DSN")
    if dsn:
        return PostgresServer(" ".join(p for p in dsn.split() if not p.startswith("dbname=")))
    if os.environ.get("EDGEKEEPER_TEST_START_SERVERS") == "1":
        return start_postgres()
    usual = PostgresServer(USUAL_POSTGRES.replace(" dbname=postgres", ""))
    with contextlib.suppress(Exception), usual.admin() as conn:
        conn.execute("SELECT 1")
        return usual
    return start_postgres()


# --- what the contract tests pass to open_queue / open_store -------------------------------


def queue_overrides(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    """Connection options for ``open_queue(backend, ...)``: a fresh prefix per test on Redis."""
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"url": server.url, "prefix": request.getfixturevalue("redis_prefix")}
    return {}


def store_overrides(request: pytest.FixtureRequest, backend: str) -> dict[str, Any]:
    """Connection options for ``open_store(backend, ...)``: a fresh database per test."""
    if backend == "postgres":
        return {"dsn": request.getfixturevalue("postgres_dsn"), "pool_size": 4}
    return {}


def dump_postgres(dsn: str) -> bytes:
    """Every row of every table in the database, bytea columns as raw bytes (what a stolen
    database dump would hold)."""
    import psycopg

    out = bytearray()
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    out += value if isinstance(value, bytes) else str(value).encode()
    return bytes(out)


@contextlib.contextmanager
def fresh_prefix(server: RedisServer) -> Iterator[str]:
    prefix = f"ektest-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        delete_prefix(server, prefix)


@contextlib.contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


# --- Mosquitto ------------------------------------------------------------------------------

USUAL_MQTT = ("127.0.0.1", 1883)
MOSQUITTO_MISSING = ("mosquitto is not installed (bash scripts/test installs it: apt-get install "
                     "mosquitto); the MQTT tests need a real broker")


@dataclass
class MosquittoServer:
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    argv: list[str] = field(default_factory=list)

    def launch(self) -> None:
        """Start (or restart, same port, same persistence file) a broker we own."""
        assert self.argv and self.workdir is not None, "not a broker we started"
        self.proc = _launch(self.argv, self.workdir / "mosquitto.log", self.answers,
                            f"mosquitto on {self.host}:{self.port}")

    def answers(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
            return True
        return False

    def stop(self) -> None:
        """SIGTERM: a clean broker shutdown (it saves its persistence file)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def remove(self) -> None:
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_mosquitto(extra: tuple[str, ...] = ()) -> MosquittoServer:
    """A mosquitto of our own on a free port of 127.0.0.1, persistent (retained messages and
    QoS 1 sessions survive a restart), anonymous unless ``extra`` config lines say otherwise."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING)
    workdir = Path(tempfile.mkdtemp(prefix="ek-mosquitto-"))
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "persistence true",
             f"persistence_location {workdir}/", "log_dest stdout"]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to a 'mosquitto' user that cannot read workdir
    if not any(line.startswith(("allow_anonymous", "password_file")) for line in extra):
        lines.append("allow_anonymous true")
    (workdir / "mosquitto.conf").write_text("\n".join([*lines, *extra]) + "\n")
    server = MosquittoServer("127.0.0.1", port, workdir=workdir,
                             argv=[binary, "-c", str(workdir / "mosquitto.conf")])
    try:
        server.launch()
    except BaseException:
        server.remove()
        raise
    return server
