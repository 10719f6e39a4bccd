"""TLS of the router's two front doors (gRPC and HTTPS), from ``router.tls_*``.

Both servers present the same certificate chain. With ``router.tls_client_ca_file`` both also
require a client certificate signed by that CA (mutual TLS): the handshake fails without one,
so this covers every route and method, health checks and reflection included.

    tls = ServerTLS.from_config(config.router)     # None: TLS off; TLSConfigError: bad files
    server.add_secure_port(address, tls.grpc_credentials())
    uvicorn.Config(app, **tls.uvicorn_options())

``from_config`` reads and checks the files once (present, readable, PEM, key matches the
certificate) so a bad path fails at server start with the config key and the file named, not
inside grpc or uvicorn.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cluster.config import RouterConfig


class TLSConfigError(ValueError):
    """A ``router.tls_*`` file is missing, unreadable or not what the key asks for."""


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"router.{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"router.{key}: {path!r} is not a PEM file (no -----BEGIN line)")
    return data


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str  # "" when clients need no certificate
    cert_chain: bytes  # PEM, as read
    private_key: bytes  # PEM, as read
    client_ca: bytes | None  # PEM, as read; None without mutual TLS

    @classmethod
    def from_config(cls, config: RouterConfig) -> "ServerTLS | None":
        """The files of ``config``, read and checked; None when TLS is off."""
        if not config.tls_cert_file:
            return None
        cert = _read("tls_cert_file", config.tls_cert_file)
        key = _read("tls_key_file", config.tls_key_file)
        ca = _read("tls_client_ca_file", config.tls_client_ca_file) if config.tls_client_ca_file else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # what uvicorn will do; checks key <-> certificate
        try:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"router.tls_cert_file / tls_key_file ({config.tls_cert_file!r}, "
                                 f"{config.tls_key_file!r}): not a certificate chain and its unencrypted private "
                                 f"key: {exc}") from None
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except ssl.SSLError as exc:
                raise TLSConfigError(f"router.tls_client_ca_file {config.tls_client_ca_file!r}: "
                                     f"no CA certificate in it: {exc}") from None
        return cls(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, cert, key, ca)

    @property
    def is_mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)], root_certificates=self.client_ca,
                                           require_client_auth=self.is_mutual)

    def uvicorn_options(self) -> dict[str, Any]:
        """``uvicorn.Config`` keyword arguments (it reads the files again, by path)."""
        options: dict[str, Any] = {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        if self.is_mutual:
            options.update(ssl_ca_certs=self.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options
