"""One error hierarchy for veil. ``retriable`` says whether trying again may succeed."""

from __future__ import annotations


class VeilError(Exception):
    retriable: bool = False


class ConfigError(VeilError, ValueError):
    """A setting, file or argument is wrong; the message names it."""


class CheckpointError(VeilError, ValueError):
    """Weights do not fit the model: wrong, truncated or for another architecture."""


class ProfileError(VeilError, ValueError):
    """A noise profile is missing, corrupt, or does not match the model or geometry."""


class DatasetError(VeilError, ValueError):
    """A benchmark data set is missing or malformed."""


class WireFormatError(VeilError, ValueError):
    """A message on the wire is malformed, foreign or of an unsupported version."""


class SourceError(VeilError):
    """A video source cannot be opened or read."""

    retriable = True


class ServiceError(VeilError):
    """An embedded or remote service (broker, Triton) failed or is unreachable."""

    retriable = True
