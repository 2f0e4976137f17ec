"""The envelope and bodies: round trips, and every way a message is refused.

The bit-flip tests flip every bit of every byte of real envelopes, attribute each byte to the
field it belongs to (docs/protocol.md's byte layout), and require each variant to be refused with
a ProtocolError whose code fits that field.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import time
from pathlib import Path

import msgpack
import pytest
from nacl.public import Box, PrivateKey

from edgekeeper.errors import ConfigError
from edgekeeper.protocol import envelope as E
from edgekeeper.protocol.errors import (
    ALL_ERRORS,
    AuthenticationFailed,
    DeviceRevoked,
    InvalidBody,
    MalformedEnvelope,
    MissingSignature,
    PayloadTooLarge,
    ProtocolError,
    StaleMessage,
    UnknownDevice,
    UnsupportedVersion,
)
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, DevicePublicKeys
from edgekeeper.protocol.messages import EventBody, ResultBody, payload_digest

from cloudkit import jpeg, make_event

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 300.0
DEV = "pi-kitchen"


@pytest.fixture(scope="module")
def device() -> DeviceKeys:
    return DeviceKeys.generate()


@pytest.fixture(scope="module")
def cloud() -> PrivateKey:
    return PrivateKey.generate()


def strict(device: DeviceKeys, *, revoked: bool = False) -> E.Lookup:
    pub = DevicePublicKeys(DEV, device.sign_pk, device.box_pk, revoked=revoked)
    return lambda device_id: pub if device_id == DEV else None


def permissive(device: DeviceKeys) -> E.Lookup:
    """Answers with the device's keys for ANY id: a flipped id must then fail authentication."""
    return lambda device_id: DevicePublicKeys(device_id, device.sign_pk, device.box_pk)


def small_body(seq: int = 7) -> EventBody:
    return EventBody(
        device_id=DEV, seq=seq, captured_at=1_790_000_000.25,
        meta={"label": "person", "scores": {"person": 0.9}}, frames=(jpeg(300),),
        audio_wav=b"RIFF\x24\x00\x00\x00WAVEfmt ", features=b"\x00" * 8,
        features_dtype="float32", features_shape=(2,), priority=3,
    )


def field_spans(env: bytes) -> list[tuple[str, int, int]]:
    """(field, start, end) for every byte of an envelope, following docs/protocol.md."""
    version, kind, header, _seed, box = msgpack.unpackb(env)
    device_id, seq, ts, tag, phash = msgpack.unpackb(header)
    spans: list[tuple[str, int, int]] = []
    pos = 0

    def add(name: str, n: int) -> None:
        nonlocal pos
        spans.append((name, pos, pos + n))
        pos += n

    add("array_marker", 1)
    add("version", len(msgpack.packb(version)))
    add("kind", len(msgpack.packb(kind)))
    add("header_marker", len(msgpack.packb(header)) - len(header))
    add("header.array_marker", 1)
    add("header.device_id", len(msgpack.packb(device_id)))
    add("header.seq", len(msgpack.packb(seq)))
    add("header.timestamp", len(msgpack.packb(ts)))
    add("header.tag", len(msgpack.packb(tag)))
    add("header.payload_hash", len(msgpack.packb(phash)))
    add("nonce_marker", 2)
    add("nonce", 24)
    add("box_marker", len(msgpack.packb(box)) - len(box))
    add("box.mac", 16)
    add("box.ciphertext", len(box) - 16)
    assert pos == len(env)
    return spans


def flip_all(env: bytes):  # type: ignore[no-untyped-def]
    for name, start, end in field_spans(env):
        for i in range(start, end):
            for bit in range(8):
                mutated = bytearray(env)
                mutated[i] ^= 1 << bit
                yield name, i, bytes(mutated)


