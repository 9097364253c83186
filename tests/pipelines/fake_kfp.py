"""A small fake Kubeflow Pipelines API server (v2beta1 REST) on loopback, for the real ``kfp.Client``.

No KFP backend can run here (it needs a cluster, Argo and MySQL), so this server answers the
requests ``kfp.Client.create_run_from_pipeline_package`` and ``get_run`` make, over real
HTTP with the JSON the API server sends (field names of ``backend/api/v2beta1``):

- ``GET /apis/v2beta1/healthz``: single-user;
- ``GET /apis/v2beta1/experiments`` (``filter`` on ``display_name``), ``POST`` to create one;
- ``POST /apis/v2beta1/runs``: the run is stored as sent (pipeline spec, runtime config,
  service account) and answered PENDING;
- ``GET /apis/v2beta1/runs/{id}``: the n-th GET answers the n-th state of :attr:`states`
  (the last one repeats), as a run moves on the server.

Every request is kept in :attr:`requests` (method, path, query, JSON body, headers).
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback_http import LoopbackHttpServer, Request

PREFIX = "/apis/v2beta1"




class FakeKfpServer(LoopbackHttpServer):
    """Use as a context manager; ``url`` is the ``--host`` to give the client."""

    def __init__(self, states: tuple[str, ...] = ("PENDING", "RUNNING", "SUCCEEDED")) -> None:
        self.states = list(states)
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.gets: dict[str, int] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._serve(self._handler_class(), "fake-kfp")

    def received(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == PREFIX + path]

    # ------------------------------------------------------------------ serving

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                request = Request(self.command, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()},
                                  json.loads(raw) if raw else None,
                                  {k.lower(): v for k, v in self.headers.items()})
                with server._lock:
                    server.requests.append(request)
                    code, payload = server._answer(request)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

        return Handler

    def _answer(self, request: Request) -> tuple[int, Any]:
        path = request.path.removeprefix(PREFIX)
        if request.method == "GET" and path == "/healthz":
            return 200, {"commit_sha": "fake", "tag_name": "2.5.0", "multi_user": False}
        if path == "/experiments":
            return self._experiments(request)
        if request.method == "POST" and path == "/runs":
            run_id = str(uuid.uuid4())
            run = dict(request.body or {}, run_id=run_id, state="PENDING", created_at="2026-12-01T10:00:00Z")
            self.runs[run_id] = run
            return 200, run
        if request.method == "GET" and path.startswith("/runs/"):
            run_id = path.removeprefix("/runs/")
            if run_id not in self.runs:
                return 404, {"code": 5, "message": f"run {run_id} not found"}
            n = self.gets.get(run_id, 0)
            self.gets[run_id] = n + 1
            self.runs[run_id]["state"] = self.states[min(n, len(self.states) - 1)]
            return 200, self.runs[run_id]
        return 404, {"code": 5, "message": f"fake KFP server: no route {request.method} {request.path}"}

    def _experiments(self, request: Request) -> tuple[int, Any]:
        if request.method == "POST":
            experiment = dict(request.body or {}, experiment_id=str(uuid.uuid4()))
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        wanted = None
        for predicate in json.loads(request.query.get("filter") or "{}").get("predicates", []):
            if predicate.get("key") == "display_name":
                wanted = predicate.get("string_value") or predicate.get("stringValue")
        found = [e for e in self.experiments.values() if wanted is None or e.get("display_name") == wanted]
        return 200, {"experiments": found, "total_size": len(found)} if found else {}
