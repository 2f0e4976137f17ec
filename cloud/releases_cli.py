"""``edgekeeper cloud release build|sign|publish``, ``edgekeeper cloud releases [MODEL]`` (and
``promote | halt | rollback``) and ``edgekeeper cloud devices group`` (docs/model-updates.md)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgekeeper.config import Config
from edgekeeper.errors import InputError

GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ACTIONS = ("promote", "halt", "rollback")


def register(csub: Any, devices: argparse.ArgumentParser) -> None:
    release = csub.add_parser("release", help="build, sign and publish a model release",
                              description="build, sign and publish a model release")
    release.set_defaults(handler=lambda args, config: release.print_help() or 2)
    rsub = release.add_subparsers(dest="release_command", metavar="STEP")

    p = rsub.add_parser("build", help="a release folder from a model folder (unsigned)")
    p.set_defaults(handler=_build)
    p.add_argument("source", type=Path, metavar="MODEL_DIR",
                   help="models/NAME or a retrain's candidate folder")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="the release folder to create")
    p.add_argument("--variant", choices=("int8", "float"), default="int8")
    p.add_argument("--version", help="MAJOR.MINOR.PATCH (default: the next minor version after "
                                     "the highest published)")
    p.add_argument("--scope", help="fleet, group:NAME or device:ID (default: retrain.json's, "
                                   "else fleet)")
    p.add_argument("--notes", default="", help="a line for the operators")

    p = rsub.add_parser("sign", help="sign a built release (works offline, with the key only)")
    p.set_defaults(handler=_sign)
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--key", type=Path, metavar="PATH",
                   help="the release signing key file (default: <data_dir>/keys/"
                        "release-sign.key)")

    p = rsub.add_parser("publish", help="verify a signed release and start its rollout")
    p.set_defaults(handler=_publish)
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--promote", action="store_true",
                   help="serve it to the whole scope at once (skip the canary stage)")

    p = csub.add_parser(
        "releases", help="list releases and what each device runs; promote, halt, roll back",
        description="edgekeeper cloud releases [MODEL] | promote MODEL VERSION | halt MODEL "
                    "VERSION | rollback MODEL [--scope SCOPE]")
    p.set_defaults(handler=_releases)
    p.add_argument("words", nargs="*", metavar="ARGS")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--scope", default="fleet", help="rollback: the scope to roll back")
    p.add_argument("--out", type=Path, help="rollback without the signing key online: where "
                                            "to write the unsigned rollback release")

    dsub = devices.add_subparsers(dest="devices_command", metavar="SUBCOMMAND")
    p = dsub.add_parser("group", help="put a device in a group (and mark it a canary)",
                        description="put a device in a group ('-' for none), canary or not")
    p.set_defaults(handler=_group)
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("group", metavar="GROUP")
    p.add_argument("--canary", action="store_true",
                   help="gets canary-stage releases of its scope first")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


async def _with_store(config: Config, fn: Any) -> Any:
    from edgekeeper.cloud.backends import open_store

    store = await open_store(config.cloud.store_backend, config.cloud_data_dir,
                             section=config.cloud)
    try:
        return await fn(store)
    finally:
        await store.close()


def _build(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.releases import build_release
    from edgekeeper.device.manifest import load_manifest

    name = load_manifest(args.source / f"manifest-{args.variant}.json").name

    async def published(store: Any) -> list[str]:
        return [r.version for r in await store.releases(name) if not r.rollback]

    versions = asyncio.run(_with_store(config, published))
    body = build_release(args.source, args.out, variant=args.variant, version=args.version,
                         scope=args.scope, published=versions, notes=args.notes,
                         expiry_days=config.cloud.release_expiry_days)
    print(f"built {body.tag} for {body.scope} ({len(body.files)} files) in {args.out}")
    print(f"next: edgekeeper cloud release sign {args.out} --key PATH")
    return 0


def _default_key(config: Config) -> Path:
    from edgekeeper.cloud.keys import RELEASE_FILE, CloudKeys

    CloudKeys.ensure(config.cloud_data_dir)  # first use on the cloud machine: generate them
    return CloudKeys.directory(config.cloud_data_dir) / RELEASE_FILE


def _sign(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.releases import sign_release

    body = sign_release(args.directory, args.key or _default_key(config))
    print(f"signed {body.tag}: {args.directory / 'release.json'}")
    print(f"next: edgekeeper cloud release publish {args.directory}")
    return 0


def _publish(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.keys import CloudKeys
    from edgekeeper.cloud.releases import publish_release

    keys = CloudKeys.ensure(config.cloud_data_dir)
    record = asyncio.run(_with_store(config, lambda store: publish_release(
        store, config.cloud_data_dir, args.directory, keys.release_pk,
        stage="promoted" if args.promote else "canary")))
    print(f"published {record.model}@{record.version} to {record.scope}: stage {record.stage}")
    return 0


def _group(args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.protocol.device_id import device_id_problem

    problem = device_id_problem(args.device, "DEVICE")
    if problem:
        raise InputError(problem, fix="see 'edgekeeper cloud devices' for the ids")
    group = "" if args.group == "-" else args.group
    if group and not GROUP_NAME.match(group):
        raise InputError(f"group {args.group!r} is not lowercase letters, digits, '-' or '_' "
                         "(at most 64)", fix="name the group like 'street-cams', or '-' for none")

    async def do(store: Any) -> bool:
        if await store.get_device(args.device) is None:
            return False
        await store.set_device_group(args.device, group, canary=args.canary)
        return True

    if not asyncio.run(_with_store(config, do)):
        raise InputError(f"no device {args.device!r} is enrolled",
                         fix="see 'edgekeeper cloud devices' for the ids")
    print(f"{args.device}: group {group or '(none)'}{', canary' if args.canary else ''}")
    return 0


def _releases(args: argparse.Namespace, config: Config) -> int:
    words = list(args.words)
    if words and words[0] in ACTIONS:
        action, rest = words[0], words[1:]
        want = 1 if action == "rollback" else 2
        if len(rest) != want:
            usage = "MODEL" if action == "rollback" else "MODEL VERSION"
            raise InputError(f"'releases {action}' takes {usage}",
                             fix=f"edgekeeper cloud releases {action} {usage}")
        if action == "rollback":
            return _rollback(rest[0], args, config)
        return _set_stage(action, rest[0], rest[1], config)
    if len(words) > 1:
        raise InputError(f"unexpected arguments {words[1:]}",
                         fix="edgekeeper cloud releases [MODEL] | promote|halt MODEL VERSION | "
                             "rollback MODEL")
    return _list(words[0] if words else None, args, config)


def _set_stage(action: str, model: str, version: str, config: Config) -> int:
    stage = "promoted" if action == "promote" else "halted"

    async def do(store: Any) -> list[Any]:
        found = [r for r in await store.releases(model) if r.version == version]
        for r in found:
            await store.set_release_stage(r.id, stage, now=time.time())
        return found

    if not asyncio.run(_with_store(config, do)):
        raise InputError(f"no release {model}@{version} is published",
                         fix="see edgekeeper cloud releases")
    print(f"{model}@{version}: {stage}")
    return 0


def _rollback(model: str, args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.keys import CloudKeys
    from edgekeeper.cloud.releases import build_rollback, publish_release, sign_release

    keys = CloudKeys.ensure(config.cloud_data_dir)
    online = keys.release_signing_key is not None
    key = _default_key(config)
    out = args.out or (Path(tempfile.mkdtemp(prefix="edgekeeper-rollback-")) if online
                       else Path(f"rollback-{model}-{int(time.time())}"))

    async def do(store: Any) -> str:
        body = await build_rollback(store, out, model, args.scope, release_pk=keys.release_pk,
                                    expiry_days=config.cloud.release_expiry_days)
        if not online:
            return body.tag
        await asyncio.to_thread(sign_release, out, key)
        record = await publish_release(store, config.cloud_data_dir, out, keys.release_pk)
        return f"{record.model}@{record.version}"

    try:
        tag = asyncio.run(_with_store(config, do))
    finally:
        if online and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if online:
        print(f"rolled {model} back for {args.scope}: published rollback release {tag}")
        return 0
    print(f"the release signing key is offline: wrote the unsigned rollback release {tag} to "
          f"{out}")
    print(f"sign it where the key is: edgekeeper cloud release sign {out} --key PATH")
    print(f"then publish it here:     edgekeeper cloud release publish {out}")
    return 0


def _list(model: str | None, args: argparse.Namespace, config: Config) -> int:
    from edgekeeper.cloud.releases import evaluate_rollouts

    async def read(store: Any) -> dict[str, Any]:
        await evaluate_rollouts(store, now=time.time(),
                                canary_seconds=config.cloud.rollout_canary_seconds, model=model)
        groups = {g.device_id: g for g in await store.device_groups()}
        return {
            "releases": [
                {"model": r.model, "version": r.version, "scope": r.scope, "stage": r.stage,
                 "rollback": r.rollback, "published_at": r.published_at,
                 "expires_at": r.expires_at, "etag": r.etag}
                for r in await store.releases(model)],
            "devices": [
                {"device_id": d.device_id, "model": d.model, "running": d.running,
                 "group": groups[d.device_id].group if d.device_id in groups else "",
                 "canary": groups[d.device_id].canary if d.device_id in groups else False,
                 "last_version": d.version, "last_outcome": d.outcome, "reason": d.reason,
                 "at": d.at}
                for d in await store.device_releases(model)],
        }

    doc = asyncio.run(_with_store(config, read))
    if args.json:
        print(json.dumps(doc))
        return 0
    if not doc["releases"]:
        print("no releases published")
    else:
        print(f"{'MODEL':<12} {'VERSION':<10} {'SCOPE':<24} {'STAGE':<9} {'PUBLISHED':<26}")
        for r in doc["releases"]:
            version = r["version"] + (" (rollback)" if r["rollback"] else "")
            print(f"{r['model']:<12} {version:<10} {r['scope']:<24} {r['stage']:<9} "
                  f"{_when(r['published_at']):<26}")
    if doc["devices"]:
        print()
        print(f"{'DEVICE':<24} {'GROUP':<14} {'MODEL':<10} {'RUNNING':<9} LAST REPORT")
        for d in doc["devices"]:
            group = (d["group"] or "-") + (" *" if d["canary"] else "")
            last = f"{d['last_version']} {d['last_outcome']}" + (
                f" ({d['reason']})" if d["reason"] else "") + f" at {_when(d['at'])}"
            print(f"{d['device_id']:<24} {group:<14} {d['model']:<10} "
                  f"{d['running'] or '-':<9} {last}")
    return 0