# Which codes a flipped bit in each field may legitimately produce (all are refusals).
FIELD_CODES = {
    "array_marker": {"malformed_envelope"},
    "version": {"unsupported_version", "malformed_envelope"},
    "kind": {"malformed_envelope"},
    "header_marker": {"malformed_envelope"},
    "header.array_marker": {"malformed_envelope"},
    "header.device_id": {"malformed_envelope", "auth_failed"},
    "header.seq": {"malformed_envelope", "auth_failed"},
    "header.timestamp": {"malformed_envelope", "auth_failed"},
    "header.tag": {"malformed_envelope", "auth_failed"},
    "header.payload_hash": {"malformed_envelope", "auth_failed"},
    "nonce_marker": {"malformed_envelope"},
    "nonce": {"auth_failed"},
    "box_marker": {"malformed_envelope"},
    "box.mac": {"auth_failed"},
    "box.ciphertext": {"auth_failed"},
}


def test_event_round_trip(device: DeviceKeys, cloud: PrivateKey) -> None:
    body = make_event(DEV, 42, frame_bytes=50_000)
    sent = time.time()
    env = E.seal_event(body, device=device, cloud_box_pk=bytes(cloud.public_key), sent_at=sent,
                       model_version="person@1.0.0")
    opened = E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=sent,
                          window_s=WINDOW, verify_payload_hash=True)
    assert opened.body == body
    assert (opened.device_id, opened.seq, opened.model_version) == (DEV, 42, "person@1.0.0")
    assert opened.sent_at == sent
    assert opened.payload_hash == payload_digest(body.encode())
    assert opened.envelope == env
    assert E.peek_header(env).seq == 42


def test_seal_from_stored_bytes_and_digest_matches_sealing_the_body(
    device: DeviceKeys, cloud: PrivateKey
) -> None:
    # The outbox stores encode() bytes and their digest; sealing those must be equivalent.
    body = small_body()
    encoded = body.encode()
    env = E.seal_event(encoded, device=device, cloud_box_pk=bytes(cloud.public_key),
                       sent_at=100.0, model_version="m@1", payload_hash=payload_digest(encoded))
    opened = E.open_event(env, cloud_box_sk=bytes(cloud), lookup=strict(device), now=100.0,
                          window_s=1.0, verify_payload_hash=True)
    assert opened.body == body and opened.body_bytes == encoded


def test_envelope_bytes_are_plain_msgpack(device: DeviceKeys, cloud: PrivateKey) -> None:
    # The sealer writes the framing by hand (to encrypt in place); it must be exactly what
    # msgpack.packb writes, whichever bin length form the box needs (16- or 32-bit here).
    for size in (10, 300, 70_000):
        body = make_event(DEV, 1, frame_bytes=size)
        env = E.seal_event(body, device=device, cloud_box_pk=bytes(cloud.public_key),
                           sent_at=1.0, model_version="m")
        items = msgpack.unpackb(env)
        assert msgpack.packb(items, use_bin_type=True) == env
        assert items[:2] == [1, 1] and len(items[3]) == 24
        # The box is what nacl.public.Box makes under the nonce derived as docs/protocol.md says.
        nonce = hashlib.sha256(b"edgekeeper-envelope-v1" + b"\x01\x01" + items[2]
                               + items[3]).digest()[:24]
        expected = Box(device.box_key, cloud.public_key).encrypt(body.encode(), nonce)
        assert items[4] == expected.ciphertext


def test_each_seal_is_fresh_but_payload_hash_is_stable(
    device: DeviceKeys, cloud: PrivateKey
) -> None:
    body = small_body()
    a = E.seal_event(body, device=device, cloud_box_pk=bytes(cloud.public_key), sent_at=1.0,
                     model_version="m")
    b = E.seal_event(body, device=device, cloud_box_pk=bytes(cloud.public_key), sent_at=1.0,
                     model_version="m")
    assert a != b  # new nonce every time
    assert E.peek_header(a).payload_hash == E.peek_header(b).payload_hash


