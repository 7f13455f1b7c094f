"""PostgreSQL's fast path: hot statements as plain SQL on the asyncpg connection.

Through SQLAlchemy a statement costs ~0.3 ms of Python on top of asyncpg's own work
on a 2-core machine, more than the server spends running it. The hottest statements
(a submit's inserts, a claim, a finished stage, an event append) run here instead, on
the driver connection under the SQLAlchemy one, inside the transaction
`Database.write()` opened (or on a `Database.autocommit()` connection): same tables,
same values, one round trip for many rows of many tables. `docs/performance.md`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg.exceptions as asyncpg_errors
from pydantic_core import to_json
from sqlalchemy import JSON, Executable, Null, Table, text
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

_ASYNCPG = asyncpg.dialect()  # type: ignore[no-untyped-call]

Rows = Sequence[Mapping[str, Any]]
Shape = tuple[tuple[Table, tuple[str, ...], tuple[bool, ...]], ...]
"""Per table: its columns, and which of them carry one value for every row."""


async def driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, with `conn`'s transaction begun (none on a
    `Database.autocommit()` connection).

    SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement; a
    statement sent straight to the driver before that would run outside the
    transaction (and commit on its own), so the transaction is begun here.
    """
    fairy = await conn.get_raw_connection()
    adapted: Any = fairy.dbapi_connection
    asyncpg_connection: Any = fairy.driver_connection
    if adapted.isolation_level == "autocommit":  # `Database.autocommit()`
        return asyncpg_connection
    if adapted._transaction is None:  # the adapter has no public "begin"
        await adapted._start_transaction()
    if not asyncpg_connection.is_in_transaction():
        raise RuntimeError("the SQLAlchemy connection has no transaction under way")
    return asyncpg_connection


# The server or the network dropped the connection (a restart, an admin, a timeout);
# not a cancelled query (also "operator intervention"), whose connection lives on.
_DISCONNECTS = (
    OSError,
    asyncpg_errors.InterfaceError,
    asyncpg_errors.PostgresConnectionError,
    asyncpg_errors.AdminShutdownError,
    asyncpg_errors.CrashShutdownError,
    asyncpg_errors.CannotConnectNowError,
)


async def _call(conn: AsyncConnection, method: str, sql: str, *args: Any) -> Any:
    """`driver(conn).<method>(sql, *args)`, with failures SQLAlchemy would have seen.

    A lost connection makes SQLAlchemy drop its pool (as it does when one of its own
    statements hits one), so dead connections are not handed out again; a refused
    row is SQLAlchemy's `IntegrityError`, like everywhere else.
    """
    raw: Any = None
    try:
        raw = await driver(conn)
        return await getattr(raw, method)(sql, *args)
    except _DISCONNECTS:
        await _retire(conn)
        raise
    except asyncpg_errors.IntegrityConstraintViolationError as exc:
        raise IntegrityError(sql, args, exc) from exc
    except asyncpg_errors.InternalClientError as exc:
        # The server's "terminating connection" arrived on an idle connection and its
        # end of stream not yet: the driver refuses the statement before it sees the
        # socket close. A connection that closes right after was lost, not misused.
        if raw is not None and await _closes_soon(raw):
            await _retire(conn)
            raise ConnectionResetError("the server closed the connection") from exc
        raise


async def _closes_soon(raw: Any, within_s: float = 0.1) -> bool:
    """Whether the asyncpg connection `raw` is closed, or closes within `within_s`: the
    end of stream the event loop has yet to read."""
    for _ in range(10):
        if raw.is_closed():
            return True
        await asyncio.sleep(within_s / 10)
    return bool(raw.is_closed())


async def _retire(conn: AsyncConnection) -> None:
    """Drop a lost connection, and the pool with it (the server likely dropped all)."""
    await conn.invalidate()
    await conn.engine.dispose(close=False)


