"""Numbers as the reports write them: '-' for a missing value, 'x ± se' where an SE is known."""

from __future__ import annotations


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def pm(x, se, spec: str = ".2f") -> str:
    """'0.41 ± 0.12' (the SE without the value's sign); the value alone without an SE; '-' without a value."""
    return fmt(x, spec) + (f" ± {se:{spec.lstrip('+')}}" if x is not None and se is not None else "")
