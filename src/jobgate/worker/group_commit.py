"""Group commit: stage outcomes that are ready together are written in one transaction.

A busy worker finishes many short stages at once; writing each outcome in its own
transaction spends more on BEGIN, COMMIT and the pool than on the outcome itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from jobgate.batching import Batches, first
from jobgate.store import Database
from jobgate.store.repositories.outcomes import Completion
from jobgate.store.repositories.tasks import LeaseLost

log = structlog.get_logger("jobgate.worker")

Write = Callable[[AsyncConnection], Awaitable[Any]]
CompleteMany = Callable[[AsyncConnection, Sequence[Completion]], Awaitable[list[LeaseLost | None]]]
"""Records many successful runs in one go: per run, None or `LeaseLost`."""
FinishMany = Callable[[AsyncConnection, Sequence[Completion]], Awaitable[list[bool | LeaseLost]]]
"""Records those of many successful runs that finish their jobs, in one statement that
needs no transaction: per run, True (written), False (nothing written) or `LeaseLost`."""


class Regroup(Exception):
    """The group's transaction failed: write this outcome alone."""


@dataclass
class _Pending:
    order: tuple[str, int]  # (job id, task id)
    write: Write
    done: asyncio.Future[Any]
    completion: Completion | None = None


class GroupCommit:
    """Queues outcome writes; each transaction takes every write queued so far.

    Up to `writers` transactions are written at once; outcomes that arrive while they
    all are wait for the next, so a lone outcome is written at once and a burst costs
    one transaction per batch. A batch runs in (job, task) order; lease renewals skip
    the rows it holds, and a claim locks its tasks' jobs before their stages, as every
    outcome does, so neither waits for a batch while holding what the batch needs.
    (Should PostgreSQL find a deadlock all the same, it aborts one side after
    `deadlock_timeout`: a batch then writes its outcomes one by one.)

    Successful runs given as a `Completion` are written together by `complete_many`
    (one statement for the lot on PostgreSQL), before the batch's other writes. With
    `finish_many`, those that finish their jobs are first written by it alone, on an
    autocommit connection; a batch of only those (a drain of one-stage jobs) then needs
    no `BEGIN` and `COMMIT` at all.

    Each write must raise `LeaseLost` before it writes anything (every outcome checks
    its lease first), so one lost lease leaves the rest of the batch to commit. Any other
    error rolls the whole batch back, and each of its callers gets `Regroup`.
    """

    def __init__(
        self,
        db: Database,
        *,
        writers: int = 2,
        max_batch: int = 64,
        complete_many: CompleteMany | None = None,
        finish_many: FinishMany | None = None,
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self._oldest = first(max_batch)
        self.complete_many = complete_many
        self.finish_many = finish_many
        self.batches = Batches(
            self._write_batch, writers=writers, name="jobgate-group-commit", take=self._take
        )

    async def write(
        self, job_id: str, task_id: int, write: Write, completion: Completion | None = None
    ) -> Any:
        """Run `write` in the next group transaction; what it returned, once committed.

        With `complete_many`, a `completion` (the same outcome as `write`'s) is written
        with the batch's others instead, and None returned.

        Raises:
            LeaseLost: from `write`; it wrote nothing.
            Regroup: the group's transaction failed; nothing of this write is stored.
        """
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.complete_many is None:
            completion = None
        self.batches.put(_Pending((job_id, task_id), write, done, completion))
        return await done

    def _take(self, queue: deque[_Pending]) -> list[_Pending]:
        return sorted(self._oldest(queue), key=lambda p: p.order)

    async def _write_batch(self, batch: list[_Pending]) -> None:
        batch = await self._finish_first(batch)
        if not batch:
            return
        outcomes: list[tuple[_Pending, Any, BaseException | None]] = []
        try:
            async with self.db.write() as conn:
                runs = [(p, p.completion) for p in batch if p.completion is not None]
                if runs and self.complete_many is not None:
                    answers = await self.complete_many(conn, [run for _, run in runs])
                    outcomes += ((p, None, a) for (p, _), a in zip(runs, answers, strict=True))
                for pending in batch:
                    if pending.completion is not None:
                        continue
                    try:
                        outcomes.append((pending, await pending.write(conn), None))
                    except LeaseLost as exc:
                        outcomes.append((pending, None, exc))
        except Exception as exc:
            log.warning("group_commit_failed", outcomes=len(batch), error=repr(exc))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(Regroup())
            return
        for pending, result, error in outcomes:
            if pending.done.done():  # its caller was cancelled
                continue
            if error is None:
                pending.done.set_result(result)
            else:
                pending.done.set_exception(error)

    async def _finish_first(self, batch: list[_Pending]) -> list[_Pending]:
        """Write the batch's completions that finish their jobs with `finish_many`, in
        one statement and no transaction; what is left for the group's transaction."""
        runs = [p for p in batch if p.completion is not None]
        if self.finish_many is None or not runs:
            return batch
        completions = [p.completion for p in runs if p.completion is not None]
        try:
            async with self.db.autocommit() as conn:
                answers = await self.finish_many(conn, completions)
        except Exception as exc:  # nothing was written: the transaction tries them all
            log.warning("group_finish_failed", outcomes=len(runs), error=repr(exc))
            return batch
        settled: set[int] = set()
        for pending, answer in zip(runs, answers, strict=True):
            if answer is False:
                continue
            settled.add(id(pending))
            if pending.done.done():  # its caller was cancelled
                continue
            if isinstance(answer, LeaseLost):
                pending.done.set_exception(answer)
            else:
                pending.done.set_result(None)
        return [p for p in batch if id(p) not in settled]
