"""Upload attacks against a real `jobgate serve` over real sockets: a 2 GB body and
thousands of tiny parts are cut off while streaming, memory stays flat, and no
temporary file is left behind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

LIMIT = 50_000_000
ATTEMPT = 2_000_000_000
CHUNK = 1 << 20


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(
        tmp_path,
        None,
        worker_concurrency=0,
        settings={"JOBGATE_MAX_UPLOAD_BYTES": str(LIMIT), "JOBGATE_MAX_UPLOAD_PARTS": "100"},
    )
    try:
        yield running
    finally:
        assert running.stop() == 0


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _leftovers(data_dir: Path) -> list[Path]:
    """Files in the data directory that are neither the database nor a stored blob."""
    blobs = data_dir / "blobs"
    return [
        path
        for path in data_dir.rglob("*")
        if path.is_file()
        and not path.name.startswith("jobgate.db")
        and not (path.is_relative_to(blobs) and len(path.name) == 64)
        and path.name != "admin-key"
    ]


class Streamed:
    """A multipart body of one endless file, counting what the client managed to send."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        head = (
            b'--b0und\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n'
            b'--b0und\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\n"
        )
        yield head
        block = b"a" * CHUNK
        while self.sent < self.total:
            self.sent += len(block)
            yield block
        yield b"\r\n--b0und--\r\n"


def test_a_2_gb_upload_is_cut_off_with_flat_memory(small_server: Server) -> None:
    """413 after about the limit; the server's peak RSS grows by far less than the body."""
    pid = small_server.process.pid
    before = _rss_kib(pid, "VmHWM")
    body = Streamed(ATTEMPT)
    started = time.monotonic()
    with small_server.client() as client:
        try:
            response = client.post(
                "/v1/jobs",
                content=body,
                headers={"Content-Type": "multipart/form-data; boundary=b0und"},
                timeout=120,
            )
            status = response.status_code
            assert response.json()["type"].endswith("/file-too-large")
        except httpx.WriteError:
            status = 413  # the server answered and closed before the client stopped writing
    assert status == 413
    assert body.sent < 3 * LIMIT, f"the server kept reading: {body.sent:,} bytes sent"
    assert time.monotonic() - started < 60
    grown_mib = (_rss_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 40, f"peak RSS grew by {grown_mib:.0f} MiB"
    with small_server.client() as client:
        assert client.get("/v1/jobs").json()["total"] == 0
    assert _leftovers(small_server.data_dir) == []


def test_thousands_of_tiny_parts_are_refused_early(small_server: Server) -> None:
    """5,000 one-byte parts: 400 once the 101st part starts, nothing stored or left."""
    parts = [b'--b0und\r\nContent-Disposition: form-data; name="pipeline"\r\n\r\ntext-stats\r\n']
    parts += [
        f'--b0und\r\nContent-Disposition: form-data; name="files"; filename="f{i}.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nx\r\n".encode()
        for i in range(5000)
    ]
    body = b"".join(parts) + b"--b0und--\r\n"
    with small_server.client() as client:
        response = client.post(
            "/v1/jobs",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=b0und"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["type"].endswith("/malformed-request")
        assert client.get("/v1/jobs").json()["total"] == 0
    assert _leftovers(small_server.data_dir) == []
