"""LLM diagnosis over the query API: rules first, then a model with read-only tools.

Public API::

    from xctl.diag import DiagCache, LLMConfig, LLMError, diagnose

    config = LLMConfig.resolve(model=None, base_url=None, max_steps=6)   # flags over OPENAI_* env
    with QueryClient(address) as client:
        report = diagnose(client, "node3:4812", explain=False, config=config, cache=DiagCache.default())
    report.to_json()   # {"apiVersion": "xctl/v1", "kind": "Diagnosis", "source": "rules" | "llm", ...}

``diagnose`` raises :class:`LLMError` (exit 1) when the model is needed but cannot be used
(no ``openai`` package, no key, unreachable, timeout, refused, malformed answer); its
``fallback`` is the deterministic diagnosis, to be shown anyway. ``openai`` is imported
only then (the ``xctl[ai]`` extra).
"""

from xctl.diag.cache import DiagCache
from xctl.diag.evidence import Refs, check_report, parse_answer
from xctl.diag.findings import compact_why, deterministic, fingerprint
from xctl.diag.llm import DEFAULT_MODEL, LLMConfig, Send, openai_sender, run_loop
from xctl.diag.report import Diagnosis, Evidence, LLMError, Narrative
from xctl.diag.rulesearch import search_rules
from xctl.diag.service import diagnose
from xctl.diag.tools import TOOL_NAMES, TOOL_SPECS, ToolBox

__all__ = [
    "DEFAULT_MODEL",
    "TOOL_NAMES",
    "TOOL_SPECS",
    "DiagCache",
    "Diagnosis",
    "Evidence",
    "LLMConfig",
    "LLMError",
    "Narrative",
    "Refs",
    "Send",
    "ToolBox",
    "check_report",
    "compact_why",
    "deterministic",
    "diagnose",
    "fingerprint",
    "openai_sender",
    "parse_answer",
    "run_loop",
    "search_rules",
]