@pytest.mark.parametrize("lookup_kind", ["strict", "permissive"])
def test_every_bit_flip_in_every_field_of_an_event_is_refused(
    device: DeviceKeys, cloud: PrivateKey, lookup_kind: str
) -> None:
    env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                       sent_at=1_790_000_100.0, model_version="person@1.0.0")
    lookup = strict(device) if lookup_kind == "strict" else permissive(device)
    seen: dict[str, set[str]] = {}
    variants = 0
    for name, index, mutated in flip_all(env):
        variants += 1
        with pytest.raises(ProtocolError) as info:
            E.open_event(mutated, cloud_box_sk=cloud, lookup=lookup, now=1_790_000_100.0,
                         window_s=WINDOW)
        code = info.value.code
        allowed = set(FIELD_CODES[name])
        if lookup_kind == "strict" and name == "header.device_id":
            allowed.add("unknown_device")
        assert code in allowed, f"byte {index} ({name}) refused as {code}"
        seen.setdefault(name, set()).add(code)
    assert variants == len(env) * 8
    assert set(seen) == set(FIELD_CODES)  # every field was flipped
    # With any id accepted, only cryptography can catch a changed header: it must.
    if lookup_kind == "permissive":
        for name in ("header.seq", "header.timestamp", "header.payload_hash", "header.device_id"):
            assert "auth_failed" in seen[name]


def test_every_bit_flip_of_a_result_is_refused(device: DeviceKeys, cloud: PrivateKey) -> None:
    result = ResultBody(DEV, 7, "echo", "person", 0.5, "s", "none", None, True, 1.0, {"k": [1]})
    env = E.seal_result(result, cloud_box_sk=cloud, device_box_pk=device.box_pk)
    assert E.open_result(env, device=device, device_id=DEV,
                         cloud_box_pk=bytes(cloud.public_key)).body == result
    for name, index, mutated in flip_all(env):
        with pytest.raises(ProtocolError) as info:
            E.open_result(mutated, device=device, device_id=DEV,
                          cloud_box_pk=bytes(cloud.public_key))
        assert info.value.code in FIELD_CODES[name], f"byte {index} ({name}): {info.value.code}"


def test_truncated_and_extended_envelopes_are_refused(
    device: DeviceKeys, cloud: PrivateKey
) -> None:
    env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                       sent_at=5.0, model_version="m")
    for cut in range(len(env)):
        with pytest.raises(MalformedEnvelope):
            E.open_event(env[:cut], cloud_box_sk=cloud, lookup=strict(device), now=5.0,
                         window_s=WINDOW)
    with pytest.raises(MalformedEnvelope):
        E.open_event(env + b"\x00", cloud_box_sk=cloud, lookup=strict(device), now=5.0,
                     window_s=WINDOW)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", os.urandom(200), msgpack.packb({"a": 1}), msgpack.packb([1, 1, b"x", b"y"]),
     msgpack.packb([1, 1, b"h", b"n" * 24, b"b" * 64, 5]), msgpack.packb("text"),
     msgpack.packb([True, 1, b"h", b"n" * 24, b"b" * 64]), b"\xc1" * 10,
     msgpack.packb([1, 1, msgpack.packb([DEV, -1, 1.0, "m", b"h" * 32]), b"n" * 24, b"b" * 64]),
     msgpack.packb([1, 1, msgpack.packb([DEV, 1, 1, "m", b"h" * 32]), b"n" * 24, b"b" * 64]),
     msgpack.packb([1, 1, msgpack.packb(["bad id!", 1, 1.0, "m", b"h" * 32]), b"n" * 24,
                    b"b" * 64]),
     msgpack.packb([1, 1, msgpack.packb([DEV, 1, math.nan, "m", b"h" * 32]), b"n" * 24,
                    b"b" * 64]),
     msgpack.packb([1, 3, msgpack.packb([DEV, 1, 1.0, "m", b"h" * 32]), b"n" * 24, b"b" * 64])],
)
def test_garbage_is_malformed(data: bytes, device: DeviceKeys, cloud: PrivateKey) -> None:
    with pytest.raises(MalformedEnvelope) as info:
        E.open_event(data, cloud_box_sk=cloud, lookup=permissive(device), now=1.0,
                     window_s=WINDOW)
    assert info.value.status == 400


