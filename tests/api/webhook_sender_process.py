"""A webhook sender in a process of its own, for tests that kill it:
`python -m tests.api.webhook_sender_process DATABASE_URL` (loopback targets allowed).
It prints "ready" once sending and runs until killed."""

from __future__ import annotations

import asyncio
import sys

from jobgate.config import Settings
from jobgate.store import Database
from jobgate.webhooks import WebhookSender


async def main(url: str) -> None:
    settings = Settings(database_url=url, webhook_allow_private=True, webhook_poll_s=0.05)
    db = Database(url)
    async with WebhookSender(db, settings):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
