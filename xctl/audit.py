"""The append-only JSON-lines audit log of zap, shared by the agent and the aggregator."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    """One JSON object per line; writers are serialised. A write failure is logged and
    counted, never raised: a full disk must not stop a kill from being carried out."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.failures = 0

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(dict(record), separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError as exc:
                self.failures += 1
                log.error("cannot append to audit log %s: %s", self.path, exc)
