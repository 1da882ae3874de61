"""Certificates for TLS tests, made on the spot (cryptography)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest


def make_certs(directory: Path, addresses: Sequence[str] = ()) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, as PEM files.

    The server certificate is good for client authentication too: a service
    presents it when it calls another service (mutual TLS inside the mesh).
    ``addresses``: more IP addresses the certificates name (the hosts of a
    multi-host mesh, ``harness.netns``).
    """
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, str] = {}

    def issue(name: str, issuer_key: Any, issuer: Any, *, ca: bool, usage: Any = None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            usages = usage if isinstance(usage, list) else [usage]
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        *(x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", *addresses)),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files[name], files[f"{name}-key"] = str(directory / f"{name}.pem"), str(directory / f"{name}-key.pem")
        return key, cert.subject

    ca_key, ca_name = issue("ca", None, None, ca=True)
    issue(
        "server",
        ca_key,
        ca_name,
        ca=False,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    issue("client", ca_key, ca_name, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return files
