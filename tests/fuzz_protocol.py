"""Coverage-guided fuzzing of everything the protocol parses from the network (not run by CI).

Each target hands untrusted bytes to one entry point; the only acceptable outcomes are success
or a ``ProtocolError`` (which the ingest turns into a 4xx JSON error). Anything else would be a
500 with a traceback in the log, so the fuzzer reports it as a crash with the input that made it.

    pip install atheris
    python tests/fuzz_protocol.py -max_total_time=300          # all targets, 5 minutes
    python tests/fuzz_protocol.py crash-<hash>                 # replay one finding

Targets: envelope parsing (``peek_header``), body decoding (``EventBody``/``ResultBody``),
opening a valid event or result envelope with a few bytes changed, and ``verify_request`` with
fuzzed headers, method and path for an enrolled device (so the fuzzer gets past the registry
lookup). Found so far: a non-ASCII ``X-Edgekeeper-Timestamp`` escaped as UnicodeEncodeError
(fixed 2026-12-01).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from edgekeeper.protocol import envelope as E
    from edgekeeper.protocol.errors import ProtocolError
    from edgekeeper.protocol.keys import DeviceKeys
    from edgekeeper.protocol.messages import EventBody, ResultBody

from nacl.public import PrivateKey

DEVICE_ID = "cam-1"
DEVICE = DeviceKeys.generate()
CLOUD = PrivateKey.generate()
CLOUD_PK = bytes(CLOUD.public_key)
ENROLLED = DEVICE.public(DEVICE_ID)
NOW = 1_000_000.0


def lookup(device_id: str) -> object:
    return ENROLLED if device_id == DEVICE_ID else None


_BODY = EventBody(DEVICE_ID, 7, NOW, meta={"label": "person", "score": 0.9},
                  frames=(b"\xff\xd8jpeg",), priority=3)
EVENT = E.seal_event(_BODY, device=DEVICE, cloud_box_pk=CLOUD_PK, sent_at=NOW,
                     model_version="person@1")
EVENT_BODY = _BODY.encode()
RESULT = E.seal_result(
    ResultBody(device_id=DEVICE_ID, seq=7, reasoner="echo", label="person", confidence=0.9,
               summary="a person at the door", action="notify", gate_correct=True,
               provisional=False, produced_at=NOW),
    cloud_box_sk=CLOUD, device_box_pk=DEVICE.box_pk,
)


def _mutate(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        if not fdp.remaining_bytes():
            break
        out[fdp.ConsumeIntInRange(0, len(out) - 1)] = fdp.ConsumeIntInRange(0, 255)
    return bytes(out)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 6)
    try:
        if target == 0:
            E.peek_header(fdp.ConsumeBytes(fdp.remaining_bytes()))
        elif target == 1:
            EventBody.decode(fdp.ConsumeBytes(fdp.remaining_bytes()))
        elif target == 2:
            ResultBody.decode(fdp.ConsumeBytes(fdp.remaining_bytes()))
        elif target == 3:
            E.open_event(_mutate(fdp, EVENT), cloud_box_sk=CLOUD, lookup=lookup, now=NOW,
                         window_s=60.0, verify_payload_hash=fdp.ConsumeBool())
        elif target == 4:
            E.open_result(_mutate(fdp, RESULT), device=DEVICE, device_id=DEVICE_ID,
                          cloud_box_pk=CLOUD_PK)
        elif target == 5:
            EventBody.decode(_mutate(fdp, EVENT_BODY))
        else:
            signed = E.sign_request(DEVICE, device_id=DEVICE_ID, method="GET",
                                    path="/v1/results", query="cursor=0", timestamp=NOW)
            headers = {
                E.HEADER_DEVICE: DEVICE_ID if fdp.ConsumeBool() else fdp.ConsumeUnicode(70),
                E.HEADER_TIMESTAMP: signed[E.HEADER_TIMESTAMP] if fdp.ConsumeBool()
                else fdp.ConsumeUnicode(24),
                E.HEADER_SIGNATURE: signed[E.HEADER_SIGNATURE] if fdp.ConsumeBool()
                else fdp.ConsumeUnicode(90),
            }
            E.verify_request(
                headers,
                method="GET" if fdp.ConsumeBool() else fdp.ConsumeUnicode(8),
                path="/v1/results" if fdp.ConsumeBool() else fdp.ConsumeUnicode(20),
                query="cursor=0" if fdp.ConsumeBool() else fdp.ConsumeUnicode(20),
                body=fdp.ConsumeBytes(fdp.remaining_bytes()),
                lookup=lookup, now=NOW, window_s=60.0,
            )
    except ProtocolError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
