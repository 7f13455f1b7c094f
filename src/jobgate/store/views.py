"""How stored rows look on the wire: jobs, artifacts, records and events as JSON dicts.

Only the fields API.md names are shown: no storage paths, worker hosts, lease tokens
or stage outputs leave through here. The API answers with these, and webhook payloads
carry the same `job` view (so there is one renderer); `api/models.py` mirrors every
shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jobgate.ids import rfc3339

if TYPE_CHECKING:  # the repositories render with this module: no import cycle at run time
    from jobgate.store.repositories.jobs import JobSnapshot

Row = Mapping[Any, Any]
"""A database row (`RowMapping`) or a plain dict."""


def job(snapshot: JobSnapshot) -> dict[str, Any]:
    """A job as `GET /v1/jobs/{id}` shows it (API.md, "Read")."""
    row = snapshot.job
    job_id = row["id"]
    base = f"/v1/jobs/{job_id}"
    return {
        "id": job_id,
        "pipeline": row["pipeline"],
        "pipeline_version": row["pipeline_version"],
        "owner": row["owner"],
        "status": row["status"],
        "cancel_requested": bool(row["cancel_requested"]),
        "progress": float(row["progress"] or 0.0),
        "stage": row["stage"],
        "stages": [stage(s) for s in snapshot.stages],
        "params": row["params"] or {},
        "files": [input_file(f) for f in row["files"] or []],
        "priority": int(row["priority"]),
        "correlation_id": row["correlation_id"],
        "cost": {
            "estimated_usd": float(row["estimated_usd"] or 0.0),
            "actual_usd": float(row["actual_usd"] or 0.0),
            "budget_usd": float(row["budget_usd"]),
        },
        "result": row["result"],
        "error": row["error"],
        "artifacts": [artifact(a) for a in snapshot.artifacts],
        "records": {
            "succeeded": int(row["records_succeeded"] or 0),
            "failed": int(row["records_failed"] or 0),
            "expected": int(row["records_expected"] or 0),
        },
        "created_at": rfc3339(row["created_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "links": {
            "self": base,
            "events": f"{base}/events",
            "artifacts": f"{base}/artifacts",
            "cancel": f"{base}/cancel",
        },
    }


def stage(row: Row) -> dict[str, Any]:
    """One stage of a job; its output stays internal."""
    return {
        "name": row["name"],
        "status": row["status"],
        "attempt": int(row["attempt"] or 0),
        "progress": float(row["progress"] or 0.0),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "error": row["error"],
    }


def input_file(item: Row) -> dict[str, Any]:
    """An input file as stored in `jobs.files`."""
    return {
        "name": str(item["name"]),
        "sha256": str(item["sha256"]),
        "size": int(item["size"]),
        "content_type": str(item["content_type"]),
    }


def artifact(row: Row) -> dict[str, Any]:
    """An artifact row, as `Job.artifacts[]` and `GET .../artifacts` show it."""
    return {
        "name": row["name"],
        "sha256": row["sha256"],
        "size": int(row["size"]),
        "content_type": row["content_type"],
        "primary": bool(row["is_primary"]),
    }


def record(row: Row) -> dict[str, Any]:
    """One map-stage item result."""
    return {
        "key": row["key"],
        "stage": row["stage"],
        "status": row["status"],
        "data": row["data"],
        "error": row["error"],
    }


def event(row: Row) -> dict[str, Any]:
    """A stored event, as the JSON events page shows it."""
    return {
        "seq": int(row["seq"]),
        "type": row["type"],
        "data": row["data"],
        "created_at": rfc3339(row["created_at"]),
    }


def webhook_delivery(row: Row) -> dict[str, Any]:
    """A webhook delivery as its job's delivery log shows it (never its body)."""
    return {
        "id": row["id"],
        "event": row["event"],
        "url": row["url"],
        "status": row["status"],
        "attempts": int(row["attempts"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "created_at": rfc3339(row["created_at"]),
        # While a delivery is pending only: when it is tried next (or its lease ends).
        "next_attempt_at": rfc3339(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "delivered_at": rfc3339(row["delivered_at"]),
    }
