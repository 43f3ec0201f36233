"""Which modules a knowledge adapter's ``target_modules`` name: PEFT's rule for a list of names.

The adapter stage applies it to the base's Linear modules; the build applies it beforehand to the
weight matrices in a local base's safetensors headers, so that a misspelt name fails before any
stage runs rather than after the delta was computed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def matches(name: str, target: str) -> bool:
    """Whether module ``name`` is one that ``target`` names (itself, or its last parts)."""
    return name == target or name.endswith("." + target)


def unmatched(targets: list[str], modules: Iterable[str], what: str) -> str | None:
    """None when some of ``modules`` matches a target; else why not, listing the modules
    (``what``: what they are, plural) with layer numbers collapsed, so that the names a user may
    write are seen at a glance."""
    modules = list(modules)
    if any(matches(n, t) for n in modules for t in targets):
        return None
    shapes = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in modules})
    return f"match none of the base model's {what}, which are: {', '.join(shapes)}"
