from __future__ import annotations

import asyncio

from veil import observability as obs


async def _get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    return head.splitlines()[0], body


async def test_metrics_health_and_readiness_are_served() -> None:
    ready = False
    server = obs.StatusServer(0, lambda: ready)
    await server.start()
    try:
        obs.FRAMES_IN.labels("cam-test").inc(3)
        status, body = await _get(server.port, "/metrics")
        assert status.endswith("200 OK")
        assert 'veil_frames_in_total{stream="cam-test"} 3.0' in body
        assert (await _get(server.port, "/healthz"))[0].endswith("200 OK")
        assert (await _get(server.port, "/readyz"))[0].endswith("503 Service Unavailable")
        ready = True
        assert (await _get(server.port, "/readyz"))[0].endswith("200 OK")
        assert (await _get(server.port, "/nope"))[0].endswith("404 Not Found")
    finally:
        await server.stop()
