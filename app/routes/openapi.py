"""OpenAPI descriptions of the stream routes, which read their JSON bodies themselves (deps.read_json).

FastAPI documents a request body only for a parameter it parses; the stream routes take the raw
`Request` (their admission must come before the body is read), so their bodies and their event-stream
answers are declared here, from the same pydantic models that validate them. The schemas are inlined
(no `$ref`), so the route's `openapi_extra` is self-contained.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

MAX_INLINE_DEPTH = 16  # the wire models nest a few levels; a cycle would be a bug
EVENT_STREAM = "text/event-stream"


def _inline(node: Any, defs: dict[str, Any], depth: int = 0) -> Any:
    if depth > MAX_INLINE_DEPTH:
        raise ValueError("schema nests too deep to inline (a recursive model?)")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs, depth + 1)
        return {key: _inline(value, defs, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs, depth + 1) for item in node]
    return node


def answers(*media_types: str, links: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route whose 200 answer is one of `media_types` (an event stream, JSON)."""
    ok: dict[str, Any] = {
        "description": "The stream (or the answer)",
        "content": {media_type: {} for media_type in media_types},
    }
    if links:
        ok["links"] = links
    return {"responses": {"200": ok}}


def json_body(model: type[BaseModel], *media_types: str, links: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model` and whose 200 answer is one of `media_types`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    body = {"required": True, "content": {"application/json": {"schema": _inline(schema, defs)}}}
    return {"requestBody": body, **answers(*media_types, links=links)}


def resume_link(operation_id: str) -> dict[str, Any]:
    """An OpenAPI link: a stream's `X-Stream-ID` is the id `operation_id` resumes."""
    return {
        "Resume": {
            "operationId": operation_id,
            "parameters": {"stream_id": "$response.header.X-Stream-ID"},
            "description": "Resume this stream after a lost connection (Last-Event-ID).",
        }
    }
