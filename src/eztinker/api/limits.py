"""Request body size limit: a pure ASGI middleware, so an oversized body is refused before it is read.

A declared `Content-Length` over the limit is answered 413 at once; a body without one (chunked) is
counted as it streams and cut off with 413 the moment it passes the limit. Nothing of it reaches a route.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        path = scope.get("path", "")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"{int(declared)} bytes", path)
            return
        seen = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    await self._refuse(send, f"more than {self.max_bytes} bytes", path)
                    return {"type": "http.disconnect"}  # the route stops reading; its answer is dropped
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after a 413, whatever the route answers is not sent
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send: Send, size: str, path: str) -> None:
        message = (
            f"the request body is {size}; this server takes at most {self.max_bytes} bytes "
            "(split the batch, or raise EZTINKER_MAX_BODY_BYTES)"
        )
        body = json.dumps(_too_large(message, path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _too_large(message: str, path: str) -> dict[str, object]:
    """The 413's body in the shape the route's clients read: OpenAI's or Anthropic's error object on
    their routes (as those APIs answer a body too large), the native `ErrorBody` elsewhere."""
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/responses", "/v1/models", "/oai/")):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    if path.startswith(("/anthropic/", "/v1/messages")):
        return {"type": "error", "error": {"type": "request_too_large", "message": message}}
    return {"error": message, "field": "body", "category": "user"}
