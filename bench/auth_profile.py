"""Where a saturated API server's CPU goes: the share in auth and in rate-limit code.

    python -m bench.auth_profile [--seconds 15] [--keep DIR]

Throughput ratios (`bench/auth.py`) move by ±10 % or more between minutes on a shared
machine; the share of a server's CPU samples spent in a piece of code moves far less,
because the machine's speed scales every part alike. For each variant of `bench/auth.py`
named below, one `jobgate serve` on a fresh database takes the same wrk load (100 users,
16 in flight) while py-spy samples it (200 Hz, active frames only). A sample counts for
auth when its stack is in `jobgate/auth/` or the route's `current_principal`, and for
limits when it is in `jobgate/api/limits.py`, `permits.py`, `redis_takes.py`,
`client_ip.py`, redis-py or `limits` (not counting the IP middleware's frame, which
holds the whole request below it).

Needs py-spy (`pip install py-spy`, or `PYSPY=/path/to/py-spy`) and wrk, and the right
to read another process's memory (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import auth
from bench._common import fresh_postgres, temp_dir
from bench.submit import SINGLE_BODY, WRK, _load_wrk, serve

VARIANTS = (
    "API key, no limits (baseline)",
    "RS256 JWT (cached JWKS), no limits",
    "API key + submit limit, memory",
    "API key + submit limit, Redis",
    "API key + submit limit, Redis, no take-ahead",
    "API key + submit and IP limits, Redis",
)
LIMIT_CODE = (
    "jobgate/api/limits.py",
    "jobgate/api/permits.py",
    "jobgate/api/redis_takes.py",
    "jobgate/api/client_ip.py",
    "(redis/",  # py-spy names a package's files from the package on
    "(limits/",
)


def shares(raw: Path) -> tuple[float, float, int]:
    """(auth share, limits share, samples) of a py-spy `--format raw` file."""
    total = in_auth = in_limits = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [f for f in stack.split(";") if not f.startswith("IpRateLimitMiddleware.")]
        if any("jobgate/auth/" in f or f.startswith("current_principal ") for f in frames):
            in_auth += samples
        if any(code in f for f in frames for code in LIMIT_CODE):
            in_limits += samples
    return in_auth / max(total, 1), in_limits / max(total, 1), total


async def main(seconds: float, keep: Path | None = None) -> None:
    pyspy = os.environ.get("PYSPY") or shutil.which("py-spy")
    if not pyspy or not WRK:
        raise SystemExit("needs py-spy (or PYSPY=...) and wrk on the PATH")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    document = {"keys": [{**public, "kid": auth.KID, "alg": "RS256", "use": "sig"}]}
    print("| variant | submits/s | auth | limits | auth + limits | samples |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with auth.jwks_server(document) as jwks_url, tempfile.TemporaryDirectory() as out:
        variants = {v.name: v for v in auth._variants(jwks_url)}
        for name in VARIANTS:
            variant = variants[name]
            url = await fresh_postgres()
            with (
                temp_dir("auth-profile") as tmp,
                serve(tmp, url, postgres=True, settings=variant.settings) as server,
            ):
                server.tokens = auth._credentials(variant, server, key)
                await _load_wrk(server, "/v1/jobs", SINGLE_BODY, 1, 3, 16)  # warm up
                raw = Path(out) / f"variant-{VARIANTS.index(name)}.txt"
                spy = subprocess.Popen(
                    [
                        *(pyspy, "record", "--pid", str(server.pid), "--rate", "200"),
                        *("--duration", str(round(seconds)), "--format", "raw"),
                        *("--output", str(raw), "--nonblocking"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                tally, elapsed = await _load_wrk(server, "/v1/jobs", SINGLE_BODY, 1, seconds, 16)
                await asyncio.to_thread(spy.wait)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(raw, keep / raw.name)
            in_auth, in_limits, samples = shares(raw)
            print(
                f"| {name} | {tally.jobs / elapsed:,.0f} | {in_auth:.1%} | {in_limits:.1%} "
                f"| {in_auth + in_limits:.1%} | {samples} |"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--keep", type=Path, help="copy py-spy's raw stacks to this directory")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.keep))