def test_version_2_is_named_unsupported(device: DeviceKeys, cloud: PrivateKey) -> None:
    env = msgpack.packb([2, 1, b"h", b"n" * 24, b"b" * 64])
    with pytest.raises(UnsupportedVersion):
        E.open_event(env, cloud_box_sk=cloud, lookup=permissive(device), now=1.0, window_s=1.0)


def test_oversized_is_refused_before_parsing(device: DeviceKeys, cloud: PrivateKey) -> None:
    env = E.seal_event(make_event(DEV, 1, frame_bytes=20_000), device=device,
                       cloud_box_pk=bytes(cloud.public_key), sent_at=1.0, model_version="m")
    with pytest.raises(PayloadTooLarge) as info:
        E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=1.0, window_s=WINDOW,
                     max_bytes=len(env) - 1)
    assert info.value.status == 413


def test_unknown_revoked_and_wrong_keys(device: DeviceKeys, cloud: PrivateKey) -> None:
    env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                       sent_at=1.0, model_version="m")
    kw = {"cloud_box_sk": cloud, "now": 1.0, "window_s": WINDOW}
    with pytest.raises(UnknownDevice):
        E.open_event(env, lookup=lambda _id: None, **kw)
    with pytest.raises(DeviceRevoked):
        E.open_event(env, lookup=strict(device, revoked=True), **kw)
    other = DeviceKeys.generate()  # same id, other keys: an impostor
    with pytest.raises(AuthenticationFailed):
        E.open_event(env, lookup=strict(other), **kw)
    with pytest.raises(AuthenticationFailed):  # sealed to another cloud
        E.open_event(env, lookup=strict(device), **{**kw, "cloud_box_sk": PrivateKey.generate()})


@pytest.mark.parametrize("skew", [-WINDOW - 1, WINDOW + 1, -10 * WINDOW, 1e9])
def test_outside_the_window_is_stale(device: DeviceKeys, cloud: PrivateKey, skew: float) -> None:
    now = 1_790_000_000.0
    env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                       sent_at=now + skew, model_version="m")
    with pytest.raises(StaleMessage) as info:
        E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=now, window_s=WINDOW)
    assert info.value.code == "stale" and info.value.status == 401
    # The worker re-opens queued events later without the window:
    assert E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=None,
                        window_s=0).seq == 7


def test_inside_the_window_is_accepted(device: DeviceKeys, cloud: PrivateKey) -> None:
    now = 1_790_000_000.0
    for skew in (-WINDOW, 0.0, WINDOW):
        env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                           sent_at=now + skew, model_version="m")
        assert E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=now,
                            window_s=WINDOW).sent_at == now + skew


def _seal_raw(device: DeviceKeys, cloud: PrivateKey, header_seq: int, body: bytes,
              phash: bytes | None = None) -> bytes:
    header = E._encode_header(DEV, header_seq, 1.0, "m", phash or payload_digest(body))
    return E._seal(E.KIND_EVENT, header, body, device.box_sk, bytes(cloud.public_key))


def test_body_must_agree_with_header(device: DeviceKeys, cloud: PrivateKey) -> None:
    env = _seal_raw(device, cloud, 8, small_body(seq=7).encode())
    with pytest.raises(InvalidBody, match="seq"):
        E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=1.0, window_s=WINDOW)


def test_payload_hash_mismatch_is_caught_when_verifying(
    device: DeviceKeys, cloud: PrivateKey
) -> None:
    env = _seal_raw(device, cloud, 7, small_body().encode(), phash=b"\x01" * 32)
    with pytest.raises(InvalidBody, match="payload_hash"):
        E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=1.0, window_s=WINDOW,
                     verify_payload_hash=True)


