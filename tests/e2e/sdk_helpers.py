"""Helpers for the SDK and CLI end-to-end tests: a TCP proxy that can cut every
connection, and restarting `jobgate serve` on the same port and database."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from dataclasses import replace

import httpx

from tests.e2e.conftest import JOBGATE, Server


class CuttableProxy:
    """A loopback TCP proxy to `port`; `cut()` drops every open connection at once."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
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

    def close(self) -> None:
        self.listener.close()
        self.cut()


def restart(server: Server, *, worker_concurrency: int = 0) -> Server:
    """Kill `jobgate serve` (SIGKILL, like a crash) and start it again on the same port,
    database and settings."""
    server.process.kill()
    server.process.wait(timeout=10)
    port = server.url.rsplit(":", 1)[1]
    process = subprocess.Popen(
        [*JOBGATE, "serve", "--port", port, "--worker-concurrency", str(worker_concurrency)],
        env=server.env,
        stdout=server.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return replace(server, process=process)
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("jobgate serve did not restart:\n" + server.log.read_text())
        time.sleep(0.1)


def start_worker(server: Server, name: str) -> subprocess.Popen[bytes]:
    """A `jobgate worker` process for an API-only server."""
    return subprocess.Popen(
        [*JOBGATE, "worker", "--concurrency", "2", "--id", name],
        env=server.env,
        stdout=(server.log.parent / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
