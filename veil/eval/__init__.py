"""Accuracy benchmarks, independent of any particular model.

A detector is any :data:`DetectFn`: a batch of BGR frames in, one :class:`Detections` per
frame out (in-process model, split model with noise, or a remote tail). The benchmarks read
images with ``cv2.imread``, batch them, call the detector and score its boxes:

* :mod:`veil.eval.metrics`: VOC AP, greedy matching, TPR at a number of false positives;
* :mod:`veil.eval.fddb`: the FDDB ten-fold benchmark the seed document reports;
* :mod:`veil.eval.widerface`: WIDER FACE easy / medium / hard, as the official tool scores it.

This package module holds only what the benchmarks share (the detector type and the image
reader); import the benchmarks from their modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from veil.detections import Detections
from veil.detectors.base import Frame
from veil.errors import ConfigError, DatasetError

DetectFn = Callable[[list[Frame]], list[Detections]]


def read_image(path: Path) -> Frame:
    """An image file as an HxWx3 uint8 BGR frame (grey images are expanded to three channels)."""
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise DatasetError(f"cannot read image {path}: missing, unreadable or not an image")
    return np.asarray(frame, dtype=np.uint8)  # already uint8; this only narrows the type


def image_batches(paths: Sequence[Path], batch_size: int) -> Iterator[list[Frame]]:
    """Frames of ``paths`` in order, ``batch_size`` at a time.

    The next batch is decoded on worker threads while the caller runs the detector on the
    current one (cv2 releases the GIL while decoding), so a fast GPU does not wait on JPEGs.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=2) as pool:

        def submit(chunk: list[Path]) -> list[Future[Frame]]:
            return [pool.submit(read_image, p) for p in chunk]

        pending = submit(chunks[0])
        for next_chunk in [*chunks[1:], None]:
            frames = [f.result() for f in pending]
            if next_chunk is not None:
                pending = submit(next_chunk)
            yield frames


def run_detector(detect_fn: DetectFn, frames: list[Frame]) -> list[Detections]:
    """Call ``detect_fn`` on one batch and check it kept its side of the contract."""
    results = detect_fn(frames)
    if len(results) != len(frames):
        raise ConfigError(
            f"detector returned {len(results)} results for a batch of {len(frames)} frames"
        )
    for i, dets in enumerate(results):
        if not isinstance(dets, Detections):
            raise ConfigError(
                f"detector result {i} is a {type(dets).__name__}, not veil.detections.Detections"
            )
    return list(results)
