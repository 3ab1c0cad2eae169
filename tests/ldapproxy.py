"""A TCP proxy in front of a real slapd that can make it lie in its syncrepl answers.

Everything is forwarded as it is, except the server's searchResEntry messages that carry a
Sync State control (the syncrepl stream's entries), and with `sync_info=True` its Sync Info
intermediate responses (new cookies, the present lists of syncIdSet): each is handed, with
its number on that connection, to `tamper`, which returns what to send instead and whether
to close the connection after it. Only the first connection that was tampered with is: a
follower's reconnection then meets the honest server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from ldapsync import ber, syncrepl

# (number of the sync entry on this connection, the whole LDAPMessage) -> (bytes to send, close after)
Tamper = Callable[[int, bytes], tuple[bytes, bool]]
_SYNC_STATE = syncrepl.SYNC_STATE_OID.encode()


class TamperingProxy:
    def __init__(self, host: str, port: int, tamper: Tamper, *, sync_info: bool = False) -> None:
        self._target = (host, port)
        self._tamper = tamper
        self._sync_info = sync_info
        self._tampered = False  # a connection has been tampered with: the rest are honest
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"ldap://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        self._close(src, dst)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        """Server to client, message by message, sync entries through `tamper` (first connection only)."""
        buf = bytearray()
        count = 0
        mine = False  # this connection is the one being tampered with
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                buf += data
                while len(buf) >= 2:
                    size = ber.message_length(buf, 0, len(buf))
                    if size < 0 or size > len(buf):
                        break
                    message = bytes(buf[:size])
                    del buf[:size]
                    if _sync_entry(message) or (self._sync_info and _sync_info(message)):
                        with self._lock:
                            if not self._tampered:
                                self._tampered = mine = True
                        if mine:
                            message, close = self._tamper(count, message)
                            count += 1
                            client.sendall(message)
                            if close:
                                self._close(server, client)
                                return
                            continue
                    client.sendall(message)
        self._close(server, client)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._close(*self._sockets)


def _sync_entry(message: bytes) -> bool:
    msg = ber.frame(message, 0, len(message))
    return msg.op == ber.SEARCH_RES_ENTRY and msg.controls is not None and _SYNC_STATE in message[msg.end :]


def _sync_info(message: bytes) -> bool:
    msg = ber.frame(message, 0, len(message))
    return msg.op == ber.INTERMEDIATE_RESP and syncrepl.SYNC_INFO_OID.encode() in message[msg.start : msg.end]
