"""The query of ``GET /api/mv/usage``: its ``since`` and ``until`` times, as the OpenAPI document and the route read them."""

from __future__ import annotations

# A date, a date and time (with an optional offset), or Unix seconds
USAGE_TIME = {
    "type": "string",
    "pattern": r"^([0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?)?|[0-9]{1,12}(\.[0-9]{1,6})?)$",
}
