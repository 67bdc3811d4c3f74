"""``rule_search(code)``: which knowledge-base rules mention an error code.

The rules package is imported lazily: diag works (and says "no rules available") when it is
missing or cannot load. Only the built-in rules are searched — site rules live with the
aggregator (``--rules DIR``), not on the machine that runs `xctl diag`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from typing import Any, Final

log = logging.getLogger(__name__)

MAX_RESULTS: Final = 5
MAX_CODE_CHARS: Final = 64


@functools.cache
def _builtin_rules() -> tuple[Any, ...] | str:
    """The built-in rules, or why there are none."""
    try:
        from xctl.rules import load_rules
    except ImportError as exc:
        return f"no rules available (the rules package is not installed: {exc})"
    try:
        ruleset = load_rules([])
    except Exception as exc:  # noqa: BLE001 - a broken knowledge base must not break diag
        log.warning("diag: could not load the built-in rules: %s", exc)
        return f"no rules available (the built-in rules did not load: {exc})"
    return tuple(ruleset.rules)


def _haystack(rule: Any) -> str:
    parts = [str(getattr(rule, name, "") or "") for name in ("id", "scene", "description")]
    for template in (getattr(rule, "summary", None), *(getattr(rule, "steps", ()) or ())):
        parts.append(str(getattr(template, "text", "") or ""))
    conditions = getattr(rule, "conditions", None)
    try:
        parts.extend(leaf.describe() for leaf in conditions.leaves())  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - conditions are searched best effort
        parts.append(repr(conditions))
    return "\n".join(parts).upper()


def _needles(code: str) -> list[str]:
    code = code.strip().upper()
    needles = {code, re.sub(r"[\s-]+", "_", code)}
    xid = re.fullmatch(r"(S?XID)[\s_-]*(\d+)", code)
    if xid:
        needles.add(f"{xid.group(1)}_{xid.group(2)}")
    return sorted(n for n in needles if n)


def search_rules(code: str, rules: Iterable[Any] | None = None, *, limit: int = MAX_RESULTS) -> dict[str, Any]:
    """Rules whose id, scene, description, templates or conditions mention ``code``."""
    code = str(code)[:MAX_CODE_CHARS]
    if not code.strip():
        return {"error": "rule_search needs a code, e.g. XID_79 or NCCL_TIMEOUT"}
    pool: tuple[Any, ...] | str = tuple(rules) if rules is not None else _builtin_rules()
    if isinstance(pool, str):
        return {"code": code, "items": [], "note": pool}
    if not pool:
        return {"code": code, "items": [], "note": "no rules available"}
    needles = _needles(code)
    items: list[dict[str, Any]] = []
    for rule in sorted(pool, key=lambda r: str(getattr(r, "id", ""))):
        haystack = _haystack(rule)
        if not any(n in haystack for n in needles):
            continue
        summary = getattr(rule, "summary", None)
        items.append(
            {
                "id": getattr(rule, "id", None),
                "scene": getattr(rule, "scene", None),
                "severity": getattr(rule, "severity", None),
                "action": getattr(rule, "action", None),
                "description": str(getattr(rule, "description", "") or "")[:200],
                "summary": str(getattr(summary, "text", "") or "")[:200],
            }
        )
        if len(items) >= limit:
            break
    return {"code": code, "items": items} if items else {"code": code, "items": [], "note": "no rule mentions it"}
