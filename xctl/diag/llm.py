"""The LLM step: a bounded tool-calling loop over the OpenAI Chat Completions API.

The model gets the deterministic findings first, then may call the read-only tools of
:mod:`xctl.diag.tools` for at most ``max_steps`` turns (and while the token budget lasts).
Then one final request *without* tools asks for the report as strict JSON, whose citations
are checked against the events the model was shown (:mod:`xctl.diag.evidence`).

Every request sets ``max_tokens``; the whole step has one deadline (``timeout_s``) that
bounds every request, so an unreachable or silent server fails within it. The transport is a
plain function ``send(body, timeout_s) -> response dict``; :func:`openai_sender` makes one
with the official ``openai`` package (imported lazily: it is the ``xctl[ai]`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from xctl.core.errors import UsageError
from xctl.diag.evidence import CheckedReport, MalformedAnswerError, Refs, check_report, parse_answer
from xctl.diag.report import LLMError
from xctl.diag.tools import TOOL_SPECS, ToolBox

log = logging.getLogger(__name__)

DEFAULT_MODEL: Final = "gpt-4o-mini"
DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
DEFAULT_MAX_STEPS: Final = 6
DEFAULT_MAX_TOKENS: Final = 1024
DEFAULT_TOKEN_BUDGET: Final = 24_000
DEFAULT_TIMEOUT_S: Final = 60.0
MAX_CALLS_PER_TURN: Final = 4
#: Sent as the API key to a custom --base-url when OPENAI_API_KEY is not set (local servers
#: such as llama-server, vLLM or Ollama do not check it).
NO_KEY: Final = "sk-no-key-required"
#: A JSON object merged into every request body, for server-specific fields the API does not
#: define, e.g. ``{"cache_prompt": false}`` for llama-server (repeatable output at temperature 0).
EXTRA_BODY_ENV: Final = "XCTL_LLM_EXTRA_BODY"

Send = Callable[[dict[str, Any], float], dict[str, Any]]

REPORT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "root_cause": {"type": "string", "description": "one or two sentences: what broke, where, and why"},
        "evidence": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "claim": {"type": "string"},
                    "refs": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "event ids (e85) or timestamps in ms (1732350000123) shown above",
                    },
                },
                "required": ["claim", "refs"],
                "additionalProperties": False,
            },
        },
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "actions": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["root_cause", "evidence", "confidence", "actions"],
    "additionalProperties": False,
}

SYSTEM_PROMPT: Final = """\
You are xctl diag, a site-reliability assistant for GPU/AI clusters. You explain why a \
process or job is stuck, slow or dead.
xctl's deterministic causal engine has already analysed the problem; its findings come first \
and are reliable: build on them, do not contradict them without evidence.
You may call read-only tools to check facts. You cannot change anything on the cluster; you \
only recommend actions to a human operator.
Never invent events. Every claim must cite the events it rests on, by their id (like "e85") or \
their ts (milliseconds) exactly as shown in the findings or tool results. Symptoms listed as \
not blamed (NCCL timeouts, stalled transports on victim ranks) are consequences, not causes.
Be brief."""

FINAL_PROMPT: Final = """\
Stop investigating and write the diagnosis now. Answer with ONE JSON object and nothing else, \
following this schema:
{schema}
- root_cause: one or two sentences.
- evidence: each claim with refs = event ids (e.g. "e85") or ts values (e.g. "1732350000123") \
copied from the findings or tool results above. A claim without valid refs is marked unsupported.
- confidence: a number from 0 to 1.
- actions: what an operator should do, most important first (they are not executed)."""


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """Settings of the LLM step. Use :meth:`resolve` to apply flags and environment."""

    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    max_tokens: int = DEFAULT_MAX_TOKENS
    token_budget: int = DEFAULT_TOKEN_BUDGET
    timeout_s: float = DEFAULT_TIMEOUT_S
    temperature: float = 0.0
    extra_body: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise UsageError(f"max steps must be 0 or more, got {self.max_steps}")
        if self.max_tokens < 16:
            raise UsageError(f"max tokens must be at least 16, got {self.max_tokens}")
        if not self.timeout_s > 0:
            raise UsageError(f"the LLM timeout must be positive, got {self.timeout_s}")

    @classmethod
    def resolve(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        max_steps: int | None = None,
        timeout_s: float | None = None,
        env: dict[str, str] | None = None,
    ) -> LLMConfig:
        """Flags over the environment: ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``,
        ``XCTL_LLM_EXTRA_BODY`` (a JSON object sent with every request)."""
        environ = os.environ if env is None else env
        return cls(
            model=model or DEFAULT_MODEL,
            base_url=(base_url or environ.get("OPENAI_BASE_URL") or None),
            api_key=environ.get("OPENAI_API_KEY") or None,
            max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps,
            timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
            extra_body=_extra_body(environ.get(EXTRA_BODY_ENV)),
        )

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")

    @property
    def custom_server(self) -> bool:
        return self.base_url is not None and self.url != DEFAULT_BASE_URL


def _extra_body(raw: str | None) -> dict[str, Any] | None:
    if not raw or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{EXTRA_BODY_ENV} is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{EXTRA_BODY_ENV} must be a JSON object, e.g. '{{\"cache_prompt\": false}}'")
    return value


# ----------------------------------------------------------------------------- transport
def openai_sender(config: LLMConfig) -> Send:
    """A ``send`` function over the official ``openai`` client; raises LLMError when the
    package is missing or no API key is set for the default (OpenAI) server."""
    try:
        import openai
    except ImportError as exc:
        raise LLMError(
            "the LLM step needs the openai package, which is not installed: pip install 'xctl[ai]'"
        ) from exc
    api_key = config.api_key
    if not api_key:
        if not config.custom_server:
            raise LLMError(
                "OPENAI_API_KEY is not set: export it, or point --base-url / OPENAI_BASE_URL at an "
                "OpenAI-compatible server (vLLM, Ollama, llama-server, a gateway)"
            )
        api_key = NO_KEY
    client = openai.OpenAI(api_key=api_key, base_url=config.url, timeout=config.timeout_s, max_retries=0)
    where = config.url
    extra_body = dict(config.extra_body) if config.extra_body else None

    def send(body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        try:
            response = client.chat.completions.create(**body, timeout=timeout_s, extra_body=extra_body)
        except openai.APITimeoutError as exc:
            raise LLMError(f"the LLM server at {where} did not answer within {timeout_s:.1f}s") from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise LLMError(f"cannot reach the LLM server at {where}: {_short(cause)}") from exc
        except openai.AuthenticationError as exc:
            raise LLMError(
                f"the LLM server at {where} refused the API key (401): check OPENAI_API_KEY", status=401
            ) from exc
        except openai.PermissionDeniedError as exc:
            raise LLMError(f"the LLM server at {where} denied access (403): {_api_message(exc)}", status=403) from exc
        except openai.RateLimitError as exc:
            raise LLMError(
                f"the LLM server at {where} is rate limiting (429): try again later ({_api_message(exc)})", status=429
            ) from exc
        except openai.NotFoundError as exc:
            raise LLMError(
                f"the LLM server at {where} has no such model or endpoint (404): check --model "
                f"{config.model!r} and --base-url ({_api_message(exc)})",
                status=404,
            ) from exc
        except openai.APIStatusError as exc:
            raise LLMError(
                f"the LLM server at {where} answered {exc.status_code}: {_api_message(exc)}", status=exc.status_code
            ) from exc
        except (openai.OpenAIError, ValueError) as exc:  # garbage bodies, validation errors
            raise LLMError(
                f"the LLM server at {where} sent an answer that is not a chat completion: {_short(exc)}"
            ) from exc
        dump = getattr(response, "model_dump", None)
        if dump is None:
            raise LLMError(f"the LLM server at {where} sent an answer that is not a chat completion")
        data = dump()
        if not isinstance(data, dict):
            raise LLMError(f"the LLM server at {where} sent an answer that is not a chat completion")
        return data

    return send


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return _short(Exception(err["message"]))
    return _short(exc)


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopResult:
    report: CheckedReport
    tools_called: list[dict[str, Any]]
    steps: int
    requests: int
    tokens: int
    stopped: str  # "answered" (the model answered before the limits), "max_steps", "budget"
    notes: list[str] = field(default_factory=list)


@dataclass
class _Run:
    send: Send
    config: LLMConfig
    deadline: float
    clock: Callable[[], float]
    requests: int = 0
    tokens: int = 0

    def ask(self, body: dict[str, Any]) -> dict[str, Any]:
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise LLMError(f"the LLM step ran out of time ({self.config.timeout_s:g}s)")
        self.requests += 1
        response = self.send(body, remaining)
        usage = response.get("usage") if isinstance(response, dict) else None
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        if isinstance(total, int) and total > 0:
            self.tokens += total
        else:  # servers that do not report usage: about four characters a token
            self.tokens += len(json.dumps(body.get("messages", []), default=str)) // 4 + self.config.max_tokens // 4
        return response


def _message(response: dict[str, Any]) -> dict[str, Any]:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LLMError("the LLM server's answer has no choices: not a chat completion")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise LLMError("the LLM server's answer has no message: not a chat completion")
    return message


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The well-formed tool calls of a message, in the shape the API takes back."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            continue
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments if arguments is not None else {})
        name = str(fn.get("name") or "")
        out.append({"id": call["id"], "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def run_loop(
    send: Send,
    findings: dict[str, Any],
    toolbox: ToolBox,
    config: LLMConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    task: str = "Diagnose the target.",
) -> LoopResult:
    """Findings → at most ``config.max_steps`` tool turns → one final request without tools.

    ``findings`` is what the model is told first (the compact `why`, top events); the events
    in it are registered in ``toolbox.refs`` so the report may cite them. Raises LLMError.
    """
    refs: Refs = toolbox.refs
    refs.collect(findings)
    run = _Run(send, config, clock() + config.timeout_s, clock)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": f"{task}\nDeterministic findings (JSON):\n{json.dumps(findings, separators=(',', ':'))}\n"
            f"You have at most {config.max_steps} tool turns.",
        },
    ]
    steps = 0
    stopped = "max_steps"
    notes: list[str] = []
    early: CheckedReport | None = None
    while steps < config.max_steps:
        if run.tokens >= config.token_budget - config.max_tokens:
            stopped = "budget"
            notes.append(f"token budget ({config.token_budget}) reached after {steps} tool turns")
            break
        body = {
            "model": config.model,
            "messages": messages,
            "tools": list(TOOL_SPECS),
            "tool_choice": "auto",
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
        }
        message = _message(run.ask(body))
        calls = _tool_calls(message)
        if not calls:
            early = _try_report(message.get("content"), refs)
            stopped = "answered"
            if early is None and message.get("content"):
                messages.append({"role": "assistant", "content": str(message["content"])[:4000]})
            break
        steps += 1
        messages.append({"role": "assistant", "content": message.get("content") or None, "tool_calls": calls})
        for i, call in enumerate(calls):
            fn = call["function"]
            name = str(fn.get("name") or "")
            if i >= MAX_CALLS_PER_TURN:
                result = json.dumps({"error": f"at most {MAX_CALLS_PER_TURN} tool calls per turn; not run"})
            else:
                result = toolbox.call(name, fn.get("arguments"))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    if early is not None:
        return LoopResult(early, _calls(toolbox), steps, run.requests, run.tokens, stopped, notes)

    messages.append({"role": "user", "content": FINAL_PROMPT.format(schema=json.dumps(REPORT_SCHEMA))})
    final = {
        "model": config.model,
        "messages": messages,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "diagnosis", "strict": True, "schema": REPORT_SCHEMA},
        },
    }
    try:
        message = _message(run.ask(final))
    except LLMError as exc:
        if exc.status not in (400, 422):
            raise
        # Some OpenAI-compatible servers reject json_schema response formats: ask once more
        # without it (the prompt carries the schema anyway).
        log.info("diag: the server refused response_format (%s); asking again without it", exc)
        notes.append("the server refused a JSON-schema response format; asked without it")
        del final["response_format"]
        message = _message(run.ask(final))
    content = message.get("content")
    try:
        report = check_report(parse_answer(content), refs)
    except MalformedAnswerError as exc:
        raise LLMError(f"the model's report is not the JSON asked for: {exc}") from exc
    return LoopResult(report, _calls(toolbox), steps, run.requests, run.tokens, stopped, notes)


def _try_report(content: object, refs: Refs) -> CheckedReport | None:
    """An answer given without tool calls, when it already is a valid report."""
    try:
        return check_report(parse_answer(content), refs)
    except MalformedAnswerError:
        return None


def _calls(toolbox: ToolBox) -> list[dict[str, Any]]:
    return [c.to_json() for c in toolbox.calls]
