"""TLS contexts for the link, built from config with errors that name the file.

The envelope protects events and results end to end without TLS (docs/security.md); TLS adds
confidentiality of headers, enrollment and signed requests, and authenticates the server at
enrollment. Two deployments are common:

* a reverse proxy terminates HTTPS in front of ``cloud serve`` (which then listens on
  127.0.0.1): nothing to set here;
* ``cloud serve`` speaks HTTPS itself: ``cloud.tls_cert_file`` + ``cloud.tls_key_file``.

Either way, a cloud whose certificate comes from a private CA needs ``uplink.ca_file`` on the
device: that CA is trusted *in addition to* the system's, for enrollment, uploads and results.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edgekeeper.errors import ConfigError


def client_context(ca_file: str) -> ssl.SSLContext | None:
    """The device's context for https:// cloud URLs; None (aiohttp's default) without a CA."""
    if not ca_file:
        return None
    path = Path(ca_file).expanduser()
    ctx = ssl.create_default_context()  # the system's CAs, hostname checks, TLS >= 1.2
    try:
        ctx.load_verify_locations(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError(
            f"uplink.ca_file {path} does not exist",
            fix="point uplink.ca_file at the PEM file of the CA that signed the cloud's "
            "certificate, or leave it empty to trust only the system's CAs",
        ) from None
    except (ssl.SSLError, OSError, ValueError) as err:
        raise ConfigError(
            f"uplink.ca_file {path} holds no usable CA certificate: {err}",
            fix="give the CA certificate in PEM form (-----BEGIN CERTIFICATE-----)",
        ) from None
    return ctx


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """The ingest's context when it terminates TLS itself; None to serve plain HTTP."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        raise ConfigError(
            "cloud.tls_cert_file and cloud.tls_key_file must be set together",
            fix="set both (PEM certificate chain and its private key), or neither to serve "
            "plain HTTP behind a TLS-terminating proxy",
        )
    cert, key = Path(cert_file).expanduser(), Path(key_file).expanduser()
    for name, path in (("tls_cert_file", cert), ("tls_key_file", key)):
        if not path.is_file():
            raise ConfigError(f"cloud.{name} {path} does not exist",
                              fix=f"point cloud.{name} at a PEM file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError, ValueError) as err:
        raise ConfigError(
            f"cloud.tls_cert_file {cert} / tls_key_file {key} cannot be loaded: {err}",
            fix="give the certificate chain and its matching unencrypted private key in PEM form",
        ) from None
    return ctx
