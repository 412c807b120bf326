"""A small, deterministic demo video with a moving face, so ``veil run`` works with no camera.

The picture is scikit-image's public-domain astronaut photo (Eileen Collins, NASA), which ships
inside the scikit-image wheel: nothing is downloaded. A virtual camera pans and zooms over it so
the face moves through the frame and changes size, which exercises a detector more than a still.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from skimage import data as skimage_data

from veil.errors import ConfigError

# Where the face sits in the 512x512 astronaut photo (x0, y0, x1, y1), measured once with
# OpenCV's frontal-face cascade; the camera path below keeps this box inside every frame.
ASTRONAUT_FACE_BOX = (177.0, 66.0, 272.0, 161.0)
# The camera zooms from 1.3x (room to pan across the photo) to 1.9x at mid-clip and back.
_BASE_ZOOM = 1.3
_PEAK_ZOOM = 1.9


@functools.lru_cache(maxsize=1)
def astronaut_bgr() -> npt.NDArray[np.uint8]:
    """The 512x512 astronaut photo as BGR, shared and read-only (a write raises)."""
    rgb = skimage_data.astronaut()  # type: ignore[no-untyped-call]
    bgr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])
    bgr.flags.writeable = False
    return bgr


def _encoder_name() -> str:
    import av  # here, not at import: rendering frames needs no PyAV (scripts/gpu_check.py)

    # libx264 is in PyAV's wheels; builds without it still have FFmpeg's native mpeg4.
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _camera(progress: float, source_size: int, aspect: float) -> tuple[float, float, float]:
    """Crop window (centre x, centre y, width) in photo pixels at ``progress`` in [0, 1]."""
    zoom = _BASE_ZOOM + (_PEAK_ZOOM - _BASE_ZOOM) * math.sin(math.pi * progress)
    # At zoom 1 the window would be the largest of the output's aspect that fits in the photo.
    width = (source_size if aspect >= 1 else source_size * aspect) / zoom
    height = width / aspect
    face_x = (ASTRONAUT_FACE_BOX[0] + ASTRONAUT_FACE_BOX[2]) / 2
    face_y = (ASTRONAUT_FACE_BOX[1] + ASTRONAUT_FACE_BOX[3]) / 2
    # Sweep the window from right of the face to left of it, so the face travels left to right.
    centre_x = face_x + 0.3 * width * (1.0 - 2.0 * progress)
    centre_y = face_y + 0.12 * height * math.cos(2 * math.pi * progress)
    centre_x = min(max(centre_x, width / 2), source_size - width / 2)
    centre_y = min(max(centre_y, height / 2), source_size - height / 2)
    return centre_x, centre_y, width


def render_demo_frame(progress: float, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """One BGR frame of the demo (HxWx3 uint8) at ``progress`` in [0, 1]."""
    bgr = astronaut_bgr()
    out_w, out_h = size
    centre_x, centre_y, crop_w = _camera(progress, bgr.shape[1], out_w / out_h)
    scale = out_w / crop_w
    # Affine map from photo to output pixels: scale about the crop centre, then centre it.
    matrix = np.array(
        [[scale, 0.0, out_w / 2 - scale * centre_x], [0.0, scale, out_h / 2 - scale * centre_y]]
    )
    frame = cv2.warpAffine(
        bgr, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    return np.asarray(frame, dtype=np.uint8)


def make_demo_clip(
    path: str | Path, seconds: float = 4, fps: int = 10, size: tuple[int, int] = (960, 540)
) -> Path:
    """Write the demo clip to ``path`` (MP4, H.264 or mpeg4) and return the path.

    The same arguments give the same bytes with the same PyAV build: encoding is single-threaded
    and the file carries no timestamps of its own.
    """
    width, height = size
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ConfigError(f"demo clip size must be two positive even numbers, got {size}")
    if fps <= 0:
        raise ConfigError(f"demo clip fps must be positive, got {fps}")
    frame_count = round(seconds * fps)
    if frame_count < 1:
        raise ConfigError(f"demo clip of {seconds} s at {fps} fps would have no frames")

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = _encoder_name()
    options = {"preset": "veryfast", "crf": "23"} if encoder == "libx264" else {}
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps), options=options)
        assert isinstance(stream, av.VideoStream)  # narrows the type: a video encoder was named
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        # A key frame every second, so a viewer joining a served copy starts quickly.
        stream.codec_context.gop_size = fps
        for index in range(frame_count):
            progress = index / max(frame_count - 1, 1)
            pixels = render_demo_frame(progress, size)
            frame = av.VideoFrame.from_ndarray(pixels, format="bgr24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
