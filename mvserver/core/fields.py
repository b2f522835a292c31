"""Field types shared by every request model: text stripped and never blank, choices, and integers that accept an
integral JSON number (``8.0``), so the OpenAPI document and the server agree on one rule."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints

# Unicode White_Space, the characters pydantic strips from text fields: a required text field must contain at least
# one character outside this class. The class is spelled out because regex ``\s`` differs between engines.
WHITESPACE_CLASS = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK_PATTERN = f"[^{WHITESPACE_CLASS}]"
UUID4_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
# A request model: no unknown fields, no coercion (but integral numbers, see INTEGRAL), immutable
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def _integral(value: Any) -> Any:
    """A JSON number with no fractional part (``8.0``) is the integer it names, as JSON Schema counts it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)


def text(max_chars: int, *, blank: bool = False) -> Any:
    """Text, stripped of surrounding whitespace; unless ``blank``, it must not be only whitespace."""
    constraints = StringConstraints(strip_whitespace=True, min_length=0 if blank else 1, max_length=max_chars)
    if blank:
        return Annotated[str, constraints]
    return Annotated[str, constraints, Field(json_schema_extra={"pattern": NOT_BLANK_PATTERN})]


def choice(values: list[Any]) -> Any:
    return Literal[tuple(values)]


SEED = Annotated[
    Annotated[int, Field(ge=0, le=2**31 - 1), INTEGRAL] | None,
    Field(description="Random seed; null lets the provider choose."),
]
