"""``edgekeeper cloud retrain``: one retrain round from the cloud store's examples.

Light to import (argparse only): TensorFlow and the store load when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekeeper.config import Config
from edgekeeper.errors import InputError


def register(csub: Any) -> None:
    help_ = "retrain a gate's head on the reasoned examples (needs edgekeeper[train])"
    p: argparse.ArgumentParser = csub.add_parser("retrain", help=help_, description=help_)
    p.set_defaults(handler=run)
    p.add_argument("--model", required=True, help="model family: person or sound")
    p.add_argument("--scope", default="fleet", help="fleet, group:NAME or device:ID")
    p.add_argument("--since", help="only examples reasoned since (ISO date or Unix seconds)")
    p.add_argument("--current", type=Path,
                   help="folder of the model devices run now (default: the built-in one)")
    p.add_argument("--out", type=Path, help="candidate folder (default: under the cloud "
                   "data dir, candidates/MODEL-SCOPE-TIME)")
    p.add_argument("--publish", action="store_true",
                   help="build, sign and publish an accepted candidate as a release")
    p.add_argument("--variant", choices=("int8", "float"), default="int8",
                   help="which manifest the published release carries (default int8)")
    p.add_argument("--promote", action="store_true",
                   help="with --publish: skip the canary stage")


def parse_since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--since {text!r} is not a date",
                         fix="give an ISO date (2026-12-01 or 2026-12-01T08:00) or Unix "
                         "seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


async def read_examples(config: Config, model: str, scope: Any, since: float | None) -> Any:
    from edgekeeper.cloud.backends import open_store

    store = await open_store(config.cloud.store_backend, config.cloud_data_dir,
                             section=config.cloud)
    try:
        if not hasattr(store, "examples"):
            raise InputError(f"the {config.cloud.store_backend} store keeps no training "
                             "examples", fix="upgrade edgekeeper (docs/model-updates.md)")
        return await store.examples(model=model, scope=scope, since=since)
    finally:
        await store.close()


@dataclass(frozen=True)
class Published:
    """What ``publish_candidate`` did: ``stage`` is None when the key is offline and the
    release waits in ``folder`` for ``release sign`` + ``release publish``."""

    model: str
    version: str
    scope: str
    folder: Path
    stage: str | None


async def publish_candidate(store: Any, config: Config, candidate: Path, *,
                            variant: str = "int8", promote: bool = False,
                            out: Path | None = None) -> Published:
    """An accepted candidate folder -> a release: built, signed with the cloud's release key when
    it is online (``<data_dir>/keys/release-sign.key``) and published (stage ``canary`` unless
    ``promote``); with the key offline, the unsigned release only (the operator signs it where
    the key is, like ``cloud releases rollback``). The caller checks the round accepted it."""
    from edgekeeper.cloud.keys import RELEASE_FILE, CloudKeys
    from edgekeeper.cloud.releases import build_release, publish_release, sign_release
    from edgekeeper.device.manifest import load_manifest

    data_dir = config.cloud_data_dir
    keys = await asyncio.to_thread(CloudKeys.ensure, data_dir)
    name = (await asyncio.to_thread(load_manifest, candidate / f"manifest-{variant}.json")).name
    published = [r.version for r in await store.releases(name) if not r.rollback]
    folder = out or candidate.with_name(f"{candidate.name}-release")
    body = await asyncio.to_thread(
        build_release, candidate, folder, variant=variant, published=published,
        expiry_days=config.cloud.release_expiry_days, notes=f"retrain {candidate.name}")
    if keys.release_signing_key is None:
        return Published(body.model, body.version, str(body.scope), folder, None)
    await asyncio.to_thread(sign_release, folder, CloudKeys.directory(data_dir) / RELEASE_FILE)
    record = await publish_release(store, data_dir, folder, keys.release_pk,
                                   stage="promoted" if promote else "canary")
    return Published(record.model, record.version, record.scope, folder, record.stage)


def print_published(p: Published) -> None:
    if p.stage is not None:
        print(f"published {p.model}@{p.version} to {p.scope}: stage {p.stage} ({p.folder})")
        return
    print(f"the release signing key is offline: wrote the unsigned release {p.model}@{p.version} "
          f"to {p.folder}")
    print(f"sign it where the key is: edgekeeper cloud release sign {p.folder} --key PATH")
    print(f"then publish it here:     edgekeeper cloud release publish {p.folder}")


async def _publish(config: Config, candidate: Path, variant: str, promote: bool) -> Published:
    from edgekeeper.cloud.backends import open_store

    store = await open_store(config.cloud.store_backend, config.cloud_data_dir,
                             section=config.cloud)
    try:
        return await publish_candidate(store, config, candidate, variant=variant,
                                       promote=promote)
    finally:
        await store.close()


def run(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.training.retrain import require_tensorflow

    require_tensorflow()  # the one-line "install edgekeeper[train]" before any work
    from edgekeeper.cloud.training.retrain import RetrainSettings, retrain
    from edgekeeper.config import MODELS_DIR
    from edgekeeper.protocol.release import Scope

    try:
        scope = Scope.parse(args.scope)
    except ValueError as err:
        raise InputError(f"--scope: {err}", fix="use fleet, group:NAME or device:ID") from None
    current = args.current or MODELS_DIR / args.model
    if not (current / "manifest-float.json").is_file():
        raise InputError(f"{current} holds no manifest-float.json",
                         fix="--model person or sound, or --current FOLDER of a model")
    since = parse_since(args.since)
    examples = asyncio.run(read_examples(config, args.model, scope, since))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = args.out or config.cloud_data_dir / "candidates" / (
        f"{args.model}-{str(scope).replace(':', '-')}-{stamp}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = retrain(examples, RetrainSettings(model=args.model, current=current, scope=scope),
                     out)
    print(f"{'accepted' if result.accepted else 'not accepted'}: {result.reason}")
    print(f"candidate: {result.folder} (retrain.json, report.html)")
    if args.publish:
        if not result.accepted:
            print("not published: the candidate is not better than the current model")
            return 1
        print_published(asyncio.run(_publish(config, result.folder, args.variant,
                                              args.promote)))
    return 0
