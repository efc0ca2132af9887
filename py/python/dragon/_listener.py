"""A TCP listener that serves each connection on a thread of its own (the object server
and the PMI service are both one)."""

from __future__ import annotations

import socket
import threading


class Listener:
    """Listens on ``host`` (port chosen by the OS) and calls ``self._serve(conn)`` on a new
    daemon thread for each connection, until ``close``."""

    def __init__(self, host: str, name: str, backlog: int = 64):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, 0), family=family, backlog=backlog)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._name = name
        self._closed = False
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Stops accepting; connections being served go on until they end."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._name}-conn", daemon=True).start()
