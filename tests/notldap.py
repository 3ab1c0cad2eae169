"""A TCP server that answers every request with HTTP, on a free loopback port.

Stands in for a wrong port in `uri` (a web server where slapd was expected). The answer is
sized so that ldap3 frames it as one LDAP message and fails inside its decoder, which is
what happens with real web servers' longer answers now and then.
"""

from __future__ import annotations

import contextlib
import socket
import threading

HEAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nX-Pad: "
# ldap3 reads the second byte ("T", 84) as the message length: exactly 86 bytes then decode
ANSWER = HEAD + b"x" * (86 - len(HEAD) - 4) + b"\r\n\r\n"


class HttpServer:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.uri = f"ldap://127.0.0.1:{self.port}"
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(4096):  # answer each request, keep the connection open like a keep-alive server
                client.sendall(ANSWER)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for c in self._clients:
                with contextlib.suppress(OSError):
                    c.close()