async def lock_key(conn: AsyncConnection, lock_class: int, key: str) -> None:
    """Hold `pg_advisory_xact_lock(lock_class, hashtext(key))` until the transaction
    ends: writers of one key (an owner) queue up across processes. Nothing on SQLite,
    whose single writer already serialises them."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:class, hashtext(:key))"),
            {"class": lock_class, "key": key},
        )


async def records(conn: AsyncConnection, sql: str, *args: Any) -> list[Any]:
    """The rows of plain SQL run on `driver(conn)`."""
    found: list[Any] = await _call(conn, "fetch", sql, *args)
    return found


async def record(conn: AsyncConnection, sql: str, *args: Any) -> Any:
    """The first row (or None) of plain SQL run on `driver(conn)`."""
    return await _call(conn, "fetchrow", sql, *args)


async def value(conn: AsyncConnection, sql: str, *args: Any) -> Any:
    """The first value of the first row (or None) of plain SQL run on `driver(conn)`."""
    return await _call(conn, "fetchval", sql, *args)


@functools.cache
def _column_type(table: Table, column: str) -> tuple[str, bool]:
    """(the column's type in PostgreSQL, is JSON): JSON travels as text, then cast, so
    nothing depends on the driver's JSON codec."""
    compiled = table.c[column].type.compile(dialect=_ASYNCPG)
    return ("TEXT", True) if compiled == "JSONB" else (compiled, False)


# With clocks (see `insert_many`): these columns hold offsets from where the clock of the
# row's owner ends.
CLOCKED = frozenset({("jobs", "fair_key"), ("tasks", "sort_key")})
# $1 owners, $2 now, $3 spans (JSON arrays): each owner's fair-share clock moves to
# max(clock, now) + span. Rows are locked in owner order, so two statements that move
# the same clocks wait for each other rather than deadlock.
_CLOCKS_CTE = (
    "clocks AS (INSERT INTO owner_clocks AS c (owner, clock) "
    "SELECT o, $2::FLOAT + s::FLOAT FROM ROWS FROM (jsonb_array_elements_text($1::TEXT::JSONB), "
    "jsonb_array_elements_text($3::TEXT::JSONB)) AS n(o, s) ORDER BY o "
    "ON CONFLICT (owner) DO UPDATE SET clock = greatest(c.clock - $2::FLOAT, 0) + EXCLUDED.clock "
    "RETURNING owner, clock)"
)


@functools.cache
def _insert_sql(
    shape: Shape, notify: str | None, clock: bool = False, keyed: tuple[tuple[str, str], ...] = ()
) -> str:
    """`WITH i0 AS (INSERT ... SELECT ... FROM ROWS FROM (...)), i1 AS (...) SELECT ...`.

    A column whose value is the same in every row is one scalar parameter. The others
    are each one JSON array, sent as text and unrolled by PostgreSQL (`ROWS FROM` zips
    them): encoding a list is one call into pydantic-core, where a PostgreSQL array
    parameter costs the driver Python work per element. A table whose every column is
    constant gets its row count from `generate_series`. `keyed` holds (table, key): the
    statement also returns each such table's new ids by the key, an SQL expression of
    the row's columns, where it is not null.
    """
    parts: list[str] = [_CLOCKS_CTE] if clock else []
    number = 3 if clock else 0
    keys_of = dict.fromkeys(keyed, "NULL")
    for n, (table, columns, constant) in enumerate(shape):
        arrays: list[str] = []
        aliases: list[str] = []
        selects: list[str] = []
        for column, is_constant in zip(columns, constant, strict=True):
            number += 1
            sql_type, is_json = _column_type(table, column)
            cast = "::JSONB" if is_json else ""
            if is_constant:
                selects.append(f"${number}::{sql_type}{cast}")
            elif is_json:
                arrays.append(f"jsonb_array_elements(${number}::TEXT::JSONB)")
                aliases.append(f"u{number}")
                selects.append(f"u{number}")
            else:
                arrays.append(f"jsonb_array_elements_text(${number}::TEXT::JSONB)")
                aliases.append(f"u{number}")
                selects.append(f"u{number}::{sql_type}")
        if clock:
            owner = selects[columns.index("owner")] if "owner" in columns else None
            for i, column in enumerate(columns):
                if (table.name, column) in CLOCKED:
                    if owner is None:
                        raise ValueError(f"{table.name}.{column} is clocked but has no owner")
                    # `owner` is a parameter or a column alias, never a value.
                    clock_end = f"(SELECT clock FROM clocks WHERE clocks.owner = {owner})"  # noqa: S608
                    selects[i] = f"{clock_end} + {selects[i]}"
        if arrays:
            source = f"ROWS FROM ({', '.join(arrays)}) AS u({', '.join(aliases)})"
        else:
            number += 1
            source = f"generate_series(1, ${number}::INTEGER)"
        # Table and column names come from `tables.py`; values only ever as parameters.
        insert = f"INSERT INTO {table.name} ({', '.join(columns)}) "
        returning = ""
        for name, key in keyed:
            if name == table.name:
                returning = " RETURNING *"
                # Keys are expressions written in the code, never values.
                keys_of[name, key] = (
                    f"(SELECT jsonb_object_agg({key}, id) FROM i{n} WHERE ({key}) IS NOT NULL)"  # noqa: S608
                )
        parts.append(f"i{n} AS ({insert}SELECT {', '.join(selects)} FROM {source}{returning})")  # noqa: S608
    # The main query runs before the CTEs nothing references, so the transaction has its
    # id before any row takes an `events.id`: the event bus's order relies on it
    # (`api/streams.py`, `safe_event_id`).
    final = "SELECT (SELECT array_agg(owner) FROM clocks), (SELECT array_agg(clock) FROM clocks)"
    if not clock:
        final = "SELECT NULL, NULL"
    for key_of in keys_of.values():
        final += f", {key_of}::TEXT"
    final += ", pg_current_xact_id()"
    if notify:
        number += 1
        final += f", pg_notify('{notify}', ${number}::TEXT)"
    return f"WITH {', '.join(parts)} {final}"


def _table_args(table: Table, rows: Rows) -> tuple[tuple[str, ...], tuple[bool, ...], list[Any]]:
    """The table's columns, which of them are constant, and the parameters for them."""
    columns = tuple(rows[0])
    args: list[Any] = []
    if len(rows) == 1:  # a single submit's rows: every column is one value
        (row,) = rows
        args.extend(
            to_json(row[column]).decode() if _column_type(table, column)[1] else row[column]
            for column in columns
        )
        args.append(1)
        return columns, (True,) * len(columns), args
    constant: list[bool] = []
    # The rows' values column by column, transposed in C (`itemgetter`, `zip`).
    by_column: Iterator[tuple[Any, ...]]
    if len(columns) > 1:
        by_column = zip(*map(operator.itemgetter(*columns), rows), strict=True)
    else:  # `itemgetter` of one key gives the value, not a tuple
        by_column = iter([tuple(row[columns[0]] for row in rows)])
    count = len(rows)
    for column, values in zip(columns, by_column, strict=True):
        first = values[0]
        # `1 == 1.0 == True`, but they are different values: equal and of one type. Only
        # a string equals a string, and only None is None; the last value tells most
        # columns that vary without a pass over them all (`is` first, as `count` does:
        # one NaN object throughout is constant).
        last = values[-1]
        same = (
            (last is first or last == first)
            and values.count(first) == count
            and (first is None or type(first) is str or len(set(map(type, values))) == 1)
        )
        if _column_type(table, column)[1]:
            # As SQLAlchemy's JSON type stores it: Python None is JSON null, not SQL NULL.
            encoded = to_json(values).decode()
            if same:  # equal in Python, and in JSON too? (`{"a": 1}` is not `{"a": 1.0}`)
                one = to_json(first).decode()
                same = encoded == f"[{','.join([one] * len(values))}]"
            constant.append(same)
            args.append(one if same else encoded)
            continue
        constant.append(same)
        args.append(first if same else to_json(values).decode())
    if all(constant):
        args.append(count)
    return columns, tuple(constant), args


class Inserted(NamedTuple):
    """What `insert_many` returns."""

    clocks: dict[str, float]
    """Where each owner's clock ends (empty without `clocks`)."""
    ids: list[dict[str, int]]
    """For each of `keyed`, its table's new ids by their key."""


async def insert_many(
    conn: AsyncConnection,
    inserts: Sequence[tuple[Table, Rows]],
    *,
    notify: str | None = None,
    notice: str = "",
    clocks: tuple[float, Mapping[str, float]] | None = None,
    keyed: Sequence[tuple[Table, str]] = (),
) -> Inserted:
    """Insert rows into several tables in one statement (one round trip).

    Every row of a table has the same keys. `notify` names a channel to `NOTIFY` in
    the same statement (delivered when the transaction commits), with `notice` as its
    payload. `clocks` is `(now, {owner: span})`: the same statement moves each owner's
    fair-share clock to `max(clock, now) + span`, and the `CLOCKED` columns' values
    count from where the clock of the row's `owner` then ends. Each of `keyed` is
    `(table, key)`: the ids PostgreSQL gave that table's rows are returned by the key,
    an SQL expression of the row's columns, for the rows where it is not null (each
    such key unique).
    """
    shape: list[tuple[Table, tuple[str, ...], tuple[bool, ...]]] = []
    args: list[Any] = []
    clocked = clocks is not None and bool(clocks[1])
    if clocks is not None and clocked:
        at, spans = clocks
        owners = sorted(spans)
        args += [to_json(owners).decode(), at, to_json([spans[o] for o in owners]).decode()]
    for table, rows in inserts:
        if rows:
            columns, constant, table_args = _table_args(table, rows)
            shape.append((table, columns, constant))
            args.extend(table_args)
    if not shape:
        return Inserted({}, [{} for _ in keyed])
    keys = tuple((table.name, key) for table, key in keyed)
    sql = _insert_sql(tuple(shape), notify, clocked, keys)
    if notify:
        args.append(notice)
    row = await record(conn, sql, *args)
    ids = [json.loads(found) if found else {} for found in row[2 : 2 + len(keys)]]
    return Inserted(dict(zip(row[0] or (), row[1] or (), strict=True)), ids)


@dataclass(frozen=True)
class _Plan:
    """A prebuilt statement compiled once for the driver."""

    sql: str
    names: tuple[str, ...]  # the bind parameter of each $n, in order
    fixed: Mapping[str, Any]  # values of the statement's own literals, encoded
    json_binds: frozenset[str]


@functools.cache
def _plan(statement: Executable) -> _Plan:
    compiled: Any = statement.compile(dialect=_ASYNCPG)  # type: ignore[attr-defined]
    if "POSTCOMPILE" in compiled.string:
        raise ValueError("expanding IN parameters need a per-call compile; use = ANY(array)")
    names = tuple(compiled.positiontup)
    json_binds = frozenset(n for n in names if isinstance(compiled.binds[n].type, JSON))
    # A bind the caller must give is `required`; the others are the statement's own
    # literals (`.values(status="running")`), fixed at build time.
    fixed = {
        name: _encode_bind(compiled.binds[name].effective_value, name in json_binds)
        for name in names
        if not compiled.binds[name].required
    }
    return _Plan(compiled.string, names, fixed, json_binds)


def _encode_bind(value: Any, is_json: bool) -> Any:
    if not is_json or isinstance(value, Null):
        return None if isinstance(value, Null) else value
    # As SQLAlchemy's JSON type sends it: Python None is JSON null, not SQL NULL.
    return to_json(value).decode()


async def fetch(
    conn: AsyncConnection, statement: Executable, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run a statement built once at import; its rows as dicts.

    On PostgreSQL it runs as plain SQL on the driver, compiled once per statement (so
    never pass one built per call); elsewhere through SQLAlchemy. `params` are the
    statement's `bindparam`s by name.
    """
    if conn.dialect.name != "postgresql":
        result = await conn.execute(statement, dict(params or {}))
        return [dict(row) for row in result.mappings()] if result.returns_rows else []
    plan = _plan(statement)
    given = params or {}
    fixed, json_binds = plan.fixed, plan.json_binds
    args = [
        fixed[name] if name in fixed else _encode_bind(given[name], name in json_binds)
        for name in plan.names
    ]
    # SQLAlchemy set the connection's JSON codec up: JSON results arrive decoded.
    return [dict(row) for row in await records(conn, plan.sql, *args)]
