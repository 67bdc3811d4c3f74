"""A 60-second cache of diagnoses by (target, graph fingerprint, settings).

In-process (a dict) and on disk under ``$XDG_CACHE_HOME/xctl/diag`` (default
``~/.cache/xctl/diag``), so a second `xctl diag` run within the TTL is served without asking
the model again. Best effort: an unreadable, corrupt or foreign entry is a miss, a failed
write is logged and ignored. Files are private to the user (0600 in a 0700 directory) and
hold only the report — never the API key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from xctl.diag.report import Diagnosis

log = logging.getLogger(__name__)

TTL_S: Final = 60.0
MAX_FILES: Final = 200
MAX_MEMORY: Final = 256
MAX_FILE_BYTES: Final = 1 << 20


def default_dir(env: dict[str, str] | None = None) -> Path:
    environ = os.environ if env is None else env
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xctl" / "diag"


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class DiagCache:
    """``get(key)`` / ``put(key, diagnosis)``; ``directory=None`` keeps it in memory only."""

    def __init__(
        self, directory: Path | None = None, *, ttl_s: float = TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.clock = clock
        self._memory: dict[str, tuple[float, dict[str, Any]]] = {}

    @classmethod
    def default(cls) -> DiagCache:
        return cls(default_dir())

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key[:40]}.json"

    def get(self, key: str) -> Diagnosis | None:
        now = self.clock()
        hit = self._memory.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return self._load(hit[1])
        path = self._path(key)
        if path is None:
            return None
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return None
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        created = entry.get("created")
        if not isinstance(created, int | float) or not 0 <= now - created < self.ttl_s:
            return None
        data = entry.get("diagnosis")
        if not isinstance(data, dict):
            return None
        self._memory[key] = (float(created), data)
        return self._load(data)

    @staticmethod
    def _load(data: dict[str, Any]) -> Diagnosis | None:
        try:
            return Diagnosis.from_json(data).with_cached(True)
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("diag cache: unreadable entry (%s)", exc)
            return None

    def put(self, key: str, diagnosis: Diagnosis) -> None:
        now = self.clock()
        data = diagnosis.with_cached(False).to_json()
        if len(self._memory) >= MAX_MEMORY:
            self._memory.clear()
        self._memory[key] = (now, data)
        path = self._path(key)
        if path is None or self.directory is None:
            return
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump({"key": key, "created": now, "diagnosis": data}, fh)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.info("diag cache: could not write %s: %s", path, exc)
            return
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Remove expired entries, and the oldest beyond MAX_FILES."""
        if self.directory is None:
            return
        try:
            files = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for i, path in enumerate(files):
            try:
                if len(files) - i > MAX_FILES or now - path.stat().st_mtime > self.ttl_s * 10:
                    path.unlink()
            except OSError:
                continue
