"""``GET /api/mv/usage``: what the caller's jobs (every key's, for an admin key) used and cost over a time range.

The report reads the job store's usage book (``jobs/usage_store.py``), which keeps an entry per ended job after
retention removed the job itself, and survives restarts on both stores. Totals are integer sums of the entries
listed, so they always equal the sum of ``jobs``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from mvserver.appkeys import CONFIG, JOBS
from mvserver.core.errors import ApiError
from mvserver.jobs.usage import MICROS, currency, day_of, month_of
from mvserver.usage.schemas import USAGE_TIME
from mvserver.web.access.auth import API_KEY, key_id

GROUPS = ("model", "kind", "day")
TIME = re.compile(USAGE_TIME["pattern"])


def parse_time(text: str, field: str) -> float:
    """A report bound: an ISO 8601 date (midnight UTC) or date-time (UTC unless it names its offset), or unix
    seconds (the pattern of ``schemas.USAGE_TIME``); 400 naming ``field`` otherwise."""
    if not TIME.fullmatch(text):
        raise _bad_time(field)
    try:
        if text.replace(".", "", 1).isdigit():
            return float(text)
        if len(text) == 10:
            parsed = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    except (ValueError, OverflowError):  # no such day, or out of the datetime range with its offset
        raise _bad_time(field) from None


def _bad_time(field: str) -> ApiError:
    return ApiError(
        400,
        "invalid_field",
        f"{field}: an ISO 8601 date or date-time (UTC unless an offset is given), or unix seconds",
        field=field,
    )


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def _group_key(entry: dict[str, Any], group_by: str) -> str:
    if group_by == "day":
        return day_of(entry["finished_at"])
    return str(entry.get(group_by))


def _sums(entries: list[dict[str, Any]]) -> dict[str, Any]:
    micros = sum(int(e.get("cost_micros") or 0) for e in entries)
    return {
        "jobs": len(entries),
        "cost_micros": micros,
        "cost": micros / MICROS,
        "output_seconds": round(sum(e.get("output_seconds") or 0 for e in entries), 3),
        "predict_seconds": round(sum(e.get("predict_seconds") or 0 for e in entries), 3),
    }


def report(entries: list[dict[str, Any]], group_by: str) -> dict[str, Any]:
    """Totals and groups (in key order) of the entries, all integer sums of the very entries listed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(_group_key(entry, group_by), []).append(entry)
    return {
        "totals": _sums(entries),
        "groups": [{"key": key, **_sums(members)} for key, members in sorted(groups.items())],
    }


async def usage_report(request: web.Request) -> web.Response:
    """The jobs that ended in [from, to) (default: this calendar month, UTC, up to now), grouped by model, kind or
    day; every key's with an admin key, else the caller's own (with keys off: the jobs made without a key)."""
    params, now = request.query, time.time()
    config = request.app[CONFIG]
    limits = config.pricing
    start = parse_time(params["from"], "from") if "from" in params else month_start(now)
    end = parse_time(params["to"], "to") if "to" in params else now + 1
    group_by = params.get("group_by", "model")
    if group_by not in GROUPS:
        raise ApiError(400, "invalid_field", f"group_by: one of {', '.join(GROUPS)}", field="group_by")
    if end <= start:
        raise ApiError(400, "invalid_field", "to: must be after from", field="to")
    if end - start > limits.report_max_days * 86400:
        raise ApiError(
            400,
            "invalid_field",
            f"from: a report covers at most {limits.report_max_days} days (pricing.yaml report_max_days)",
            field="from",
        )
    key = request.get(API_KEY)
    every_owner = key is not None and key.admin
    entries = await request.app[JOBS].book.entries(key_id(request), start, end, every_owner=every_owner)
    if len(entries) > limits.report_max_jobs:
        raise ApiError(
            400,
            "invalid_field",
            f"from: {len(entries)} jobs ended in this range, more than a report "
            f"lists ({limits.report_max_jobs}, pricing.yaml report_max_jobs); ask "
            "for a shorter range",
            field="from",
        )
    body: dict[str, Any] = {
        "from": start,
        "to": end,
        "group_by": group_by,
        "currency": currency(limits),
        "all_keys": every_owner,
        **report(entries, group_by),
        "jobs": entries,
    }
    if key is not None:
        body["budget"] = await budget_state(request, key.id, key.limits.monthly_budget, now)
    return web.json_response(body)


async def budget_state(request: web.Request, owner: str, limit: float | None, now: float) -> dict[str, Any]:
    """The key's spending this month (estimates held for running jobs, final costs of ended ones) and its limit."""
    month = month_of(now)
    spent = await request.app[JOBS].book.spent(owner, month) / MICROS
    remaining = None if limit is None else max(0.0, round(limit - spent, 6))
    return {"month": month, "limit": limit, "spent": spent, "remaining": remaining}
