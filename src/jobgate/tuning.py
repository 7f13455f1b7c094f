"""Process-wide tuning for jobgate's long-running processes (`serve`, `worker`)."""

from __future__ import annotations

import gc


def tune_gc(young_threshold: int) -> None:
    """Run CPython's cyclic garbage collector less often, and never over start-up's heap.

    With CPython's default, a young collection runs every 700 net allocations: several
    per batch submit, each also scanning older objects now and then. Raising that
    threshold and freezing what start-up built (modules, the app, the registry) took
    about a fifth of a batch submit's CPU away (`docs/performance.md`). Reference
    counting still frees everything acyclic at once; cycles wait a little longer.

    Args:
        young_threshold: allocations between young collections (0: Python's default,
            and nothing frozen).
    """
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
