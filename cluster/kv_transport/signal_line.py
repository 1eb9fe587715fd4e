"""A pair group's signal line: one TCP connection from the prefill rank to the decode rank that
says, per transfer and in the pair's turn order, whether its KV follows ("ok") or why not.

One hop, no server in between: the prefill end writes a line, the decode end's blocked read
returns. (The pair's TCPStore did this first: a set and a wait through the store's server cost
two hops and a few hundred microseconds on every transfer.) The decode end listens on a port the
OS picks and publishes it in the pair's store; the prefill end reads it there and connects.
"""

from __future__ import annotations

import socket


class SignalLine:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    # ---- making one ----

    @staticmethod
    def listen(host: str) -> socket.socket:
        """The decode end's listening socket, on a free port (``getsockname()[1]``)."""
        server = socket.create_server((host, 0))
        server.listen(1)
        return server

    @staticmethod
    def accept(server: socket.socket, timeout_s: float) -> SignalLine:
        server.settimeout(timeout_s)
        try:
            sock, _ = server.accept()
        finally:
            server.close()
        sock.settimeout(None)
        return SignalLine(sock)

    @staticmethod
    def connect(host: str, port: int, timeout_s: float) -> SignalLine:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.settimeout(None)
        return SignalLine(sock)

    # ---- using it ----

    def send(self, transfer_id: str, word: str) -> None:
        """Prefill end: ``word`` about ``transfer_id`` (neither may hold a tab or a newline)."""
        assert not any(c in s for s in (transfer_id, word) for c in "\t\n"), (transfer_id, word)
        self._sock.sendall(f"{transfer_id}\t{word}\n".encode())

    def receive(self, transfer_id: str, timeout_s: float) -> str:
        """Decode end: the word about ``transfer_id``, the next one on the line; "closed" when
        the line was shut (``shut``, or the peer went away); ``TimeoutError`` after
        ``timeout_s``."""
        while b"\n" not in self._buf:
            self._sock.settimeout(max(timeout_s, 0.001))
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError as e:
                raise TimeoutError(
                    f"no word from prefill about {transfer_id} in {timeout_s:.1f}s"
                ) from e
            except OSError:
                return "closed"
            if not chunk:
                return "closed"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        tid, word = line.decode().split("\t", 1)
        if tid != transfer_id:
            raise RuntimeError(f"signal for {tid} where {transfer_id} was next: turns out of order")
        return word

    def shut(self) -> None:
        """Wake a blocked ``receive`` (it returns "closed") and end the line."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
