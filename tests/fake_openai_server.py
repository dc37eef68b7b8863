"""A local OpenAI-compatible chat-completions server for tests: real HTTP, answers that depend on the images.

It names the dominant colour of the images it is shown ("a red square"), and as a judge it picks the images
whose colour the label names, so a test can tell a right label from a wrong one. Queued modes make the next
requests misbehave the ways real servers do; every request is recorded (path, headers, JSON body)::

    with FakeOpenAIServer() as server:
        server.queue("refuse", "slow")          # the next two requests; then normal answers again
        client = VLMClient(server.base_url, "fake-vlm")
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageStat

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
MODES = ("ok", "slow", "rate_limit", "refuse", "content_filter", "empty", "not_json", "no_choices", "server_error",
         "redirect")
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class SeenRequest:
    path: str
    headers: dict[str, str]  # names lowercased
    raw: bytes
    body: Any  # the parsed JSON, or None


def colour_of(image: Image.Image) -> str:
    """The named colour nearest to the image's mean colour."""
    mean = ImageStat.Stat(image.convert("RGB")).mean
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(mean, COLOURS[name])))


class FakeOpenAIServer:
    """Serves ``POST /v1/chat/completions`` on 127.0.0.1 (a free port) in a thread while the context is open."""

    def __init__(self, slow_seconds: float = 3.0, retry_after: str | None = "0"):
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after
        self.requests: list[SeenRequest] = []
        self._modes: deque[str] = deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use the server inside its `with` block"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def queue(self, *modes: str) -> None:
        """Behaviours for the next requests, one each, in order; normal answers after them."""
        unknown = set(modes) - set(MODES)
        assert not unknown, f"unknown modes {unknown}: use {MODES}"
        with self._lock:
            self._modes.extend(modes)

    def __enter__(self) -> FakeOpenAIServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-openai", daemon=True)  # shutdown waits up to one poll
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # slow replies stop waiting
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_mode(self) -> str:
        with self._lock:
            return self._modes.popleft() if self._modes else "ok"

    def _record(self, request: SeenRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _handler_for(fake: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            """Quiet: pytest shows stderr of failing tests, and the requests are recorded anyway."""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._record(b"", None)
            self._send(404, {"error": {"message": "chat completions take POST"}})

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = None
            self._record(raw, body)
            if self.path != CHAT_PATH:
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            self._answer(fake._next_mode(), body)

        def _record(self, raw: bytes, body: Any) -> None:
            fake._record(SeenRequest(self.path, {name.lower(): value for name, value in self.headers.items()}, raw, body))

        def _answer(self, mode: str, body: Any) -> None:
            if mode == "slow" and fake._closing.wait(fake.slow_seconds):
                return
            if mode == "rate_limit":
                headers = {"Retry-After": fake.retry_after} if fake.retry_after is not None else {}
                self._send(429, {"error": {"message": "rate limit reached"}}, headers)
            elif mode == "server_error":  # echoes the Authorization header, as some error pages do
                self._send(500, {"error": {"message": f"internal error for {self.headers.get('Authorization')}"}})
            elif mode == "redirect":  # a client that followed it would resend its Authorization header
                self._send(302, {"error": {"message": "moved"}}, {"Location": "/elsewhere/v1/chat/completions"})
            elif mode == "not_json":
                self._send_bytes(200, b"<html>Bad gateway</html>", "text/html")
            elif mode == "no_choices":
                self._send(200, {"id": "x", "object": "chat.completion", "choices": []})
            elif mode == "refuse":
                self._send(200, _completion("I'm sorry, but I can't help with that."))
            elif mode == "content_filter":
                self._send(200, _completion(None, finish_reason="content_filter"))
            elif mode == "empty":
                self._send(200, _completion(""))
            else:
                self._send(200, _completion(_reply_to(body)))

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

        def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

    return Handler


def _completion(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake-vlm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}]}


def _reply_to(body: Any) -> str:
    """A judge request (numbered images) gets the numbers of the images whose colour the label (the first
    quoted text) names; any other request gets the images' most common colour as a label, wrapped the way
    chatty models wrap it."""
    parts = body["messages"][-1]["content"]
    texts = [part["text"] for part in parts if part["type"] == "text"]
    colours = [colour_of(_decode(part["image_url"]["url"])) for part in parts if part["type"] == "image_url"]
    if any(text.startswith("Image ") for text in texts):
        label = re.search(r'"([^"]*)"', texts[0])
        named = set(re.findall(r"[a-z]+", label.group(1).lower())) & set(COLOURS) if label else set()
        picks = [number for number, colour in enumerate(colours, start=1) if colour in named]
        return f"The matching images are {json.dumps(picks)}."
    most_common = max(set(colours), key=colours.count)
    return f'Label: "A {most_common} square."'


def _decode(data_url: str) -> Image.Image:
    header, encoded = data_url.split(",", 1)
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(encoded)))
