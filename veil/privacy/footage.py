"""The operator's own footage as privacy-report data: frames sampled and split by time.

A folder of frames (in name order) or a video file is sampled evenly; the first part of the
time line is the attacker's training material and the later part is scored, with a guard band
of dropped samples between them so that near-identical neighbouring frames do not end up on
both sides. No ground truth is needed: the clean detector's boxes stand in for it (see
:func:`veil.privacy.report.privacy_report` with ``eval_gt_boxes=None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from veil.calibrate import list_images
from veil.detectors.base import Frame
from veil.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class FootageSplit:
    train: list[Path | Frame]
    eval: list[Path | Frame]
    train_times: list[float]  # seconds for a video, frame number for a folder
    eval_times: list[float]
    source: str

    def describe(self) -> str:
        def span(times: list[float]) -> str:
            return f"{times[0]:.1f}-{times[-1]:.1f}" if times else "-"

        return (
            f"{self.source}: {len(self.train)} attacker frames ({span(self.train_times)}), "
            f"{len(self.eval)} scored frames ({span(self.eval_times)})"
        )


def _spread(count: int, total: int) -> list[int]:
    if total <= 0:
        return []
    return sorted({round(float(v)) for v in np.linspace(0, total - 1, min(count, total))})


def _video_length(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def _video_samples(path: Path, count: int, cache: Path | None) -> list[tuple[float, Path | Frame]]:
    import av

    try:
        wanted = set(_spread(count, _video_length(path)))
        samples: list[tuple[float, Path | Frame]] = []
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i not in wanted:
                    continue
                image = np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
                when = float(frame.time) if frame.time is not None else float(i)
                if cache is None:
                    samples.append((when, image))
                else:
                    file = cache / f"frame-{i:08d}.png"
                    cv2.imwrite(str(file), image)  # lossless: dlib and the head see the frame
                    samples.append((when, file))
    except (av.error.FFmpegError, OSError) as exc:
        raise DatasetError(f"footage {path}: cannot decode ({exc})") from exc
    return samples


def sample_footage(
    path: Path, count: int, cache: Path | None = None
) -> list[tuple[float, Path | Frame]]:
    """``count`` (time, frame) samples spread evenly over a video or a folder of frames.

    Video frames are kept in memory, or written as PNG into ``cache`` when given (long
    high-resolution footage); a folder's frames stay as paths.
    """
    if count < 2:
        raise ConfigError(f"footage needs at least 2 sampled frames, got {count}")
    if path.is_dir():
        frames = list_images(path)
        return [(float(i), frames[i]) for i in _spread(count, len(frames))]
    if not path.is_file():
        raise DatasetError(f"footage {path}: no such file or folder")
    samples = _video_samples(path, count, cache)
    if not samples:
        raise DatasetError(f"footage {path}: no frames decoded")
    return samples


def split_by_time(
    samples: list[tuple[float, Path | Frame]], source: str, train_share: float = 0.6, gap: int = 1
) -> FootageSplit:
    """The first ``train_share`` of the samples train the attacker, the rest are scored;
    ``gap`` samples at the boundary are dropped."""
    if not 0 < train_share < 1:
        raise ConfigError(f"train_share must lie in (0, 1), got {train_share}")
    cut = max(1, round(len(samples) * train_share))
    train = samples[:cut]
    scored = samples[cut + gap :]
    if not scored:
        raise DatasetError(
            f"footage {source}: {len(samples)} samples leave none to score after the "
            f"{len(train)} attacker frames and a gap of {gap}; sample more frames"
        )
    return FootageSplit(
        [f for _, f in train],
        [f for _, f in scored],
        [t for t, _ in train],
        [t for t, _ in scored],
        source,
    )
