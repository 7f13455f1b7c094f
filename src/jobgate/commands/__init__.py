"""The `jobgate` commands that talk to a running server through the SDK (`jobgate.client`).

`register(app)` adds them to the main command (`jobgate.cli`): `submit`, `watch`,
`status`, `cancel` and `download`.
"""

from jobgate.commands.jobs import register

__all__ = ["register"]
