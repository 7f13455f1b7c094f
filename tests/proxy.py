"""A TCP proxy for fault tests: cut, partition or take down a server's connections."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttableProxy:
    """A loopback TCP proxy to `port`; `cut()` drops every open connection at once,
    `blackhole()` … `heal()` is a partition (like `iptables -j DROP`), and `down()` …
    `up()` is the server going away (open connections dropped, new ones closed at once).

    A blackhole forwards nothing in either direction, new connections included, and
    keeps every connection open: neither end learns anything, as when packets are
    silently dropped. `heal()` resumes forwarding: what was held back, an end of stream
    included, goes through late. That is what DROP does to a TCP connection, whose
    kernel retransmits every unacknowledged segment (a FIN too) until the path heals
    or about 15 minutes pass; so a stale writer's statements do reach the server after
    a short partition. A partition that outlasts the retransmissions, or a REJECT
    (`tcp-reset`), is `cut()`, which also works during a blackhole.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cuts = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        if self._refusing:
            self._drop(client)
            return
        self._flowing.wait()  # a connection opened into a blackhole waits for the heal
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            self._drop(client)
            return
        with self._lock:
            self._open.add(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._flowing.wait()  # an end of stream is held back like the data before it
            self._drop(source, sink)

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            for sock in sockets:
                self._open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> None:
        """Close every connection through the proxy, mid-stream or not."""
        with self._lock:
            sockets = list(self._open)
        self._drop(*sockets)
        self.cuts += 1

    def blackhole(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._flowing.clear()

    def heal(self) -> None:
        """Forward again, what was held back first."""
        self._flowing.set()

    def down(self) -> None:
        """The server goes away: every connection drops and new ones are closed."""
        self._refusing = True
        self.cut()

    def up(self) -> None:
        """The server is back: new connections go through again."""
        self._refusing = False

    def close(self) -> None:
        self.listener.close()
        self.cut()
        self.heal()  # lets the held threads see their closed sockets and end
