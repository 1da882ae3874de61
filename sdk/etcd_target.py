"""etcd endpoint URLs as one grpc channel: the address list, the scheme, TLS.

Shared by the services' etcd layer (:mod:`mabeam.runtime.etcd`) and the
SDK's discovery (:mod:`mabeam.discovery`), which both talk to etcd over a
channel made here. Pure grpc: nothing of etcd's client library is imported.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from grpc import aio

from mabeam.tls import TLS


def split(endpoints: Sequence[str]) -> tuple[list[tuple[str, int]], bool]:
    if not endpoints:
        raise ValueError("no etcd endpoints")
    hosts: list[tuple[str, int]] = []
    schemes: set[str] = set()
    for raw in endpoints:
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {raw!r}: the scheme is http or https")
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None:
            raise ValueError(f"etcd endpoint {raw!r} needs a host and a port, e.g. http://127.0.0.1:2379")
        schemes.add(url.scheme)
        hosts.append((url.hostname, port))
    if len(schemes) > 1:
        raise ValueError(f"etcd endpoints mix http and https: {list(endpoints)}")
    return hosts, schemes == {"https"}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address_list(hosts: Sequence[tuple[str, int]]) -> str:
    if all(ipaddress.ip_address(h).version == 4 for h, _ in hosts):
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    if all(ipaddress.ip_address(h).version == 6 for h, _ in hosts):
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)
    raise ValueError("grpc cannot mix IPv4 and IPv6 addresses in one target")


def grpc_target(endpoints: Sequence[str]) -> tuple[str, bool]:
    """The grpc target for etcd endpoint URLs, and whether they use https.

    One endpoint is ``host:port`` (grpc's DNS resolver, every address of the
    name); several IP endpoints are one address list for ``pick_first``::

        grpc_target(["http://127.0.0.1:2379", "http://127.0.0.1:2479"])
        == ("ipv4:127.0.0.1:2379,127.0.0.1:2479", False)

    Several endpoints given by name have no grpc target (grpc has no list of
    names): :func:`connect` resolves them first. ValueError here.
    """
    hosts, secure = split(endpoints)
    if len(hosts) == 1:
        host, port = hosts[0]
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), secure
    if not all(_is_ip(h) for h, _ in hosts):
        raise ValueError("several etcd endpoints by name: resolve them to addresses first (connect does)")
    return _address_list(hosts), secure


async def _resolve(hosts: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    out: list[tuple[str, int]] = []
    for host, port in hosts:
        if _is_ip(host):
            out.append((host, port))
            continue
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            address = (str(sockaddr[0]), port)
            if address not in out:
                out.append(address)
    v4 = [a for a in out if ipaddress.ip_address(a[0]).version == 4]
    # grpc takes one family per list; IPv4 is what compose networks and loopback use.
    return v4 or out


async def open_channel(
    endpoints: Sequence[str], tls: TLS | None, options: Sequence[tuple[str, Any]]
) -> aio.Channel:
    """An aio channel to the etcd ``endpoints`` (``pick_first`` over several members).

    https, or ``tls`` given, means TLS. Several endpoints given by name are
    resolved once, now.
    """
    hosts, secure = split(endpoints)
    opts = list(options)
    if len(hosts) == 1:
        target, _ = grpc_target(endpoints)
    else:
        target = _address_list(await _resolve(hosts))
        if secure or tls is not None:
            # An address list has no host name to check certificates
            # against: check the first endpoint's (name or IP SAN).
            named = [h for h, _ in hosts if not _is_ip(h)]
            opts.append(("grpc.ssl_target_name_override", named[0] if named else hosts[0][0]))
    if secure or tls is not None:
        return aio.secure_channel(target, (tls or TLS()).channel_credentials(), options=opts)
    return aio.insecure_channel(target, options=opts)
