"""A threaded HTTP server on 127.0.0.1 for the fake API servers of the tests (context manager)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Request:
    """One request a fake server saw (``body`` parsed from JSON, or None)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


class LoopbackHttpServer:
    """Serves ``handler`` on a free loopback port from a daemon thread while in a ``with`` block."""

    def _serve(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # a short poll interval: shutdown() waits up to one interval (0.5 s by default, per test)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"
