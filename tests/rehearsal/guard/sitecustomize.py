"""The rehearsal's network guard, imported by every Python process that has this folder on its
PYTHONPATH (the site module imports ``sitecustomize`` at start-up): Snakemake and each of its jobs.

A ``connect`` (or ``connect_ex``, or a ``getaddrinfo`` name lookup) to anything but a loopback
address or a Unix socket fails with ``OSError(ENETUNREACH)`` as on a node without a route, and is
appended, one JSON line per attempt, to the file named by ``PTQ_NETWORK_GUARD_LOG``.
"""

import errno
import ipaddress
import json
import os
import socket
import sys

_LOG = os.environ.get("PTQ_NETWORK_GUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()}


def _is_local(host) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOCAL_NAMES or host == "":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, address) -> OSError:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:3], "call": what, "address": repr(address)}) + "\n")
    return OSError(errno.ENETUNREACH, f"network guard: {what} to {address!r} refused (rehearsal offline)")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


def _remote(sock, address) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0])


def connect(self, address):
    if _remote(self, address):
        raise _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if _remote(self, address):
        _refuse("connect_ex", address)
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _is_local(host):
        raise socket.gaierror(socket.EAI_NONAME, str(_refuse("getaddrinfo", host)))
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
