"""``exec:COMMAND`` — an external probe speaking the JSON-lines format (DESIGN §3).

The command (split like a shell would, but run without one: write ``exec:sh -c '…'`` for
pipes) runs as a child in its own process group. Each stdout line is parsed with
:func:`xctl.core.events.parse_line` and emitted; a rejected line is counted with
``ctx.bad(reason)`` and logged at most once per 10 s with the number suppressed. Lines over
64 KiB are discarded without ever being held in memory. stderr is drained alongside and
logged (bounded, rate-limited). When the child ends on its own the probe raises
:class:`ProbeError` and the supervisor decides whether to restart it; when ``ctx.stop`` is
set the child's process group gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
from typing import IO, Final

from xctl.core.errors import EventError, ProbeError
from xctl.core.events import MAX_LINE_BYTES, parse_line
from xctl.probes.base import ProbeContext

log = logging.getLogger(__name__)

#: Bytes asked of the pipe per read.
READ_CHUNK: Final = 64 * 1024
#: stderr lines longer than this are dropped (a note is logged instead).
MAX_STDERR_LINE: Final = 4096
#: stderr lines logged at WARNING per window; the rest go to DEBUG with a count.
STDERR_BURST: Final = 20
#: How long a stopping child gets between SIGTERM and SIGKILL.
TERM_GRACE_S: Final = 1.0
#: How often the read loop looks at ``ctx.stop`` when the child is quiet.
POLL_S: Final = 0.1
#: How long a child that closed its stdout gets to exit before it is stopped.
EOF_GRACE_S: Final = 1.0
#: Rejected-line log window.
BAD_LOG_WINDOW_MS: Final = 10_000


class LineSplitter:
    """Splits a byte stream into lines holding at most ``max_bytes`` in memory.

    :meth:`feed` returns complete lines (without the newline or a trailing CR); a line
    longer than ``max_bytes`` is returned as ``None`` once its end is seen, and its bytes
    are dropped as they arrive.
    """

    __slots__ = ("_buf", "_discarding", "max_bytes")

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            chunk = data[start:] if newline < 0 else data[start:newline]
            if not self._discarding:
                # One byte of slack: the last byte may be a CR that _take strips.
                if len(self._buf) + len(chunk) > self.max_bytes + 1:
                    self._buf.clear()
                    self._discarding = True
                else:
                    self._buf += chunk
            if newline < 0:
                return out
            out.append(self._take())
            start = newline + 1

    def flush(self) -> list[bytes | None]:
        """The unterminated last line at end of stream, if any."""
        if self._discarding or self._buf:
            return [self._take()]
        return []

    def _take(self) -> bytes | None:
        if self._discarding:
            self._discarding = False
            return None
        line = bytes(self._buf)
        self._buf.clear()
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_bytes:
            return None
        return line


class RateLimitedLog:
    """Allows ``burst`` messages per ``window_ms``; counts the rest so they can be reported."""

    __slots__ = ("_count", "_window_start", "burst", "suppressed", "window_ms")

    def __init__(self, window_ms: int, burst: int = 1) -> None:
        self.window_ms = window_ms
        self.burst = burst
        self.suppressed = 0
        self._window_start: int | None = None
        self._count = 0

    def allow(self, now_ms: int) -> int | None:
        """``None`` = stay quiet; otherwise log now, mentioning the returned suppressed count."""
        if self._window_start is None or now_ms - self._window_start >= self.window_ms:
            self._window_start = now_ms
            self._count = 0
        if self._count >= self.burst:
            self.suppressed += 1
            return None
        self._count += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


def bad_reason(exc: EventError) -> str:
    """The short ``ctx.bad`` reason for a rejected line."""
    if exc.field == "node":
        return "wrong_node"
    if exc.field == "line":
        return "line_too_long" if "too long" in str(exc) else "bad_json"
    return "bad_event"


class ExecProbe:
    """Runs an external JSON-lines probe and relays what it prints."""

    def __init__(
        self, command: str | list[str], heartbeat_s: float | None = None, *, term_grace_s: float = TERM_GRACE_S
    ) -> None:
        argv = _split(command) if isinstance(command, str) else list(command)
        if not argv or not argv[0]:
            raise ProbeError("exec: the command is empty: write exec:COMMAND, e.g. exec:/usr/local/bin/my-probe")
        if heartbeat_s is not None and heartbeat_s <= 0:
            raise ProbeError(f"exec: heartbeat_s must be positive seconds or None, not {heartbeat_s!r}")
        self.argv = argv
        self.heartbeat_s = heartbeat_s
        self.term_grace_s = term_grace_s
        self.name = f"exec:{os.path.basename(argv[0])}"
        self._bad_log = RateLimitedLog(BAD_LOG_WINDOW_MS)
        self._err_log = RateLimitedLog(BAD_LOG_WINDOW_MS, burst=STDERR_BURST)
        self._last_stderr = ""

    @classmethod
    def from_spec(cls, arg: str | None) -> ExecProbe:
        if arg is None or not arg.strip():
            raise ProbeError("exec needs a command: write exec:COMMAND, e.g. exec:/usr/local/bin/my-probe --json")
        argv = _split(arg)
        if shutil.which(argv[0]) is None:
            raise ProbeError(
                f"exec: command {argv[0]!r} not found or not executable: "
                "give a path to an executable file or a command on PATH"
            )
        return cls(argv)

    def describe(self) -> str:
        text = shlex.join(self.argv)
        return "external probe: " + (text if len(text) <= 120 else text[:117] + "...")

    # -- running ---------------------------------------------------------------------------

    def run(self, ctx: ProbeContext) -> None:
        proc = self._spawn(ctx)
        log.info("%s: started pid %d: %s", self.name, proc.pid, shlex.join(self.argv))
        try:
            ended = self._pump(proc, ctx)
        finally:
            _stop_child(proc, self.name, self.term_grace_s)
        if ctx.stop.is_set():
            return
        raise ProbeError(self._ended_message(proc, ended))

    def _spawn(self, ctx: ProbeContext) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["XCTL_NODE"] = ctx.node
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            return subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ProbeError(f"{self.name}: cannot start {self.argv[0]!r}: {exc.strerror or exc}") from exc

    def _pump(self, proc: subprocess.Popen[bytes], ctx: ProbeContext) -> str:
        """Relay output until stop, stdout EOF or child exit; returns why it ended."""
        if proc.stdout is None or proc.stderr is None:  # pragma: no cover - Popen(PIPE) always sets them
            raise ProbeError(f"{self.name}: child has no pipes")
        out_fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, LineSplitter())
            sel.register(proc.stderr, selectors.EVENT_READ, LineSplitter(MAX_STDERR_LINE))
            while not ctx.stop.is_set():
                ready = sel.select(POLL_S)
                for key, _ in ready:
                    self._read(key, sel, out_fd, ctx)
                if out_fd not in {key.fd for key in sel.get_map().values()}:
                    return self._after_eof(proc, sel, out_fd, ctx)
                if not ready and proc.poll() is not None:
                    # Exited; a grandchild may still hold the pipe open, so drain what is there.
                    self._drain(sel, out_fd, ctx)
                    return "exited"
        return "stopped"

    def _after_eof(
        self, proc: subprocess.Popen[bytes], sel: selectors.BaseSelector, out_fd: int, ctx: ProbeContext
    ) -> str:
        for _ in range(int(EOF_GRACE_S / 0.05)):
            if proc.poll() is not None:
                break
            if ctx.stop.wait(0.05):
                return "stopped"
        self._drain(sel, out_fd, ctx)
        return "exited" if proc.poll() is not None else "closed stdout"

    def _drain(self, sel: selectors.BaseSelector, out_fd: int, ctx: ProbeContext) -> None:
        for _ in range(1024):  # bounded: a grandchild may keep writing forever
            ready = sel.select(0)
            if not ready:
                return
            for key, _ in ready:
                self._read(key, sel, out_fd, ctx)

    def _read(self, key: selectors.SelectorKey, sel: selectors.BaseSelector, out_fd: int, ctx: ProbeContext) -> None:
        """One read from a ready pipe; at EOF the pipe is flushed and unregistered."""
        splitter: LineSplitter = key.data
        try:
            data = os.read(key.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        lines = splitter.feed(data) if data else splitter.flush()
        for line in lines:
            if key.fd == out_fd:
                self._on_line(line, ctx)
            else:
                self._on_stderr(line, ctx)
        if not data:
            sel.unregister(key.fileobj)

    def _on_line(self, line: bytes | None, ctx: ProbeContext) -> None:
        ctx.beat()
        if line is not None and not line.strip():
            return
        now = ctx.clock()
        try:
            if line is None:
                raise EventError("line", f"at most {MAX_LINE_BYTES} bytes", detail="line too long")
            event = parse_line(line, now_ms=now, node=ctx.node)
        except EventError as exc:
            reason = bad_reason(exc)
            ctx.bad(reason)
            suppressed = self._bad_log.allow(now)
            if suppressed is not None:
                log.warning(
                    "%s: rejected a line (%s): %s%s",
                    self.name,
                    reason,
                    exc,
                    f" ({suppressed} more rejected lines not logged)" if suppressed else "",
                )
            return
        ctx.emit(event)

    def _on_stderr(self, line: bytes | None, ctx: ProbeContext) -> None:
        text = f"<stderr line over {MAX_STDERR_LINE} bytes dropped>" if line is None else _show(line)
        if not text:
            return
        self._last_stderr = text
        suppressed = self._err_log.allow(ctx.clock())
        if suppressed is None:
            log.debug("%s stderr: %s", self.name, text)
        else:
            log.warning(
                "%s stderr: %s%s",
                self.name,
                text,
                f" ({suppressed} stderr lines logged at debug only)" if suppressed else "",
            )

    def _ended_message(self, proc: subprocess.Popen[bytes], ended: str) -> str:
        code = proc.returncode
        if ended == "closed stdout":
            what = "closed its stdout and was stopped"
        elif code is not None and code < 0:
            what = f"was killed by signal {_signame(-code)}"
        else:
            what = f"exited with code {code}"
        tail = f" (last stderr: {self._last_stderr[:200]})" if self._last_stderr else ""
        return f"{self.name} {what}{tail}"


def _split(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ProbeError(f"exec: cannot split {command!r} into arguments ({exc}): check the quotes") from exc
    if not argv:
        raise ProbeError("exec: the command is empty: write exec:COMMAND, e.g. exec:/usr/local/bin/my-probe")
    return argv


def _stop_child(proc: subprocess.Popen[bytes], name: str, grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL after the grace period; always reaps."""
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s: pid %d ignored SIGTERM for %.1f s; killing it", name, proc.pid, grace_s)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(max(grace_s, 1.0))
        # Grandchildren left in the group (the leader exited on its own) go too.
        _signal_group(proc, signal.SIGKILL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: could not stop pid %d: %s", name, proc.pid, exc)
    finally:
        for pipe in (proc.stdout, proc.stderr):
            _close(pipe)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _close(pipe: IO[bytes] | None) -> None:
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()


def _show(line: bytes) -> str:
    text = line.decode("utf-8", "replace").rstrip()
    return text if len(text) <= 300 else text[:297] + "..."


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
