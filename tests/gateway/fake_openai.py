"""A fast mock OpenAI-compatible model server on raw asyncio (no framework on its hot path).

It answers /v1/chat/completions and /v1/completions at once (streamed or not) with a fixed reply,
and /metrics with the model-server protocol's gauges, whose values a test sets
(``FakeBackend.waiting`` ...). It records which request bodies it served and sets
``x-served-by`` so tests can see where a request landed. The endpoint-picker tests and
``bench/router.py`` both use it, so routers are measured against the same backend they are
tested against.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

REPLY_WORDS = 8


@dataclass
class FakeBackend:
    model: str = "tiny"
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int = 16
    reply_words: int = REPLY_WORDS
    served: list[bytes] = field(default_factory=list)
    record: bool = True
    address: str = ""
    server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def metrics(self) -> bytes:
        lines = [
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}',
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{self.model}"}} {self.running}',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="{self.model}"}} {self.kv_usage}',
            "# TYPE vllm:cache_config_info gauge",
            f'vllm:cache_config_info{{block_size="{self.block_size}",num_gpu_blocks="1000"}} 1.0',
        ]
        return ("\n".join(lines) + "\n").encode()

    def answer(self, path: str, body: bytes) -> tuple[bytes, bytes]:
        """(content type, body) for a generation request."""
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return b"application/json", b'{"error":{"message":"bad json","code":"invalid_json"}}'
        chat = path.endswith("chat/completions")
        created = int(time.time())
        words = [" ok"] * self.reply_words
        if not request.get("stream"):
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(words)},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": "".join(words), "finish_reason": "length"}
            reply = {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": self.model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": 1,
                    "completion_tokens": len(words),
                    "total_tokens": 1 + len(words),
                },
            }
            return b"application/json", json.dumps(reply).encode()
        events = []
        for i, w in enumerate(words):
            last = i == len(words) - 1
            if chat:
                choice = {"index": 0, "delta": {"content": w}, "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": w, "finish_reason": "length" if last else None}
            chunk = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.model,
                "choices": [choice],
            }
            events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return b"text/event-stream", b"".join(events)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length, close = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip())
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                status = b"200 OK"
                if path == "/metrics":
                    ctype, payload = b"text/plain; version=0.0.4", self.metrics()
                elif path == "/health":
                    ctype, payload = b"application/json", b'{"status":"ok"}'
                elif path == "/v1/models":
                    ctype = b"application/json"
                    payload = json.dumps(
                        {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                    ).encode()
                elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                    if self.record:
                        self.served.append(body)
                    ctype, payload = self.answer(path, body)
                else:
                    status, ctype, payload = (
                        b"404 Not Found",
                        b"application/json",
                        b'{"error":{"code":"unknown_url"}}',
                    )
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\ncontent-type: "
                    + ctype
                    + b"\r\ncontent-length: "
                    + str(len(payload)).encode()
                    + b"\r\nx-served-by: "
                    + self.address.encode()
                    + (b"\r\nconnection: close" if close else b"")
                    + b"\r\n\r\n"
                    + payload
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.CancelledError):
            pass  # a client or the test's teardown ended the connection
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self, host: str = "127.0.0.1") -> str:
        self.server = await asyncio.start_server(self._handle, host, 0)
        port = self.server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):  # kept-alive connections too: the server is gone
                writer.close()
            await self.server.wait_closed()
            self.server = None
