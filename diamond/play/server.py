"""The play page's HTTP server: one page and a small JSON API over a `PlaySession` (diamond/play/session.py).

Standard library only (ThreadingHTTPServer); a game thread steps the session at the target
frame rate, as the authors' pygame loop does (src/game/game.py, `clock.tick(fps)`), while request
threads read its state and change its settings under one lock.

The API is the page's whole reach: GET /api/state (JSON, frames as base64 PNG), GET
/api/frame.png, POST /api/action {"action": i}, POST /api/control {"do": "reset" | "step" |
"next_episode" | "prev_episode"}, POST /api/settings {name: value}. No path comes from the client
but a record name, which must be a plain folder name inside the server's record directory. POSTs
must be `application/json` (a cross-site page cannot send that without a CORS preflight, which
this server never grants) and the Host header must name this server, so another site open in the
same browser cannot drive the game (DNS rebinding; the Host check applies on loopback only).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from diamond.play.session import PlaySession

MAX_BODY = 4096
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class PlayServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, session: PlaySession) -> None:
        super().__init__((host, port), PlayHandler)
        self.session = session
        self.lock = threading.Lock()
        self.page = resources.files("diamond.play").joinpath("page.html").read_bytes()
        # Bound to loopback, only this machine's names may reach it; bound elsewhere (--host, a
        # deliberate choice), the names it is reached by are not known here.
        self.allowed_hosts = LOOPBACK_NAMES if host in LOOPBACK_NAMES else None
        self.stopping = threading.Event()
        self.frame_rate: float | None = None  # steps per second the game loop reached
        self.loop = threading.Thread(target=self._game_loop, name="play-game-loop", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.loop.start()

    def _game_loop(self) -> None:
        """Step the session at settings.fps (0: as fast as it goes) unless paused. Ticks are due
        on a fixed clock, so the wake-up delays do not add up to a lower rate."""
        ticks: list[float] = []
        due = time.perf_counter()
        while not self.stopping.is_set():
            with self.lock:
                paused, fps = self.session.settings.paused, self.session.settings.fps
                if not paused:
                    self.session.step()
            now = time.perf_counter()
            if paused:
                ticks, self.frame_rate, due = [], None, now
                self.stopping.wait(0.02)
                continue
            ticks = (ticks + [now])[-31:]
            if len(ticks) > 1:
                self.frame_rate = (len(ticks) - 1) / (ticks[-1] - ticks[0])
            # Behind by more than a tick (a slow step): start the clock again rather than race to catch up.
            due = max(due + 1 / fps, now) if fps > 0 else now
            if due > now:
                self.stopping.wait(due - now)

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()
        with self.lock:
            self.session.close()


class PlayHandler(BaseHTTPRequestHandler):
    server: PlayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request would flood the terminal
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _host_ok(self) -> bool:
        if self.server.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        return host in self.server.allowed_hosts

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unknown Host"})
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        if path == "/api/state":
            with self.server.lock:
                state = self.server.session.state()
            state["frame_rate"] = self.server.frame_rate
            return self._json(HTTPStatus.OK, state)
        if path == "/api/frame.png":
            with self.server.lock:
                png = base64.b64decode(self.server.session.state()["frame"])
            return self._send(HTTPStatus.OK, png, "image/png")
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unknown Host"})
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "application/json only"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"a JSON body of at most {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("a JSON object")
            with self.server.lock:
                self._apply(self.path, body)
        except KeyError:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except ValueError as e:  # json.JSONDecodeError is one
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        self._json(HTTPStatus.OK, {"ok": True})

    def _apply(self, path: str, body: dict[str, Any]) -> None:
        session = self.server.session
        if path == "/api/action":
            session.set_action(body.get("action"))
        elif path == "/api/settings":
            session.update(body)
        elif path == "/api/control":
            do = body.get("do")
            if do == "reset":
                session.reset()
            elif do == "step":
                session.step()
            elif do in ("next_episode", "prev_episode"):
                session.next_episode(1 if do == "next_episode" else -1)
            else:
                raise ValueError(f"control: unknown {do!r}")
        else:
            raise KeyError(path)
