"""The one device-id rule. The wire (envelope headers, bodies, signed requests), the config's
``device.id``, the enrollment and every command that takes a device id check it here, so an id
the cloud would refuse is refused at the first place it is typed, with the same words.

ASCII only: an id names files, log fields, queue keys ("id:seq") and HTTP headers, where the
Unicode letters and digits ``str.isalnum()`` takes ("dév", "٣") do not belong.
"""

from __future__ import annotations

import re

_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_ID_RULE = "1 to 64 ASCII letters, digits, '-', '_' or '.'"


def valid_device_id(device_id: object) -> bool:
    """True when ``device_id`` follows DEVICE_ID_RULE."""
    return isinstance(device_id, str) and _DEVICE_ID.fullmatch(device_id) is not None


def device_id_problem(device_id: object, field: str) -> str | None:
    """None for a valid id, else one line naming ``field``, the value and the rule: callers
    raise it as their own error (ConfigError, InputError, InvalidRequest) with their fix."""
    if valid_device_id(device_id):
        return None
    return f"{field} = {device_id!r} is not a device id: expected {DEVICE_ID_RULE}"
