"""A small OpenAI-compatible server on loopback, for tests and benchmarks: real HTTP, real sockets.

    server = OcrServer(latency_s=0.1, capacity=8).start()   # http://127.0.0.1:PORT/v1
    server.script("429", "ok")        # the next answers, in order; then `default`
    server.stop()

Every `POST /v1/chat/completions` is checked (model, a user message with a text part and an image
data URL) and answered after `latency_s`, at most `capacity` at once (others wait their turn, as
on a server whose batch is full). Behaviours, scripted per request or as the default:
  ok        200, a chat completion whose content is `text` (default "echo <width>x<height>" of the
            page sent, like tests.engines:Echo, so tests can check which answer went to which page)
  500 / 503 a server error with an OpenAI-style error body
  429       rate limited (with Retry-After: 1)
  400       a client error with a message
  malformed 200 with a body that is not a chat completion
  hang      never answers (until the server stops)
  reset     closes the connection without answering (TCP RST)
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


class OcrServer:
    def __init__(self, *, port: int = 0, latency_s: float = 0.0, capacity: int = 64, text: str | None = None):
        self.port = port
        self.latency_s = latency_s
        self.capacity = threading.BoundedSemaphore(capacity)
        self.text = text
        self.default = "ok"
        self.scripted: deque[str] = deque()
        self.requests: list[dict[str, Any]] = []  # what each request carried: headers, body
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: str) -> OcrServer:
        with self.lock:
            self.scripted.extend(behaviours)
        return self

    def start(self) -> OcrServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server._serve(self)

        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- one request ---------------------------------------------------------------------------

    def _next(self) -> str:
        with self.lock:
            return self.scripted.popleft() if self.scripted else self.default

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        with self.lock:
            self.requests.append({"headers": dict(handler.headers), "body": raw, "path": handler.path})
        behaviour = self._next()
        if handler.path != "/v1/chat/completions":
            return _reply(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        problem, size = _check_request(raw)
        if problem:
            return _reply(handler, 400, {"error": {"message": problem, "type": "invalid_request_error"}})
        if behaviour == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            handler.connection.close()
            return None
        with self.capacity:
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if behaviour == "hang":
                    self._stopping.wait()
                    return None
                if self.latency_s:
                    time.sleep(self.latency_s)
            finally:
                with self.lock:
                    self.in_flight -= 1
        if behaviour in ("500", "503"):
            return _reply(handler, int(behaviour), {"error": {"message": "the model is loading", "type": "server"}})
        if behaviour == "429":
            return _reply(handler, 429, {"error": {"message": "too many requests"}}, {"Retry-After": "1"})
        if behaviour == "400":
            message = "image too large: 9000 tokens > max_model_len 8192\x1b[2J"
            return _reply(handler, 400, {"error": {"message": message, "type": "invalid_request_error"}})
        if behaviour == "malformed":
            return _reply(handler, 200, {"id": "x", "object": "chat.completion", "choices": []})
        text = self.text if self.text is not None else f"echo {size[0]}x{size[1]}"
        return _reply(handler, 200, completion(text))


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "test-ocr",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _check_request(raw: bytes) -> tuple[str | None, tuple[int, int]]:
    """What a real server would refuse (a body that is not a chat request with an image), and the
    image's size."""
    try:
        body = json.loads(raw)
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        assert any(p["type"] == "text" and p["text"] for p in content)
        assert isinstance(body["model"], str) and body["model"]
        head, _, data = url.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    except (ValueError, KeyError, IndexError, TypeError, StopIteration, AssertionError, OSError):
        return "expected a chat completion request with a text part and an image data URL", (0, 0)
    return None, image.size


def _reply(
    handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:
        pass  # the client gave up (a timeout): nothing to answer


def free_port() -> int:
    """A loopback port nothing listens on (yet): a server that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    """`python -m tests.openai_server --latency-s 0.1 --capacity 8`: serve until killed, in a
    process of its own (benchmarks: the server's threads do not share a GIL with the client)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=64)
    args = parser.parse_args()
    server = OcrServer(port=args.port, latency_s=args.latency_s, capacity=args.capacity).start()
    print(server.base_url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
