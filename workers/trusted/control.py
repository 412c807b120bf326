"""Live alpha, decided inside the trusted zone.

The zone, not whoever can write to the control topic, decides how weak the noise may get:
each stream has a floor (``min_alpha`` in the edge's own configuration; by default the weakest
calibrated profile) and is sent clean (alpha 0) only when its configuration says
``allow_clean: true``. :class:`AlphaControl` checks the configured alphas at start and every
control record later, and says what it did as a :class:`~stream.wire.StatusMessage`
(``started``, ``applied`` or ``refused`` with the reason and the calibrated alphas), which the
edge publishes on the status topic for ``veil alpha set`` and ``veil alpha list``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from stream.wire import ControlMessage, StatusMessage, StatusOutcome
from veil.config import StreamConfig
from veil.errors import ConfigError, ProfileError
from workers.trusted.obfuscator import ProfileTable

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Floor:
    """How weak one stream's noise may get."""

    min_alpha: float
    allow_clean: bool

    def refuses(self, alpha: float) -> str | None:
        """Why ``alpha`` is below this floor, or None when it is allowed."""
        if alpha == 0.0:
            return None if self.allow_clean else "clean (alpha 0) is not allowed for this stream"
        if alpha < self.min_alpha:
            return f"alpha {alpha} is below this stream's floor {self.min_alpha}"
        return None


class AlphaControl:
    """Per stream: the alpha in force, its floor, and the answer to every request."""

    def __init__(self, streams: Sequence[StreamConfig], table: ProfileTable) -> None:
        self.table = table
        self.floors: dict[str, Floor] = {}
        self.configured: dict[str, float] = {}
        self.alphas: dict[str, float] = {}
        self.applied_at: dict[str, float] = {}  # the newest request applied, per stream
        for s in streams:
            self.add(s)

    def add(self, s: StreamConfig) -> StatusMessage:
        """Take ``s`` under control (at start, or added at runtime); ConfigError or ProfileError
        when its alpha is below its floor or has no calibrated profile."""
        weakest = min(self.table.alphas, default=None)
        floor = s.min_alpha if s.min_alpha is not None else weakest
        if floor is None and not s.allow_clean:
            raise ProfileError(
                f"stream {s.id}: no calibrated profile and allow_clean is false: nothing "
                "may be sent (run `veil calibrate`, or set allow_clean: true to send clean "
                "activations)"
            )
        chosen = Floor(floor if floor is not None else 1.0, s.allow_clean)
        reason = chosen.refuses(s.alpha)
        if reason is not None:
            raise ConfigError(f"streams.{s.id}.alpha: {reason}")
        self.table.row(s.alpha)  # a configured alpha without a profile is refused at start
        self.floors[s.id] = chosen
        self.configured[s.id] = self.alphas[s.id] = s.alpha
        return self._status(s.id, "started", "configured alpha")

    def remove(self, sid: str) -> None:
        """``sid`` is no longer this edge's (removed at runtime)."""
        for table in (self.floors, self.configured, self.alphas, self.applied_at):
            table.pop(sid, None)

    def use_table(self, table: ProfileTable) -> None:
        """A reloaded profile bank; ProfileError naming the stream whose alpha it lacks."""
        for sid, alpha in self.alphas.items():
            try:
                table.row(alpha)
            except ProfileError as exc:
                raise ProfileError(f"stream {sid} uses alpha {alpha}: {exc}") from exc
        self.table = table

    def profile_id(self, sid: str) -> str:
        return self.table.profile_id(self.table.row(self.alphas[sid]))

    def started(self) -> list[StatusMessage]:
        return [self._status(sid, "started", "configured alpha") for sid in self.alphas]

    def request(self, msg: ControlMessage) -> StatusMessage | None:
        """Apply or refuse one control record; None when the stream is not this edge's.

        A tombstone (alpha None) returns the stream to its configured alpha. A
        request older than the last one applied is refused (a replayed record)."""
        sid = msg.stream_id
        if sid not in self.alphas:
            return None
        alpha = self.configured[sid] if msg.alpha is None else float(msg.alpha)
        stamp = msg.updated_time
        reason = self._refusal(sid, alpha, stamp)
        if reason is not None:
            log.warning("edge.alpha_refused", stream=sid, alpha=alpha, reason=reason)
            return self._status(sid, "refused", reason, stamp, alpha)
        if stamp is not None:
            self.applied_at[sid] = stamp
        if self.alphas[sid] != alpha:
            self.alphas[sid] = alpha
            log.info("edge.alpha_changed", stream=sid, alpha=alpha)
        return self._status(sid, "applied", "applied from the next batch", stamp, alpha)

    def _refusal(self, sid: str, alpha: float, stamp: float | None) -> str | None:
        last = self.applied_at.get(sid)
        if stamp is not None and last is not None and stamp < last:
            return f"older than the request applied at {last:.3f} (a replayed record)"
        floor_reason = self.floors[sid].refuses(alpha)
        if floor_reason is not None:
            return floor_reason
        try:
            self.table.row(alpha)
        except ProfileError as exc:
            return str(exc)
        return None

    def _status(
        self,
        sid: str,
        outcome: StatusOutcome,
        reason: str,
        request_time: float | None = None,
        requested: float | None = None,
    ) -> StatusMessage:
        alpha = self.alphas[sid]
        floor = self.floors[sid]
        return StatusMessage(
            stream_id=sid,
            alpha=alpha,
            profile_id=self.table.profile_id(self.table.row(alpha)),
            min_alpha=floor.min_alpha,
            allow_clean=floor.allow_clean,
            available=tuple(a for a in self.table.alphas if floor.refuses(a) is None),
            outcome=outcome,
            reason=reason,
            time=time.time(),
            request_time=request_time,
            requested_alpha=requested,
        )
