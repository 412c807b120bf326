"""The trusted zone's HTTP API, beside ``/metrics`` on the same port and bind address
(``observability.http_port`` / ``http_host``, loopback by default).

``GET /v1/streams`` lists the streams with their state; ``POST /v1/streams`` adds one at
runtime; ``DELETE /v1/streams/{id}`` removes one (its source stops, what it decoded is still
published); ``PUT /v1/streams/{id}/alpha`` asks for a new alpha the way ``veil alpha set``
does (a record on the control topic, so that it outlives a restart; the zone's
:class:`AlphaControl` decides, with its floor and replay rule, and answers on the status topic)
and says applied or refused with the reason (a signed zone refuses it: there only the
operator's key changes an alpha); ``POST /v1/bank/reload`` reads the profile bank
again; ``GET /v1/streams/{id}/preview`` is the live MJPEG of the stream's annotated frames
(:mod:`workers.trusted.preview`, ``veil run --preview``). ``GET /openapi.json`` is
:data:`OPENAPI`, which a test keeps equal to what is served.
Changes are accepted from the peers ``observability.api_writes`` allows (loopback by default).
Every error is ``{"error": one line, "field": the request field at fault or null}``.

:mod:`veil.http_client` is the client ``veil streams ...`` uses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from veil.config import StreamConfig
from veil.observability import Handler, Request, Response, package_version
from workers.trusted.edge import EdgeWorker, RequestRefused
from workers.trusted.preview import CONTENT_TYPE

Params = dict[str, str]
Endpoint = Callable[[EdgeWorker, Request, Params], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # a template: /v1/streams/{id}
    endpoint: Endpoint
    writes: bool  # changes the edge (subject to observability.api_writes)

    def match(self, path: str) -> Params | None:
        want, got = self.path.strip("/").split("/"), path.strip("/").split("/")
        if len(want) != len(got):
            return None
        params: Params = {}
        for w, g in zip(want, got, strict=True):
            if w.startswith("{") and w.endswith("}"):
                if not g:
                    return None
                params[w[1:-1]] = g
            elif w != g:
                return None
        return params


def _error(status: int, message: str, field: str | None = None) -> Response:
    return Response.json(status, {"error": message.splitlines()[0], "field": field})


def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object; RequestRefused (400) when it is none."""
    try:
        document = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise RequestRefused(400, None, f"the body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise RequestRefused(400, None, "the body must be a JSON object")
    return document


# name: (accepted types, required)
_STREAM_FIELDS: Final[dict[str, tuple[tuple[type, ...], bool]]] = {
    "id": ((str,), True),
    "source": ((str,), True),
    "alpha": ((int, float), False),
    "policy": ((str,), False),
    "loop": ((bool,), False),
    "min_alpha": ((int, float, type(None)), False),
    "allow_clean": ((bool,), False),
    "pace": ((bool,), False),
}


def stream_from(document: dict[str, Any]) -> StreamConfig:
    """A :class:`StreamConfig` from a request body; RequestRefused naming the bad field."""
    for name in document:
        if name not in _STREAM_FIELDS:
            raise RequestRefused(400, name, f"unknown field {name!r}")
    for name, (types, required) in _STREAM_FIELDS.items():
        if name not in document:
            if required:
                raise RequestRefused(400, name, f"{name} is required")
            continue
        value = document[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RequestRefused(400, name, f"{name} has the wrong type ({type(value).__name__})")
    if document.get("policy", "realtime") not in ("realtime", "lossless"):
        raise RequestRefused(400, "policy", "policy must be 'realtime' or 'lossless'")
    return StreamConfig(**document)


async def _list(edge: EdgeWorker, _request: Request, _params: Params) -> Response:
    return Response.json(200, {"streams": edge.describe()})


async def _add(edge: EdgeWorker, request: Request, _params: Params) -> Response:
    return Response.json(201, await edge.add_stream(stream_from(_body(request))))


async def _remove(edge: EdgeWorker, _request: Request, params: Params) -> Response:
    done, stream = await edge.remove_stream(params["id"])
    return Response.json(200 if done else 202, {"removed": done, "stream": stream})


async def _alpha(edge: EdgeWorker, request: Request, params: Params) -> Response:
    alpha = _body(request).get("alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise RequestRefused(400, "alpha", "alpha is required, a number in [0, 1]")
    status = dataclasses.asdict(await edge.request_alpha(params["id"], float(alpha)))
    if status["outcome"] == "applied":
        return Response.json(200, status)
    reason = f"alpha {alpha} refused: {status['reason']}"
    return Response.json(409, {**status, "error": reason, "field": "alpha"})


async def _reload(edge: EdgeWorker, _request: Request, _params: Params) -> Response:
    return Response.json(200, await edge.reload_bank())


async def _preview(edge: EdgeWorker, _request: Request, params: Params) -> Response:
    if edge.preview is None:
        raise RequestRefused(
            409, None, "no preview: `veil run --preview` (outputs.preview: true) serves one"
        )
    if params["id"] not in edge.known_ids:
        raise RequestRefused(404, "id", f"no stream {params['id']!r} on this edge")
    return Response(200, b"", CONTENT_TYPE, stream=edge.preview.parts(params["id"]))


async def _openapi(_edge: EdgeWorker, _request: Request, _params: Params) -> Response:
    return Response.json(200, OPENAPI)


ROUTES: Final = (
    Route("GET", "/v1/streams", _list, writes=False),
    Route("POST", "/v1/streams", _add, writes=True),
    Route("DELETE", "/v1/streams/{id}", _remove, writes=True),
    Route("PUT", "/v1/streams/{id}/alpha", _alpha, writes=True),
    Route("POST", "/v1/bank/reload", _reload, writes=True),
    Route("GET", "/v1/streams/{id}/preview", _preview, writes=False),
    Route("GET", "/openapi.json", _openapi, writes=False),
)


def handler(edge: EdgeWorker, writes: str = "loopback") -> Handler:
    """The API of ``edge`` for :class:`~veil.observability.StatusServer` (``api=``); ``writes``
    is ``observability.api_writes``."""

    async def handle(request: Request) -> Response | None:
        matched = [(r, p) for r in ROUTES if (p := r.match(request.path)) is not None]
        if not matched:
            return None
        found = next(((r, p) for r, p in matched if r.method == request.method), None)
        if found is None:
            allowed = ", ".join(r.method for r, _ in matched)
            return _error(405, f"{request.method} is not allowed on {request.path} ({allowed})")
        route, params = found
        if route.writes and (writes == "off" or (writes == "loopback" and not request.loopback)):
            return _error(403, f"changes are not accepted from this peer (api_writes: {writes})")
        try:
            return await route.endpoint(edge, request, params)
        except RequestRefused as exc:
            return _error(exc.status, str(exc), exc.field)

    return handle


# -- the OpenAPI document --------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS: Final = {
    "400": _json(_ref("Error"), "bad input: the field named is at fault"),
    "403": _json(_ref("Error"), "changes are not accepted from this peer (api_writes)"),
    "404": _json(_ref("Error"), "no such stream"),
    "409": _json(_ref("Error"), "refused in the edge's current state"),
}
_ID: Final = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_TEXT: Final = {"content": {"text/plain": {"schema": {"type": "string"}}}}
_SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
    },
    "NewStream": {
        "type": "object",
        "required": ["id", "source"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"},
            "source": {"type": "string", "description": "file path, rtsp://, http(s)://"},
            "alpha": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.8},
            "policy": {"enum": ["realtime", "lossless"], "default": "realtime"},
            "loop": {"type": "boolean", "default": False},
            "min_alpha": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "allow_clean": {"type": "boolean", "default": False},
            "pace": {"type": "boolean", "default": True, "description": "files: own frame rate"},
        },
    },
    "Stream": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "source": {"type": "string", "description": "passwords redacted"},
            "policy": {"enum": ["realtime", "lossless"]},
            "state": {"enum": ["starting", "up", "down", "failed", "ended", "removing", "removed"]},
            "alpha": {"type": ["number", "null"]},
            "profile_id": {"type": ["string", "null"]},
            "min_alpha": {"type": ["number", "null"]},
            "frames_in": {"type": "integer"},
            "frames_dropped": {"type": "integer"},
            "frames_published": {"type": "integer"},
            "fps": {"type": "number"},
            "reconnects": {"type": "integer"},
            "error": {"type": ["string", "null"]},
        },
    },
    "AlphaStatus": {
        "type": "object",
        "description": "the zone's answer, as published on the status topic",
        "properties": {
            "stream_id": {"type": "string"},
            "alpha": {"type": "number", "description": "the alpha in force"},
            "profile_id": {"type": "string"},
            "min_alpha": {"type": "number"},
            "allow_clean": {"type": "boolean"},
            "available": {"type": "array", "items": {"type": "number"}},
            "outcome": {"enum": ["applied", "refused"]},
            "reason": {"type": "string"},
            "requested_alpha": {"type": "number"},
        },
    },
}
_ALPHA_BODY: Final = {
    "type": "object",
    "required": ["alpha"],
    "properties": {"alpha": {"type": "number", "minimum": 0, "maximum": 1}},
}
_STREAMS: Final = {
    "type": "object",
    "properties": {"streams": {"type": "array", "items": _ref("Stream")}},
}
_REMOVED: Final = {
    "type": "object",
    "properties": {"removed": {"type": "boolean"}, "stream": _ref("Stream")},
}
_BANK: Final = {
    "type": "object",
    "properties": {
        "bank": {"type": "string"},
        "alphas": {"type": "array", "items": {"type": "number"}},
        "added": {"type": "array", "items": {"type": "number"}},
    },
}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "veil trusted-zone API", "version": package_version()},
    "paths": {
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": _TEXT}}},
        "/healthz": {"get": {"summary": "the process is alive", "responses": {"200": _TEXT}}},
        "/readyz": {
            "get": {
                "summary": "ready while at least one stream is up; lists each stream's state",
                "responses": {
                    "200": _json({"type": "object"}, "ready (status ok or degraded)"),
                    "503": _json({"type": "object"}, "no stream up, or a stage failed"),
                },
            }
        },
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": _TEXT}}},
        "/v1/streams": {
            "get": {
                "summary": "the streams and their state",
                "responses": {"200": _json(_STREAMS, "ok")},
            },
            "post": {
                "summary": "add a stream while the edge runs",
                "requestBody": {"required": True, **_json(_ref("NewStream"), "the stream")},
                "responses": {"201": _json(_ref("Stream"), "added"), **_ERRORS},
            },
        },
        "/v1/streams/{id}": {
            "delete": {
                "summary": "remove a stream: its source stops, what it decoded is published",
                "parameters": _ID,
                "responses": {
                    "200": _json(_REMOVED, "removed"),
                    "202": _json(_REMOVED, "still publishing its last frames"),
                    **_ERRORS,
                },
            }
        },
        "/v1/streams/{id}/alpha": {
            "put": {
                "summary": "ask the trusted zone for a new alpha (its floor applies)",
                "parameters": _ID,
                "requestBody": {"required": True, **_json(_ALPHA_BODY, "the new alpha")},
                "responses": {
                    "200": _json(_ref("AlphaStatus"), "applied"),
                    "409": _json(_ref("AlphaStatus"), "refused: error and reason say why"),
                    **{k: v for k, v in _ERRORS.items() if k != "409"},
                    "403": _json(_ref("Error"), "not from this peer, or a signed zone"),
                    "504": _json(_ref("Error"), "the control topic did not answer in time"),
                },
            }
        },
        "/v1/streams/{id}/preview": {
            "get": {
                "summary": "live MJPEG of the stream's annotated frames (veil run --preview)",
                "parameters": _ID,
                "responses": {
                    "200": {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}},
                    "404": _json(_ref("Error"), "no such stream"),
                    "409": _json(_ref("Error"), "the preview is off"),
                },
            }
        },
        "/v1/bank/reload": {
            "post": {
                "summary": "read the profile bank again (newly calibrated profiles)",
                "responses": {"200": _json(_BANK, "reloaded"), **_ERRORS},
            }
        },
    },
    "components": {"schemas": _SCHEMAS},
}
