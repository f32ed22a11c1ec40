"""A tiny HTTP server that records registry notifications: the registry's own account
of what was pushed and mounted, so tests count uploads without trusting our counters."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness.util import free_port


class WebhookSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.port = free_port()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                try:
                    events = json.loads(body).get("events", [])
                except ValueError:
                    events = []
                with sink.lock:
                    sink.events.extend(events)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def clear(self) -> None:
        with self.lock:
            self.events.clear()

    def blob_events(self, action: str) -> list[dict[str, Any]]:
        """Blob-level events ('push' = upload committed, 'mount' = cross-repo mount)."""
        return [
            e
            for e in self.snapshot()
            if e.get("action") == action
            and e.get("target", {}).get("mediaType") in ("application/octet-stream", None, "")
        ]
