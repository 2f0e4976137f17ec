"""edgekeeper: an edge-to-cloud event pipeline.

The import package mirrors the repository's folders: ``edgekeeper.device`` (device/),
``edgekeeper.cloud`` (cloud/), ``edgekeeper.protocol`` (protocol/), ``edgekeeper.models``
(models/). This folder holds only what every half shares: the CLI, config, logging, errors.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgekeeper")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
