"""The client of the trusted zone's HTTP API (:mod:`veil.http_api`), for ``veil streams``:
standard library only, so that the command starts without loading the edge's model code."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from veil.errors import ServiceError


def call(url: str, method: str, path: str, body: Any = None, timeout_s: float = 30.0) -> Any:
    """``method path`` on the edge at ``url``: its JSON answer; ServiceError with the edge's
    one-line error (or why it could not be reached)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        raise ServiceError(f"{method} {path}: {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceError(f"cannot reach the edge at {url}: {reason}") from exc
