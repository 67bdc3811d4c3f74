"""A real HTTP server on 127.0.0.1 that speaks the OpenAI Chat Completions API.

It plays scripted turns (tool calls, answers, HTTP errors, garbage, silence), records every
request it received, and rejects what the real API rejects (400): a tool result that answers
no call, a tool call left unanswered, ``tool_choice`` without ``tools``, a bad ``max_tokens``,
no model, no messages. ``stream: true`` is answered with server-sent events.

    with FakeOpenAI([tool_calls(call("events", node="n1")), answer('{"root_cause": ...}')]) as fake:
        OpenAI(base_url=fake.url, api_key="k").chat.completions.create(...)
        fake.requests  # the JSON bodies received, in order
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Body = dict[str, Any]


@dataclass
class Turn:
    """One scripted reply. ``kind``: tool_calls | answer | status | garbage | hang."""

    kind: str
    content: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    message: str = ""
    hang_s: float = 0.0


Script = Turn | Callable[[Body], Turn]

_ids = itertools.count(1)


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "arguments": args}


def tool_calls(*calls: dict[str, Any], content: str | None = None) -> Turn:
    return Turn("tool_calls", content=content, calls=list(calls))


def answer(content: str | dict[str, Any]) -> Turn:
    return Turn("answer", content=content if isinstance(content, str) else json.dumps(content))


def status(code: int, message: str = "error") -> Turn:
    return Turn("status", status=code, message=message)


def garbage() -> Turn:
    return Turn("garbage")


def hang(seconds: float = 3600.0) -> Turn:
    return Turn("hang", hang_s=seconds)


def validate(body: Any) -> str | None:
    """What the real API would answer 400 to, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if "tool_choice" in body and not body.get("tools"):
        return "'tool_choice' is only allowed when 'tools' are specified"
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body and (not isinstance(body[key], int) or body[key] < 1):
            return f"'{key}' must be a positive integer"
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            return "'tools' must be a non-empty array"
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
                return "each tool must be {type: function, function: {name, parameters}}"
    pending: set[str] = set()
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "user", "assistant", "tool", "developer"):
            return f"messages[{i}].role is invalid"
        if role == "tool":
            if msg.get("tool_call_id") not in pending:
                return (
                    f"Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    f"message with 'tool_calls' (messages[{i}].tool_call_id={msg.get('tool_call_id')!r})"
                )
            pending.discard(msg["tool_call_id"])
            continue
        if pending:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {sorted(pending)}"
            )
        if role == "assistant":
            for tc in msg.get("tool_calls") or []:
                if not isinstance(tc, dict) or not tc.get("id") or not isinstance(tc.get("function"), dict):
                    return f"messages[{i}].tool_calls is malformed"
                pending.add(tc["id"])
    if pending:
        return f"tool_call_ids without response messages: {sorted(pending)}"
    return None


class FakeOpenAI:
    def __init__(
        self,
        script: list[Script] | None = None,
        *,
        forever: Script | None = None,
        api_key: str | None = None,
    ) -> None:
        self.script: list[Script] = list(script or [])
        self.forever = forever
        self.api_key = api_key
        self.requests: list[Body] = []
        self.headers: list[dict[str, str]] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._handle(self)

            def do_GET(self) -> None:
                self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def _send_json(self, code: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._handler_cls = Handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-openai", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def _next(self, body: Body) -> Turn:
        with self._lock:
            step: Script | None = self.script.pop(0) if self.script else self.forever
        if step is None:
            return status(500, "the fake server's script is exhausted")
        return step(body) if callable(step) else step

    def _handle(self, h: Any) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        if not h.path.rstrip("/").endswith("/chat/completions"):
            h._send_json(404, {"error": {"message": f"no route {h.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            error = {"message": "We could not parse the JSON body", "type": "invalid_request_error"}
            h._send_json(400, {"error": error})
            return
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in h.headers.items()})
        if self.api_key is not None and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            h._send_json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                         "code": "invalid_api_key"}})
            return
        problem = validate(body)
        if problem is not None:
            self.rejected.append(problem)
            h._send_json(400, {"error": {"message": problem, "type": "invalid_request_error"}})
            return
        turn = self._next(body)
        if turn.kind == "hang":
            self._stop.wait(turn.hang_s)
            h.close_connection = True
            return
        if turn.kind == "status":
            h._send_json(turn.status, {"error": {"message": turn.message, "type": "server_error"}})
            return
        if turn.kind == "garbage":
            junk = b"<html>this is not json"
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(junk)))
            h.end_headers()
            h.wfile.write(junk)
            return
        message: dict[str, Any] = {"role": "assistant", "content": turn.content}
        finish = "stop"
        if turn.kind == "tool_calls":
            message["tool_calls"] = [
                {
                    "id": f"call_{next(_ids)}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                }
                for c in turn.calls
            ]
            finish = "tool_calls"
        prompt_tokens = len(json.dumps(body.get("messages"))) // 4
        completion_tokens = len(json.dumps(message)) // 4
        if body.get("stream"):
            self._stream(h, body, message, finish)
            return
        h._send_json(
            200,
            {
                "id": f"chatcmpl-{next(_ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    @staticmethod
    def _stream(h: Any, body: Body, message: dict[str, Any], finish: str) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.close_connection = True
        h.end_headers()
        base = {"id": f"chatcmpl-{next(_ids)}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body["model"]}
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        content = message.get("content") or ""
        deltas += [{"content": content[i : i + 8]} for i in range(0, len(content), 8)]
        for i, tc in enumerate(message.get("tool_calls") or []):
            deltas.append({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                           "function": {"name": tc["function"]["name"], "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": tc["function"]["arguments"]}}]})
        for delta in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            h.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        h.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        h.wfile.flush()


def tool_results(body: Body) -> list[Any]:
    """The parsed contents of the tool messages in a request, in order."""
    return [json.loads(m["content"]) for m in body["messages"] if m.get("role") == "tool"]


def tool_names(body: Body) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools") or []]
