"""File descriptors passed over a UNIX socket with the bytes they travel with."""

from __future__ import annotations

import array
import socket

#: fds a single read may carry (Linux hands over one message's worth).
MAX_FDS = 16
# Received fds must not leak into what a task execs.
RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def recv_with_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """``socket.recv_fds``, but close-on-exec (it drops its flags argument)."""
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_LEN(MAX_FDS * 4), RECV_FLAGS)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)
