"""What a job used and what it cost, as plain data: no I/O here (the books that keep it are in ``usage_store``).

A job's usage is measured when it ends: provider and model, seconds of output (or images), the provider's own
metrics (Replicate's ``metrics.predict_time``), time in the queue and in all, the provider calls retried, and an
estimated cost from the price table (``settings/pricing.yaml``). Costs are counted in integer millionths of the
currency (``amount_micros``) so a report's totals are exactly the sum of its jobs; ``amount`` is that divided out.
A sandbox job and local ffmpeg work cost 0, and say why in ``cost.basis``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from mvserver.core.config import ModelPrice, PricingSettings
from mvserver.jobs.model import Job

MICROS = 1_000_000


def month_of(stamp: float) -> str:
    """The calendar month (UTC) a budget counts a job in: the month it was created."""
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m")


def day_of(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")


def output_seconds(job: Job) -> float | None:
    """Seconds of media the job produced (what providers bill per second): the clip asked for, or the lip-synced
    window; None for a job that produced nothing."""
    if job.status != "succeeded" and job.final:
        return None
    if job.kind == "video":
        return float(job.request.get("duration") or 0)
    window = job.request.get("window")
    if job.kind == "lipsync" and isinstance(window, dict):
        return float(window.get("seconds") or 0)
    result = job.request.get("result")  # assembly: the film's measured length, else the planned one
    seconds = result.get("seconds") if isinstance(result, dict) else job.request.get("expected_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None


def price_of(job: Job, pricing: PricingSettings) -> ModelPrice | None:
    return pricing.models.get(job.model)


def _basis(job: Job, price: ModelPrice | None) -> str:
    if job.sandbox:
        return "sandbox"
    if job.kind == "assembly":
        return "local"
    return "price_table" if price is not None else "unpriced"


def _micros(job: Job, price: ModelPrice, seconds: float | None, predict_time: float | None, images: int) -> int:
    per_second = price.per_output_second
    if price.per_output_second_without_audio is not None and job.request.get("generate_audio") is False:
        per_second = price.per_output_second_without_audio
    amount = per_second * (seconds or 0) + price.per_image * images + price.per_prediction_second * (predict_time or 0)
    return round(amount * MICROS)


def cost_micros(
    job: Job, pricing: PricingSettings, *, seconds: float | None, predict_time: float | None, images: int = 0
) -> tuple[int, str]:
    """The cost in millionths and its basis (``price_table``, ``sandbox``, ``local`` or ``unpriced``)."""
    price = price_of(job, pricing)
    basis = _basis(job, price)
    if basis != "price_table":
        return 0, basis
    assert price is not None
    return _micros(job, price, seconds, predict_time, images), basis


def estimate_micros(job: Job, pricing: PricingSettings) -> int:
    """What a new job will cost if it succeeds (its output at list price): what a budget holds for it."""
    return cost_micros(job, pricing, seconds=output_seconds(job), predict_time=None)[0]


def currency(pricing: PricingSettings) -> str:
    return next(iter(pricing.models.values())).currency


def _predict_time(metrics: dict[str, Any] | None) -> float | None:
    value = (metrics or {}).get("predict_time")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def measure(job: Job, pricing: PricingSettings, now: float | None = None) -> dict[str, Any]:
    """The usage of a job that just ended (``job.usage``): shown in its JSON, its final event and the listing."""
    end = job.finished_at or now or time.time()
    seconds = output_seconds(job)
    predict_time = _predict_time(job.provider_metrics)
    micros, basis = cost_micros(job, pricing, seconds=seconds, predict_time=predict_time)
    price = price_of(job, pricing)
    return {
        "provider": job.backend,
        "model": job.model,
        "output_seconds": seconds,
        "images": 0,
        "provider_metrics": job.provider_metrics,
        "queue_seconds": round((job.started_at or end) - job.created_at, 3),
        "wall_seconds": round(end - job.created_at, 3),
        "retries": job.retries,
        "cost": {
            "amount": micros / MICROS,
            "amount_micros": micros,
            "currency": price.currency if price is not None else currency(pricing),
            "as_of": price.as_of.isoformat() if price is not None and basis == "price_table" else None,
            "basis": basis,
            "estimated": True,
        },
    }


def ledger_entry(job: Job) -> dict[str, Any]:
    """What the usage book keeps of an ended job (after retention removed the job, reports still add it up)."""
    usage = job.usage or {}
    cost = usage.get("cost") or {}
    return {
        "job_id": job.id,
        "owner": job.owner,
        "kind": job.kind,
        "backend": job.backend,
        "model": job.model,
        "sandbox": job.sandbox,
        "status": job.status,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "output_seconds": usage.get("output_seconds"),
        "predict_seconds": _predict_time(usage.get("provider_metrics")),
        "cost_micros": int(cost.get("amount_micros") or 0),
        "currency": cost.get("currency"),
        "basis": cost.get("basis"),
    }
