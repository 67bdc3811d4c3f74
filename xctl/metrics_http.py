"""Serving a prometheus_client registry over HTTP, stoppably (aggregator and agent alike)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from xctl.core.errors import XctlError

log = logging.getLogger(__name__)


class MetricsServer:
    """prometheus_client's HTTP server and its thread, stoppable."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2.0)



def start_server(registry: CollectorRegistry, bind: str, port: int, *, what: str) -> MetricsServer:
    """Serve ``registry`` on http://bind:port/metrics in a daemon thread."""
    addr = "0.0.0.0" if bind in ("*", "") else bind
    try:
        started = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise XctlError(
            f"cannot serve {what} /metrics on {addr}:{port}: {exc.strerror or exc} "
            "(choose another --metrics-port, or 0 to disable it)"
        ) from exc
    if not isinstance(started, tuple):  # prometheus_client < 0.20 returned nothing
        raise XctlError("this prometheus-client does not hand back its HTTP server: upgrade prometheus-client")
    httpd, thread = started
    log.info("%s /metrics on http://%s:%d/metrics", what, addr, httpd.server_port)
    return MetricsServer(httpd, thread)