@pytest.mark.parametrize(
    "raw",
    [
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"device_id": DEV}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "extra": 1}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "meta": {"raw": b"bytes"}}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "meta": {"x": math.inf}}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "meta": {1: "int key"}},
                      strict_types=False),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "frames": [b"PNG..."]}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "features_shape": [3]}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "priority": 1000}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "seq": "7"}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "audio_wav": b"MP3"}),
        msgpack.packb({**msgpack.unpackb(small_body().encode()), "features_dtype": "float128"}),
    ],
)
def test_invalid_bodies_are_refused_after_authentication(
    device: DeviceKeys, cloud: PrivateKey, raw: bytes
) -> None:
    env = _seal_raw(device, cloud, 7, raw)
    with pytest.raises(InvalidBody) as info:
        E.open_event(env, cloud_box_sk=cloud, lookup=strict(device), now=1.0, window_s=WINDOW)
    assert info.value.code == "invalid_body" and info.value.status == 400


def test_constructors_refuse_what_decode_would() -> None:
    with pytest.raises(InvalidBody):
        EventBody(DEV, 1, 0.0, meta={"b": b"x"})
    with pytest.raises(InvalidBody):
        EventBody("bad id", 1, 0.0)
    with pytest.raises(InvalidBody):
        EventBody(DEV, -1, 0.0)
    with pytest.raises(InvalidBody):
        EventBody(DEV, 1, 0.0, features=b"1234", features_dtype="float32", features_shape=(2,))
    with pytest.raises(InvalidBody):
        ResultBody(DEV, 1, "echo", "x", 1.5, "", "", None, True, 0.0, {})
    with pytest.raises(InvalidBody):
        ResultBody(DEV, 1, "", "x", 0.5, "", "", None, True, 0.0, {})


def test_result_for_another_device_or_from_another_cloud_is_refused(
    device: DeviceKeys, cloud: PrivateKey
) -> None:
    result = ResultBody(DEV, 7, "echo", "person", 0.5, "s", "none", True, True, 1.0, {})
    env = E.seal_result(result, cloud_box_sk=cloud, device_box_pk=device.box_pk)
    with pytest.raises(AuthenticationFailed):
        E.open_result(env, device=device, device_id="other", cloud_box_pk=bytes(cloud.public_key))
    impostor = PrivateKey.generate()  # someone holding only our public key forges a result
    forged = E.seal_result(result, cloud_box_sk=impostor, device_box_pk=device.box_pk)
    with pytest.raises(AuthenticationFailed):
        E.open_result(forged, device=device, device_id=DEV, cloud_box_pk=bytes(cloud.public_key))
    event_env = E.seal_event(small_body(), device=device, cloud_box_pk=bytes(cloud.public_key),
                             sent_at=1.0, model_version="m")
    with pytest.raises(MalformedEnvelope):  # an event is not a result
        E.open_result(event_env, device=device, device_id=DEV,
                      cloud_box_pk=bytes(cloud.public_key))


# --- signed requests ----------------------------------------------------------------------

REQ = {"method": "GET", "path": "/v1/results", "query": "cursor=3&wait=10&limit=20", "body": b""}


def test_signed_request_verifies(device: DeviceKeys) -> None:
    headers = E.sign_request(device, device_id=DEV, timestamp=1000.0, **REQ)
    assert E.verify_request(headers, lookup=strict(device), now=1000.0, window_s=30,
                            **REQ).device_id == DEV


@pytest.mark.parametrize(
    "change",
    [{"method": "POST"}, {"path": "/v1/results/ack"}, {"query": "cursor=0&wait=10&limit=20"},
     {"body": b"{}"}],
)
def test_tampered_request_fails(device: DeviceKeys, change: dict[str, object]) -> None:
    headers = E.sign_request(device, device_id=DEV, timestamp=1000.0, **REQ)
    with pytest.raises(AuthenticationFailed):
        E.verify_request(headers, lookup=strict(device), now=1000.0, window_s=30,
                         **{**REQ, **change})  # type: ignore[arg-type]


