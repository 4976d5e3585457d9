"""Request bodies: bounded in size (413) and UTF-8 (400) before anything parses them.

A pure ASGI middleware: it reads the body itself, chunk by chunk, stopping as soon as the
limit is passed (a lying or missing Content-Length does not help), then replays it to the
app. Past the limit it discards up to one more limit's worth before answering 413, so a
client still sending gets to read the answer; beyond that it answers and closes. After the body the app's `receive` goes to the client again, so the app still sees
the disconnect (server.app races work against it).
"""

from __future__ import annotations

from typing import Any

from server.errors import error_response

Message = dict[str, Any]


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await error_response(400, "invalid Content-Length", None, "invalid_body")(scope, receive, send)
            return
        if declared is not None and int(declared) > 2 * self.max_bytes:
            await self._too_large(scope, receive, send, close=True)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # gone before the body arrived: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > 2 * self.max_bytes:
                await self._too_large(scope, receive, send, close=True)
                return
            if size <= self.max_bytes:
                chunks.append(chunk)
        if size > self.max_bytes:
            await self._too_large(scope, receive, send, close=False)
            return
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            response = error_response(
                400, f"request body is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding"
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Message, receive: Any, send: Any, *, close: bool) -> None:
        response = error_response(
            413, f"request body is larger than {self.max_bytes} bytes", None, "body_too_large"
        )
        if close:  # the rest of a huge body is not worth reading
            response.headers["connection"] = "close"
        await response(scope, receive, send)
