"""What every HTTP request passes before a route: the API key, the body size limit, JSON bodies.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs routes in a separate task and
hides client disconnects from streaming responses).
"""
from __future__ import annotations

import json
import secrets
from typing import Optional

from kestrel.server.protocol import APIError

# answered without the API key: liveness probes and the web pages carry no secrets (the pages ask for the key and
# send it with their API calls)
OPEN_PATHS = ("/health", "/", "/arena", "/leaderboard")
OPEN_PREFIXES = ("/static/",)


class Guard:
    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.expected is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                return await _reply(send, APIError(401, "invalid or missing API key; send the header "
                                                        "'Authorization: Bearer <key>'"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await _reply(send, self._too_large())
        # Read the whole body here (routes parse it whole anyway) so a chunked upload cannot exceed the limit.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _reply(send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if b"json" not in headers.get(b"content-type", b""):
            # `curl -d '{...}'` sends form encoding; every body here is JSON, so read it as JSON
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as the route would

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.max_body} bytes", kind="invalid_request_error")


async def _reply(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
