"""The configuration: one TOML file, validated at start into frozen dataclasses.

Where the file comes from: ``--config PATH``, else ``$EDGEKEEPER_CONFIG``, else built-in defaults
that work on a laptop. Selected keys can be overridden by environment variables (ENV_OVERRIDES
below; systemd units use them). Every key is documented in docs/configuration.md with its
default; tests/test_config.py checks that the doc and this module agree.

This module imports nothing heavy: the cloud loads it without OpenCV and the device without
redis, so each section is a plain dataclass and the stage that uses it reads it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgekeeper.errors import ConfigError
from edgekeeper.protocol.device_id import DEVICE_ID_RULE, valid_device_id
from edgekeeper.settings import FieldValueError, build, coerce_env, override

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
try:  # installed (non-editable): models ship inside the package
    import edgekeeper.models as _models_pkg

    MODELS_DIR = Path(_models_pkg.__file__).resolve().parent
except ImportError:  # pragma: no cover
    pass

DEFAULT_VISION_MODEL = "builtin:person"
DEFAULT_AUDIO_MODEL = "builtin:sound"


def _default_state_dir() -> str:
    # systemd's StateDirectory= sets EDGEKEEPER_STATE_DIR=/var/lib/edgekeeper (see systemd/);
    # an interactive user gets the XDG location so nothing needs root.
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(xdg) / "edgekeeper")


@dataclass(frozen=True)
class DeviceSection:
    id: str = field(default_factory=lambda: socket.gethostname())
    state_dir: Path = field(default_factory=lambda: Path(_default_state_dir()))

    def __post_init__(self) -> None:
        # The protocol's own rule (one place): an id the cloud would refuse never gets this far.
        if not valid_device_id(self.id):
            raise FieldValueError("id", self.id, DEVICE_ID_RULE)


@dataclass(frozen=True)
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON lines when stdout is not a TTY (journald), a readable console on a TTY.
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class CameraSection:
    enabled: bool = True
    # A device index ("0"), a file, an rtsp:// or http(s):// URL, or a GStreamer pipeline
    # (anything containing " ! ", e.g. a CSI camera through nvarguscamerasrc or libcamerasrc).
    source: str = "0"
    # Frames per second to keep from the source; 0 keeps every frame the source gives.
    fps: float = 10.0
    width: int = 0
    height: int = 0
    # Frames waiting for the gate; when full the oldest is dropped (freshness beats
    # completeness) and counted.
    queue_size: int = 4
    reconnect_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.fps < 0 or self.queue_size < 1 or self.reconnect_seconds <= 0:
            raise ValueError("fps >= 0, queue_size >= 1 and reconnect_seconds > 0 are required")


@dataclass(frozen=True)
class MicrophoneSection:
    enabled: bool = False
    # sounddevice device name or index; empty means the system default input.
    device: str = ""
    sample_rate: int = 16000
    block_seconds: float = 0.1
    # Audio blocks waiting for the gate. Audio is never dropped silently: when this is full the
    # loop is not keeping up, and every lost block is counted and logged as an overflow.
    queue_size: int = 200

    def __post_init__(self) -> None:
        if self.sample_rate < 8000 or not 0.01 <= self.block_seconds <= 1.0 or self.queue_size < 1:
            raise ValueError("sample_rate >= 8000, 0.01 <= block_seconds <= 1, queue_size >= 1")


@dataclass(frozen=True)
class PregateSection:
    motion: bool = True
    motion_method: Literal["diff", "mog2"] = "diff"
    # Motion is measured on a frame downscaled to this width (cheap, and ignores sensor noise).
    motion_width: int = 160
    # A pixel counts as changed when it differs by more than this (0-255 grey levels).
    motion_pixel_threshold: int = 25
    # Motion is present when more than this fraction of pixels changed.
    motion_min_area: float = 0.002
    # Even without motion, run the model at least this often (a person standing still).
    max_skip_seconds: float = 5.0
    energy: bool = True
    # Audio windows quieter than this (RMS, dBFS) skip the model.
    energy_threshold_dbfs: float = -55.0

    def __post_init__(self) -> None:
        if not 0 <= self.motion_min_area < 1 or self.motion_width < 16:
            raise ValueError("0 <= motion_min_area < 1 and motion_width >= 16 are required")


@dataclass(frozen=True)
class GateSection:
    # A model manifest (docs/models.md): a path to its JSON, or builtin:NAME for models/NAME/.
    vision_model: str = DEFAULT_VISION_MODEL
    audio_model: str = DEFAULT_AUDIO_MODEL
    # "" or "int8" / "float": pick that variant of a built-in model.
    variant: Literal["int8", "float"] = "int8"
    # TFLite threads per interpreter. 1 is right on 2-4 core boards: the vision and audio gates
    # each keep a core, and a second XNNPACK thread would fight the loop, the decoder and the
    # other gate for the same cores (measured: bench/bench_loop_overhead.py, docs/benchmarks.md).
    num_threads: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.num_threads <= 16:
            raise ValueError("num_threads must be between 1 and 16")


@dataclass(frozen=True)
class LabelRule:
    # Score at or above which a window counts as a hit.
    threshold: float = 0.6
    # Hysteresis: once triggered, the label stays active until scores fall below this.
    release: float = 0.4
    # Seconds after an event for this label before another may fire.
    cooldown_seconds: float = 30.0
    # When the outbox is full, lower-priority events are evicted first.
    priority: int = 0
    # false switches a label off (a default one included): it never triggers.
    enabled: bool = True
    # Audio windows overlap (2 s every 0.48 s), so one short sound hits several windows in a row.
    # A label fires only once its hits spread over at least this many seconds (first to last hit
    # window end): a sound of d seconds hits only windows ending within d + window of each other,
    # so with 2 s windows and 2.5 no sound of 0.5 s or less fires alone. 0 turns the rule off.
    min_span_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.release <= self.threshold <= 1.0:
            raise ValueError("0 <= release <= threshold <= 1 is required")
        if self.cooldown_seconds < 0:
            raise ValueError("cooldown_seconds must be >= 0")
        if self.min_span_seconds < 0:
            raise ValueError("min_span_seconds must be >= 0")


def _default_rules() -> dict[str, LabelRule]:
    return {
        "person": LabelRule(threshold=0.7, release=0.4, cooldown_seconds=30.0, priority=1),
        "alarm": LabelRule(
            threshold=0.6, release=0.3, cooldown_seconds=30.0, priority=2, min_span_seconds=2.5
        ),
        "speech": LabelRule(
            threshold=0.8, release=0.5, cooldown_seconds=60.0, priority=0, min_span_seconds=2.5
        ),
    }


@dataclass(frozen=True)
class TriggerSection:
    # k-of-n smoothing: a label fires when k of its last n scored windows were hits.
    k: int = 3
    n: int = 5
    # Global cap across labels; events past it are held back and logged.
    max_events_per_hour: int = 60
    # Labels that may trigger, each with its rule. Labels not listed never trigger. A file's
    # [trigger.labels.NAME] table is merged into the default rule of NAME key by key
    # (build_from_dict), and a rule with enabled = false is left out here.
    labels: dict[str, LabelRule] = field(default_factory=_default_rules)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n <= 100:
            raise ValueError("1 <= k <= n <= 100 is required")
        if self.max_events_per_hour < 1:
            raise ValueError("max_events_per_hour must be >= 1")
        active = {name: rule for name, rule in self.labels.items() if rule.enabled}
        if active != self.labels:
            object.__setattr__(self, "labels", active)  # frozen: set once, while building


@dataclass(frozen=True)
class EventSection:
    pre_roll_seconds: float = 3.0
    post_roll_seconds: float = 3.0
    key_frames: int = 3
    jpeg_width: int = 640
    jpeg_quality: int = 80
    # Data minimisation: what an event may carry off the device.
    include_frames: bool = True
    include_audio: bool = True
    include_features: bool = True
    # Thumbnails only: key frames scaled to thumbnail_width, nothing larger leaves.
    thumbnails_only: bool = False
    thumbnail_width: int = 160

    def __post_init__(self) -> None:
        if self.pre_roll_seconds < 0 or self.post_roll_seconds < 0:
            raise ValueError("pre/post roll must be >= 0 seconds")
        if not 1 <= self.jpeg_quality <= 100 or self.key_frames < 0:
            raise ValueError("jpeg_quality 1-100 and key_frames >= 0 are required")
        if self.pre_roll_seconds + self.post_roll_seconds > 120:
            raise ValueError("pre_roll + post_roll must not exceed 120 seconds (memory)")


@dataclass(frozen=True)
class SinkSection:
    # Where events go when no cloud is configured: a directory of files plus index.jsonl.
    # Empty means <state_dir>/events.
    directory: str = ""


@dataclass(frozen=True)
class OutboxSection:
    # The durable outbox (device/outbox.py). Empty means <state_dir>/outbox.sqlite.
    path: str = ""
    # Bytes of stored event bodies allowed before full_policy applies.
    quota_mb: float = 512.0
    # evict_lowest_priority: dead letters, then lowest priority, oldest first (a newcomer of
    # the lowest priority is the one dropped); evict_oldest; reject_new. Every drop is counted.
    full_policy: Literal["evict_lowest_priority", "evict_oldest", "reject_new"] = (
        "evict_lowest_priority"
    )

    def __post_init__(self) -> None:
        if not 0 < self.quota_mb <= 1_000_000:
            raise ValueError("quota_mb must be > 0 (megabytes of stored events)")


@dataclass(frozen=True)
class UplinkSection:
    # cloud: `edgekeeper run` sends events to the cloud and refuses to start unenrolled (exit
    # 78, with the fix). local-only: events stay on this machine (sink.directory), on purpose.
    mode: Literal["cloud", "local-only"] = "cloud"
    # The cloud ingest URL; empty means the one pinned by `edgekeeper device enroll`.
    cloud_url: str = ""
    connect_timeout_seconds: float = 10.0
    # Longest silence while reading a response (a blackholed route shows up here).
    read_timeout_seconds: float = 30.0
    # Exponential backoff with full jitter: a wait uniform in [0, min(cap, base * 2**n)].
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 300.0
    # Events leased from the outbox per round, and uploads in flight at once.
    batch: int = 16
    concurrency: int = 2
    # While the cloud is unreachable, act on the gate's own decision (a provisional result)
    # once an event has waited edge_fallback_after_seconds.
    edge_fallback: bool = False
    edge_fallback_after_seconds: float = 30.0
    # PEM file of a CA trusted for an https:// cloud, in addition to the system's (a cloud
    # behind a private CA). Used for enrollment, uploads and results (edgekeeper/tls.py).
    ca_file: str = ""
    # A signed metadata-only heartbeat to the cloud (POST /v1/heartbeat) every N seconds, for
    # `edgekeeper cloud devices`; 0: none.
    heartbeat_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not (self.heartbeat_seconds == 0 or 5 <= self.heartbeat_seconds <= 86400):
            raise ValueError("heartbeat_seconds must be 0 (off) or 5 to 86400")
        if self.cloud_url and not self.cloud_url.startswith(("http://", "https://")):
            raise ValueError("cloud_url must start with http:// or https://")
        if self.connect_timeout_seconds <= 0 or self.read_timeout_seconds <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        if not 0 < self.backoff_base_seconds <= self.backoff_cap_seconds <= 3600:
            raise ValueError("0 < backoff_base_seconds <= backoff_cap_seconds <= 3600 is required")
        if not 1 <= self.concurrency <= self.batch <= 1000:
            raise ValueError("1 <= concurrency <= batch <= 1000 is required")
        if self.edge_fallback_after_seconds < 0:
            raise ValueError("edge_fallback_after_seconds must be >= 0")


@dataclass(frozen=True)
class ResultsSection:
    # Actions for results coming back from the cloud (device/results.py), in this order.
    # JSONL log, relative to state_dir unless absolute; empty disables it.
    jsonl: str = "results.jsonl"
    # A command (argv list, no shell) run with the result as JSON on stdin; empty disables it.
    command: tuple[str, ...] = ()
    command_timeout_seconds: float = 30.0
    # A local URL the result is POSTed to as JSON; empty disables it.
    post_url: str = ""
    # A failing action is retried this many times (after the first try), then recorded failed.
    retries: int = 3
    retry_delay_seconds: float = 1.0
    # Long-poll: how long the cloud may hold a results request open.
    poll_wait_seconds: float = 25.0
    # The ledger (results.sqlite) remembers handled results so a redelivered one does not run
    # the actions twice; it is needed only until the ack reaches the cloud (seconds, or the
    # length of an outage). Entries older than this are deleted, daily; 0 keeps them forever.
    ledger_keep_days: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.ledger_keep_days <= 36500:
            raise ValueError("ledger_keep_days must be between 0 (forever) and 36500")
        if self.post_url and not self.post_url.startswith(("http://", "https://")):
            raise ValueError("post_url must start with http:// or https://")
        if not 0 <= self.retries <= 100 or self.retry_delay_seconds < 0:
            raise ValueError("0 <= retries <= 100 and retry_delay_seconds >= 0 are required")
        if self.command_timeout_seconds <= 0 or not 0 < self.poll_wait_seconds <= 300:
            raise ValueError("command_timeout_seconds > 0 and 0 < poll_wait_seconds <= 300")


@dataclass(frozen=True)
class UpdatesSection:
    # Signed model releases from the cloud (device/update/, docs/model-updates.md). Only gates
    # configured as builtin:NAME are updated, and only on an enrolled device.
    enabled: bool = True
    # How often to ask for a new release (the results long-poll's hint asks sooner).
    check_seconds: float = 3600.0
    # A download with no byte for this long, or not complete within download_seconds, is
    # abandoned and tried again at the next check.
    stall_seconds: float = 10.0
    download_seconds: float = 600.0
    # Tries per file within one check, a short backoff apart; past them the check fails and
    # the next check starts the download again.
    download_attempts: int = 3
    # A new model's trial: this many inferences or this many seconds, whichever comes first.
    trial_inferences: int = 500
    trial_seconds: float = 600.0
    # Shadow evaluation refuses a candidate that flips the hit/no-hit decision of more than
    # this share of the canary inputs (those no teacher marked the current model wrong on).
    shadow_max_flip: float = 0.5
    # Recent gate inputs kept per modality for the shadow evaluation (<state_dir>/canary.sqlite).
    canary_size: int = 64

    def __post_init__(self) -> None:
        if not (self.check_seconds >= 1 and self.stall_seconds > 0
                and self.download_seconds >= self.stall_seconds):
            raise ValueError("check_seconds >= 1 and 0 < stall_seconds <= download_seconds")
        if not 1 <= self.download_attempts <= 100:
            raise ValueError("download_attempts must be between 1 and 100")
        if self.trial_inferences < 0 or self.trial_seconds < 0:
            raise ValueError("trial_inferences and trial_seconds must be >= 0")
        if not 0 <= self.shadow_max_flip <= 1 or not 1 <= self.canary_size <= 10000:
            raise ValueError("0 <= shadow_max_flip <= 1 and 1 <= canary_size <= 10000")


@dataclass(frozen=True)
class CloudSection:
    # The cloud half (cloud/ingest.py, cloud/worker.py). Empty data_dir means edgekeeper-cloud/
    # beside the device state dir (~/.local/state/edgekeeper-cloud, /var/lib/edgekeeper-cloud):
    # the embedded backends' SQLite files and the cloud's keys live there.
    data_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8765
    # Largest event envelope accepted; refused by Content-Length before the body is read.
    max_event_bytes: int = 8 * 1024 * 1024
    # sent_at (and signed-request timestamps) must be within this many seconds of the cloud clock.
    replay_window_seconds: float = 300.0
    # Per-device token bucket: sustained events per second, and the burst allowed above it.
    rate_per_second: float = 5.0
    rate_burst: int = 30
    # Uploads processed at once (counted once the body is in); past it the ingest answers 503 +
    # Retry-After. Upload bodies held in memory at once are capped at max_inflight *
    # max_event_bytes bytes (503 past it): a client trickling a body holds bytes, not a slot.
    max_inflight: int = 64
    # Ingest processes `cloud serve` runs on the one port (SO_REUSEPORT; --workers overrides):
    # one process uses one core, so a busy ingest runs one per core (docs/scaling.md).
    ingest_processes: int = 1
    token_ttl_seconds: float = 86400.0
    # Longest long-poll on GET /v1/results (the device asks for less).
    results_max_wait_seconds: float = 30.0
    # Long-polls one device may hold open at once; more get 429 + Retry-After unless signed
    # later than a held one, whose place they take. Its own results client needs one; a signed
    # request replayed inside replay_window_seconds would otherwise hold a socket per copy.
    results_max_polls_per_device: int = 2
    # How often a long-poll re-checks the results store written by workers in other processes,
    # and how often the ingest re-reads the device registry (revocations from the CLI).
    results_poll_seconds: float = 0.25
    registry_refresh_seconds: float = 0.5
    # sqlite: files under data_dir (one machine). redis / postgres: shared by ingest processes and
    # workers on several machines (cloud/queue/redis_streams.py, cloud/store/postgres.py).
    queue_backend: Literal["sqlite", "redis"] = "sqlite"
    store_backend: Literal["sqlite", "postgres"] = "sqlite"
    # redis://[:password@]host:port/db (rediss:// for TLS). A password is better given through
    # EDGEKEEPER_REDIS_URL than written in the file.
    # repr=False: a URL or DSN may carry a password, and a Config may be printed in a traceback.
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    # Every key lives under "{prefix}:" (one hash slot: scripts stay atomic on Redis Cluster),
    # so several deployments can share one Redis.
    redis_prefix: str = "edgekeeper"
    # "QUEUED" must mean durable: at open the queue reads CONFIG GET appendonly/appendfsync and,
    # unless they are yes/always, refuses to start ("refuse") or logs a loud warning ("warn").
    redis_fsync_check: Literal["refuse", "warn"] = "refuse"
    # libpq DSN or URL; a password is better in ~/.pgpass, PGPASSWORD or EDGEKEEPER_POSTGRES_DSN.
    postgres_dsn: str = field(
        default="postgresql://postgres@127.0.0.1:5432/edgekeeper", repr=False
    )
    # Connections one process keeps to PostgreSQL.
    postgres_pool_size: int = 10
    # A leased event not acked within this many seconds is delivered again.
    queue_visibility_seconds: float = 120.0
    # Deliveries before an event goes to the dead-letter list.
    queue_max_attempts: int = 5
    # Acknowledged results are deleted (by the workers) this long after the device acked them;
    # 0 keeps them forever. Unacked ones are kept however old (a device may be offline for
    # weeks). Far longer than an event can stay queued once its result is stored (until its
    # lease expires), or a redelivery would find no result and be paid for twice: validated.
    results_retention_seconds: float = 7 * 86400.0
    # auto: Claude ("anthropic") when ANTHROPIC_API_KEY is set in the worker's environment, else
    # the offline teacher; echo repeats the gate (link tests). Tuned in [reasoner] and [budget].
    reasoner: Literal["auto", "anthropic", "offline", "echo"] = "auto"
    # Events reasoned about at once by one worker process.
    worker_concurrency: int = 4
    # A request body must keep arriving: no pause longer than this, and all of it within this
    # plus one second per 4 KiB (a 60 KB event over a 2G link fits; a client trickling bytes
    # to hold an upload slot does not). 408 request_timeout otherwise.
    body_timeout_seconds: float = 30.0
    # Serve HTTPS directly (PEM certificate chain and its key); empty: plain HTTP, for a
    # TLS-terminating proxy in front (edgekeeper/tls.py).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Model releases (docs/model-updates.md): a canary-stage release is promoted to the rest of
    # its scope once every canary passed its trial and this long has gone by with no rollback
    # or refusal; a built release expires (devices refuse it) this many days after it is built.
    rollout_canary_seconds: float = 3600.0
    release_expiry_days: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.rollout_canary_seconds <= 30 * 86400 or not (
                0 < self.release_expiry_days <= 3650):
            raise ValueError("rollout_canary_seconds must be 0-2592000 and release_expiry_days"
                             " 0-3650 (more than 0)")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0-65535")
        if not 1024 <= self.max_event_bytes <= 256 * 1024 * 1024:
            raise ValueError("max_event_bytes must be between 1024 and 268435456")
        if not 1 <= self.replay_window_seconds <= 86400:
            raise ValueError("replay_window_seconds must be between 1 and 86400")
        if self.rate_per_second <= 0 or self.rate_burst < 1:
            raise ValueError("rate_per_second > 0 and rate_burst >= 1 are required")
        if not 1 <= self.max_inflight <= 10000:
            raise ValueError("max_inflight must be between 1 and 10000")
        if not 1 <= self.ingest_processes <= 64:
            raise ValueError("ingest_processes must be between 1 and 64")
        if self.token_ttl_seconds <= 0:
            raise ValueError("token_ttl_seconds must be > 0")
        if not 0 < self.body_timeout_seconds <= 3600:
            raise ValueError("body_timeout_seconds must be > 0 and at most 3600")
        if not 0 <= self.results_max_wait_seconds <= 300:
            raise ValueError("results_max_wait_seconds must be between 0 and 300")
        if not 1 <= self.results_max_polls_per_device <= 1000:
            raise ValueError("results_max_polls_per_device must be between 1 and 1000")
        if self.results_poll_seconds <= 0 or self.registry_refresh_seconds <= 0:
            raise ValueError("results_poll_seconds and registry_refresh_seconds must be > 0")
        if self.queue_visibility_seconds <= 0 or not 1 <= self.queue_max_attempts <= 1000:
            raise ValueError("queue_visibility_seconds > 0 and 1 <= queue_max_attempts <= 1000")
        floor = max(86400.0, 10 * self.queue_visibility_seconds)
        if self.results_retention_seconds != 0 and not self.results_retention_seconds >= floor:
            raise ValueError(
                f"results_retention_seconds must be 0 (keep acknowledged results forever) or at"
                f" least {floor:g} (one day, and 10 x queue_visibility_seconds): an event can"
                " still be queued after its result was acked, and the worker must find that"
                " result to not pay for the event twice")
        if not 1 <= self.worker_concurrency <= 256:
            raise ValueError("worker_concurrency must be between 1 and 256")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if not self.redis_prefix or not all(c.isalnum() or c in "-_.:" for c in self.redis_prefix):
            raise ValueError("redis_prefix must be letters, digits, '-', '_', '.', ':'")
        if not self.postgres_dsn.strip():
            raise ValueError("postgres_dsn must not be empty")
        if not 1 <= self.postgres_pool_size <= 200:
            raise ValueError("postgres_pool_size must be between 1 and 200")


ACTIONS = ("none", "log", "notify", "alert")  # recommended actions, by growing authority


@dataclass(frozen=True)
class ReasonerSection:
    # How the cloud worker asks about events (cloud/reasoners/). The API key is NOT a key here:
    # it comes from ANTHROPIC_API_KEY in the worker's environment only (ANTHROPIC_BASE_URL too).
    model: str = "claude-sonnet-4-6"
    # The 'cheaper' over-budget path: this model (priced in [budget.prices]), or the offline
    # teacher when empty. Either way the result is marked provisional.
    cheaper_model: str = ""
    max_tokens: int = 1024
    # Per provider call (each of the SDK's own retries gets it again).
    timeout_seconds: float = 60.0
    # The SDK's retries of 408/409/429/5xx/529 and connection errors, honouring retry-after.
    max_retries: int = 2
    # Key frames sent as images (the first, last and evenly spaced between), each scaled so
    # its longer side is at most image_max_side pixels (0: as captured): images are most of
    # the input tokens (about width * height / 750 each).
    max_frames: int = 4
    image_max_side: int = 1024
    # The LLM reads no audio: it gets the clip's level and length and, with a recognizer, a
    # transcript. auto: pocketsphinx when installed (offline, bundled English model).
    transcriber: Literal["auto", "pocketsphinx", "none"] = "auto"
    # When the provider keeps failing, an event that has waited fallback_after_seconds since it
    # was received may get the offline teacher's result instead (provisional); none: it waits.
    fallback: Literal["none", "offline"] = "none"
    fallback_after_seconds: float = 600.0
    # Provisional results (offline, cheaper path, fallback) recommend at most this action:
    # a fallback never has more authority than the judgement it stands in for.
    provisional_max_action: Literal["none", "log", "notify", "alert"] = "notify"
    # Provider down (5xx, 529, timeouts, 429 after the SDK's retries): the worker stops
    # leasing and probes with one small request after a pause that doubles from
    # backoff_initial_seconds up to backoff_max_seconds (with jitter).
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 60.0
    # An event's own retries (malformed answers, other transient failures): delay doubles
    # from retry_base_seconds per attempt up to retry_max_seconds, with jitter.
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must name a model, e.g. 'claude-sonnet-4-6'")
        if not 1 <= self.max_tokens <= 64000:
            raise ValueError("max_tokens must be between 1 and 64000")
        if not 0 < self.timeout_seconds <= 600:
            raise ValueError("timeout_seconds must be > 0 and <= 600")
        if not 0 <= self.max_retries <= 10:
            raise ValueError("max_retries must be between 0 and 10")
        if not 0 <= self.max_frames <= 20:
            raise ValueError("max_frames must be between 0 and 20 (the API takes at most 100)")
        if self.image_max_side != 0 and not 64 <= self.image_max_side <= 8000:
            raise ValueError("image_max_side must be 0 (as captured) or 64-8000")
        if self.fallback_after_seconds < 0:
            raise ValueError("fallback_after_seconds must be >= 0")
        if not 0 < self.backoff_initial_seconds <= self.backoff_max_seconds <= 3600:
            raise ValueError("0 < backoff_initial_seconds <= backoff_max_seconds <= 3600")
        if not 0 <= self.retry_base_seconds <= self.retry_max_seconds <= 86400:
            raise ValueError("0 <= retry_base_seconds <= retry_max_seconds <= 86400")


@dataclass(frozen=True)
class ModelPrice:
    # US dollars per million tokens, from the provider's price list (check it when it changes).
    # cache_write is the 5-minute cache write price (the system prompt is cached that way).
    input: float = -1.0
    output: float = -1.0
    cache_write: float = -1.0
    cache_read: float = -1.0

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_write", "cache_read"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(
                    "input, output, cache_write and cache_read are all required, in US$ per"
                    f" million tokens (>= 0); {name} is missing or negative"
                )


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "claude-sonnet-4-6": ModelPrice(3.0, 15.0, 3.75, 0.30),
    "claude-haiku-4-5": ModelPrice(1.0, 5.0, 1.25, 0.10),
    "claude-opus-4-5": ModelPrice(5.0, 25.0, 6.25, 0.50),
}


@dataclass(frozen=True)
class BudgetSection:
    # Daily (UTC) spending limits for the cloud worker (cloud/budget.py); 0 means no limit.
    # Tokens count input + output + cache write + cache read. Checked before each provider
    # call, so the overshoot is at most the calls already in flight.
    device_daily_usd: float = 2.0
    device_daily_tokens: int = 0
    global_daily_usd: float = 20.0
    global_daily_tokens: int = 0
    # wait: the event is put back until the next UTC day (never dropped); a spent global
    # budget also pauses leasing. cheaper: reason now with reasoner.cheaper_model or the
    # offline teacher, the result marked provisional.
    over_budget: Literal["wait", "cheaper"] = "wait"
    # model -> prices. A table in the file replaces this whole default table.
    prices: dict[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def __post_init__(self) -> None:
        if min(self.device_daily_usd, self.global_daily_usd) < 0:
            raise ValueError("daily_usd limits must be >= 0 (0: no limit)")
        if min(self.device_daily_tokens, self.global_daily_tokens) < 0:
            raise ValueError("daily_tokens limits must be >= 0 (0: no limit)")


@dataclass(frozen=True)
class TrainingSection:
    # Every reasoned event becomes a training example in the cloud's store: the gate's features,
    # scores and label, the teacher's judgement, provenance (cloud/training/examples.py,
    # docs/model-updates.md). No raw media unless keep_media: heads retrain on features.
    examples: bool = True
    # Also keep the event's key frames / audio (for full fine-tuning) under
    # <cloud data_dir>/training-media/, deleted media_retention_days after reasoning.
    keep_media: bool = False
    media_retention_days: float = 30.0
    # Scheduled retrain by the worker (docs/model-updates.md, Scheduled retrain): every this
    # many hours (0: off), a model with at least retrain_min_new_examples usable examples
    # since its last round is retrained; an accepted candidate is published (canary stage)
    # when retrain_publish and the release key is on the cloud.
    retrain_every_hours: float = 0.0
    retrain_min_new_examples: int = 200
    retrain_models: tuple[str, ...] = ("person", "sound")
    retrain_publish: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.media_retention_days <= 3650:
            raise ValueError("media_retention_days must be > 0 and at most 3650 (ten years)")
        if not 0 <= self.retrain_every_hours <= 8760:
            raise ValueError("retrain_every_hours must be 0 (off) to 8760 (a year)")
        if self.retrain_min_new_examples < 1:
            raise ValueError("retrain_min_new_examples must be at least 1")
        unknown = [m for m in self.retrain_models if m not in ("person", "sound")]
        if unknown:
            raise ValueError(f"retrain_models: {unknown} are not person or sound")


@dataclass(frozen=True)
class MqttSection:
    # Results (and, if asked, triggers) published to an MQTT broker with Home Assistant
    # discovery (device/mqtt.py, docs/mqtt.md). Empty host: MQTT is off.
    host: str = ""
    port: int = 1883
    tls: bool = False
    # PEM CA trusted for the broker (empty: the system's CAs); a client certificate and key.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    # The NAME of the environment variable holding the password, never the password itself.
    password_env: str = ""
    client_id: str = ""  # empty: edgekeeper-<device id>
    keepalive: int = 60
    topic_prefix: str = "edgekeeper"
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    publish_triggers: bool = False
    # The key frame of each captured event, retained on <prefix>/<device>/snapshot.
    snapshots: bool = True
    # A label's binary sensor turns off this long after its last trigger or result.
    off_delay_seconds: int = 30
    # Messages waiting in memory while the broker is away (results also wait on disk).
    queue_size: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535 or not 5 <= self.keepalive <= 3600:
            raise ValueError("1 <= port <= 65535 and 5 <= keepalive <= 3600 are required")
        for name in ("topic_prefix", "discovery_prefix"):
            value = getattr(self, name)
            if not value or any(c in value for c in "+#\0") or value.strip("/") != value:
                raise ValueError(f"{name} must be a topic without +, #, or a leading or"
                                 " trailing '/', e.g. 'edgekeeper'")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("ca_file and cert_file need tls = true")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (a client certificate)")
        if self.password_env and not self.password_env.replace("_", "a").isalnum():
            raise ValueError("password_env is the NAME of an environment variable, e.g."
                             " 'EDGEKEEPER_MQTT_PASSWORD', not the password")
        if not 1 <= self.off_delay_seconds <= 86400 or not 1 <= self.queue_size <= 100000:
            raise ValueError("1 <= off_delay_seconds <= 86400 and 1 <= queue_size <= 100000")


@dataclass(frozen=True)
class Config:
    device: DeviceSection = field(default_factory=DeviceSection)
    log: LogSection = field(default_factory=LogSection)
    camera: CameraSection = field(default_factory=CameraSection)
    microphone: MicrophoneSection = field(default_factory=MicrophoneSection)
    pregate: PregateSection = field(default_factory=PregateSection)
    gate: GateSection = field(default_factory=GateSection)
    trigger: TriggerSection = field(default_factory=TriggerSection)
    event: EventSection = field(default_factory=EventSection)
    sink: SinkSection = field(default_factory=SinkSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    uplink: UplinkSection = field(default_factory=UplinkSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    updates: UpdatesSection = field(default_factory=UpdatesSection)
    cloud: CloudSection = field(default_factory=CloudSection)
    reasoner: ReasonerSection = field(default_factory=ReasonerSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    # Where the config came from, for error messages ("defaults" when none was given).
    source: str = field(default="defaults", compare=False)

    @property
    def sink_dir(self) -> Path:
        if self.sink.directory:
            return Path(self.sink.directory)
        return self.device.state_dir / "events"

    @property
    def cloud_data_dir(self) -> Path:
        if self.cloud.data_dir:
            return Path(self.cloud.data_dir).expanduser()
        return self.device.state_dir.parent / "edgekeeper-cloud"

    @property
    def outbox_path(self) -> Path:
        if self.outbox.path:
            return Path(self.outbox.path).expanduser()
        return self.device.state_dir / "outbox.sqlite"


# Environment variables that override single keys (explicit, so docs and code agree).
ENV_OVERRIDES: dict[str, str] = {
    "EDGEKEEPER_DEVICE_ID": "device.id",
    "EDGEKEEPER_STATE_DIR": "device.state_dir",
    "EDGEKEEPER_LOG_LEVEL": "log.level",
    "EDGEKEEPER_LOG_FORMAT": "log.format",
    "EDGEKEEPER_CAMERA_SOURCE": "camera.source",
    "EDGEKEEPER_MICROPHONE_ENABLED": "microphone.enabled",
    "EDGEKEEPER_GATE_NUM_THREADS": "gate.num_threads",
    "EDGEKEEPER_SINK_DIRECTORY": "sink.directory",
    "EDGEKEEPER_OUTBOX_PATH": "outbox.path",
    "EDGEKEEPER_CLOUD_URL": "uplink.cloud_url",
    "EDGEKEEPER_CLOUD_DATA_DIR": "cloud.data_dir",
    "EDGEKEEPER_CLOUD_HOST": "cloud.host",
    "EDGEKEEPER_CLOUD_PORT": "cloud.port",
    "EDGEKEEPER_INGEST_PROCESSES": "cloud.ingest_processes",
    "EDGEKEEPER_QUEUE_BACKEND": "cloud.queue_backend",
    "EDGEKEEPER_STORE_BACKEND": "cloud.store_backend",
    "EDGEKEEPER_REDIS_URL": "cloud.redis_url",
    "EDGEKEEPER_POSTGRES_DSN": "cloud.postgres_dsn",
    "EDGEKEEPER_REASONER": "cloud.reasoner",
    "EDGEKEEPER_REASONER_MODEL": "reasoner.model",
}


def _field_type(dotted: str) -> Any:
    tp: Any = Config
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def load(path: str | Path | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Load and validate the config. Raises ConfigError (with the fix) on any problem."""
    env = os.environ if env is None else env
    if path is None and env.get("EDGEKEEPER_CONFIG"):
        path = env["EDGEKEEPER_CONFIG"]
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path).expanduser()
        source = str(p)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"config file {p} does not exist",
                fix="pass an existing file to --config / EDGEKEEPER_CONFIG, or omit it for "
                "defaults",
            ) from None
        except OSError as err:
            raise ConfigError(f"config file {p} cannot be read: {err.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"config file {p} is not UTF-8 text", fix="save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(
                f"config file {p} is not valid TOML: {err}", fix="fix the syntax at that line"
            ) from None
    applied = {dotted: var for var, dotted in ENV_OVERRIDES.items() if var in env}
    for dotted, var in applied.items():
        override(data, dotted, coerce_env(_field_type(dotted), env[var]))
    try:
        return build_from_dict(data, source=source)
    except ConfigError as err:
        # A bad value that came from a variable: name the variable, not a file that lacks it.
        for dotted, var in applied.items():
            if err.message.startswith(f"{source}: key '{dotted}' "):
                raise ConfigError(
                    var + err.message[len(source):],
                    fix=f"fix or unset {var} (it overrides {dotted})",
                ) from None
        if "id" not in data.get("device", {}) and "key 'device.id' " in err.message:
            # device.id defaults to the host name, which may not follow the rule
            raise ConfigError(
                f"{err.message} (the default: this machine's host name)",
                fix=f"set device.id in {'a config file' if source == 'defaults' else source}"
                " or EDGEKEEPER_DEVICE_ID (docs/configuration.md)",
            ) from None
        raise


def build_from_dict(data: dict[str, Any], *, source: str) -> Config:
    """Validate already-parsed TOML data (tests and tools build configs this way too)."""
    if "source" in data:
        raise ConfigError(f"{source}: 'source' is not a config section", fix="remove it")
    config = build(Config, _with_label_defaults(data), source=source)
    return dataclasses.replace(config, source=source)


def _with_label_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each [trigger.labels.NAME] table laid over NAME's default rule, key by key.

    Without this a file that tunes one label would replace the whole default set: the example
    in docs/configuration.md would switch speech and alarm off while the audio model scores on.
    """
    trigger = data.get("trigger")
    if not isinstance(trigger, dict) or not isinstance(trigger.get("labels"), dict):
        return data  # nothing to merge (a wrong type is reported by build)
    merged: dict[str, Any] = {
        name: dataclasses.asdict(rule) for name, rule in _default_rules().items()
    }
    for name, table in trigger["labels"].items():
        base = merged.get(name)
        merged[name] = {**base, **table} if base and isinstance(table, dict) else table
    return {**data, "trigger": {**trigger, "labels": merged}}


def check_labels(config: Config, outputs: typing.Mapping[str, typing.Sequence[str]]) -> None:
    """Refuse a trigger rule for a label no configured model outputs (a misspelt
    [trigger.labels.persn] would otherwise be accepted and never fire).

    ``outputs`` maps a model's description ("vision model person@1.0.0") to its labels; it is
    known once the manifests are read, so the device calls this where it loads the models.
    """
    known = {label for labels in outputs.values() for label in labels}
    unknown = [name for name in config.trigger.labels if name not in known]
    if not unknown:
        return
    models = "; ".join(f"{what}: {', '.join(labels)}" for what, labels in outputs.items())
    name = unknown[0]
    raise ConfigError(
        f"{config.source}: [trigger.labels.{name}] names a label no configured model outputs"
        f" ({models or 'no model configured'})",
        fix=f"rename it to one of the labels above, point gate.vision_model / gate.audio_model"
        f" at a model that outputs '{name}', or switch it off: [trigger.labels.{name}]"
        " enabled = false",
    )


def resolve_model(spec: str, variant: str = "int8") -> Path:
    """Turn a gate.*_model value into the path of a manifest JSON."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        candidate = MODELS_DIR / name / f"manifest-{variant}.json"
        if not candidate.exists():
            candidate = MODELS_DIR / name / "manifest.json"
        return candidate
    return Path(spec).expanduser()
