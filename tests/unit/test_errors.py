"""The error tree: what every refusal of a kind carries."""

from __future__ import annotations

from jobgate import errors


def _subclasses(kind: type[errors.RequestError]) -> list[type[errors.RequestError]]:
    found = []
    for sub in kind.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_429_carries_retry_after() -> None:
    """API.md: every 429 carries `Retry-After` (seconds), `too-many-streams` included."""
    too_many = [kind for kind in _subclasses(errors.RequestError) if kind.status == 429]
    assert errors.TooManyStreams in too_many
    for kind in too_many:
        assert issubclass(kind, errors.RateLimited)
        headers = kind("refused").headers or {}
        assert int(headers["Retry-After"]) >= 1
