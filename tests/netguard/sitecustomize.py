"""A socket guard for tests: with this folder first on PYTHONPATH, a Python process refuses every
connection and name lookup except loopback and Unix sockets; each refused address is appended to the
file ``$NETGUARD_LOG`` (where set), so that a library that retries quietly or falls back to its cache
cannot hide that it tried."""

import ipaddress
import os
import socket

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # a Unix socket path
        return True
    host = str(address[0])
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(address) -> None:
    log = os.environ.get("NETGUARD_LOG")
    if log:
        with open(log, "a") as stream:
            stream.write(f"{os.getpid()} {address!r}\n")
    raise ConnectionRefusedError(f"netguard: no network in this test ({address!r})")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guarded_connect(self, address):
    if not _is_local(address):
        _refuse(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        _refuse(address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local((host if isinstance(host, str) else host.decode(), 0)):
        _refuse((host, *args[:1]))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
