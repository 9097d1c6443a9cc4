"""JSON as the standard has it: no NaN or Infinity tokens, which a strict reader refuses
(a leaf module: the standard library only)."""
from __future__ import annotations

import json
import math


def finite_or_null(value):
    """``value`` with every NaN or infinite float, at any depth of dicts, lists and tuples,
    as None."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value, **options) -> str:
    """``json.dumps`` of ``value`` with NaN and infinities as null (``options``: dumps')."""
    return json.dumps(finite_or_null(value), allow_nan=False, **options)