def test_request_header_tampering_and_staleness(device: DeviceKeys) -> None:
    headers = E.sign_request(device, device_id=DEV, timestamp=1000.0, **REQ)
    kw = {"lookup": strict(device), "window_s": 30.0, **REQ}
    with pytest.raises(AuthenticationFailed):
        E.verify_request({**headers, E.HEADER_TIMESTAMP: "1000.001"}, now=1000.0, **kw)
    with pytest.raises(StaleMessage):
        E.verify_request(headers, now=1031.0, **kw)
    with pytest.raises(MissingSignature):
        E.verify_request({}, now=1000.0, **kw)
    with pytest.raises(MissingSignature):
        E.verify_request({**headers, E.HEADER_SIGNATURE: "!!"}, now=1000.0, **kw)
    with pytest.raises(MissingSignature):
        E.verify_request({**headers, E.HEADER_TIMESTAMP: "nan"}, now=1000.0, **kw)
    with pytest.raises(UnknownDevice):
        E.verify_request({**headers, E.HEADER_DEVICE: "someone"}, now=1000.0, **kw)
    with pytest.raises(DeviceRevoked):
        E.verify_request(headers, now=1000.0, **{**kw, "lookup": strict(device, revoked=True)})
    other = DeviceKeys.generate()
    forged = E.sign_request(other, device_id=DEV, timestamp=1000.0, **REQ)
    with pytest.raises(AuthenticationFailed):
        E.verify_request(forged, now=1000.0, **kw)



@pytest.mark.parametrize(
    "ts",
    ["\uff11\uff10\uff10\uff10", "1000\xa0", "1_000", " 1000", "1e3", "inf", "-1000", "0x3e8", ""],
)
def test_request_timestamp_other_than_ascii_digits_is_refused(device: DeviceKeys, ts: str) -> None:
    # float() takes all of these; only digits with an optional fraction are what a signer writes
    # (the non-ASCII ones used to escape as UnicodeEncodeError: a 500 from the ingest).
    headers = {**E.sign_request(device, device_id=DEV, timestamp=1000.0, **REQ),
               E.HEADER_TIMESTAMP: ts}
    with pytest.raises(MissingSignature):
        E.verify_request(headers, lookup=strict(device), now=1000.0, window_s=30, **REQ)


def test_request_path_no_signer_could_write_is_refused(device: DeviceKeys) -> None:
    headers = E.sign_request(device, device_id=DEV, timestamp=1000.0, **REQ)
    with pytest.raises(AuthenticationFailed):
        E.verify_request(headers, lookup=strict(device), now=1000.0, window_s=30,
                         **{**REQ, "path": "/v1/res\udcffults"})  # type: ignore[arg-type]


# --- keys ---------------------------------------------------------------------------------


def test_device_keys_are_saved_0600_and_refused_when_readable(tmp_path: Path) -> None:
    keys = DeviceKeys.generate()
    keys.save(tmp_path / "keys")
    for name in ("device-sign.key", "device-box.key"):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    loaded = DeviceKeys.load(tmp_path / "keys")
    assert (loaded.sign_pk, loaded.box_pk) == (keys.sign_pk, keys.box_pk)
    assert "sign_pk" in repr(keys) and keys.box_sk.hex() not in repr(keys)
    os.chmod(tmp_path / "keys" / "device-box.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        DeviceKeys.load(tmp_path / "keys")


def test_cloud_public_keys_round_trip(tmp_path: Path) -> None:
    pub = CloudPublicKeys(box_pk=b"\x01" * 32, release_pk=b"\x02" * 32)
    pub.save(tmp_path / "cloud.json")
    assert CloudPublicKeys.load(tmp_path / "cloud.json") == pub
    (tmp_path / "bad.json").write_text('{"box_pk": "AAAA", "release_pk": ""}')
    with pytest.raises(ConfigError, match="not valid"):
        CloudPublicKeys.load(tmp_path / "bad.json")


def test_error_codes_match_the_protocol_doc() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    rows = dict(
        (code, int(status))
        for status, code in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", doc, re.MULTILINE)
    )
    for err in ALL_ERRORS:
        assert rows.get(err.code) == err.status, f"{err.code} is not documented as {err.status}"
        assert err("x").to_json()["error"]["code"] == err.code
