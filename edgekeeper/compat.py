"""What Python 3.10 lacks (JetPack 6 ships 3.10; Raspberry Pi OS Bookworm 3.11).

``asyncio.TaskGroup`` and ``asyncio.timeout`` arrived in 3.11; on 3.10 the ``taskgroup``
backport provides the same classes. Import them from here, never from asyncio directly.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup, timeout
else:  # pragma: no cover - exercised on 3.10 only
    from taskgroup import TaskGroup, timeout

__all__ = ["TaskGroup", "timeout"]
