"""TLS settings: one type for servers, clients and the etcd connection.

A :class:`TLS` names PEM files. What each field means depends on the side:

==============  ====================================  ==========================================
field           a server (``MeshServer``)             a client (``MeshClient``, etcd, a service's
                                                      own calls)
==============  ====================================  ==========================================
``cert_file``   its certificate (required)            its certificate, for mutual TLS
``key_file``    its private key (required)            its private key, for mutual TLS
``ca_file``     CA that client certificates must      CA that the server's certificate must chain
                chain to: mutual TLS on               to (None: the system roots)
``server_name`` unused                                name to check the server's certificate
                                                      against, when it is not the address's
==============  ====================================  ==========================================

A service uses one ``TLS`` both ways: it serves with its certificate, and
its calls to other services and agents present that certificate and trust
the same CA (one CA per mesh).

Example::

    tls = TLS(cert_file="server.pem", key_file="server-key.pem", ca_file="ca.pem")
    client = await MeshClient.connect(registry="127.0.0.1:50051",
                                      tls=TLS(ca_file="ca.pem", cert_file="client.pem",
                                              key_file="client-key.pem"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class TLS:
    """PEM files for one side of a TLS connection (see the module doc)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS: cert_file and key_file go together")

    @property
    def mutual(self) -> bool:
        """For a server: client certificates are required (a CA is given)."""
        return self.ca_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a client channel (files read now, once)."""
        import grpc  # not at import: the `mabeam` command reads its config before grpc may load

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a server; with a CA, clients must present a certificate."""
        import grpc

        key, cert = _read(self.key_file), _read(self.cert_file)
        if key is None or cert is None:
            raise ValueError("TLS for a server needs cert_file and key_file")
        ca = _read(self.ca_file)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
