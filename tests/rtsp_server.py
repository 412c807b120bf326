"""A real RTSP server for tests: GStreamer's gst-rtsp-server serving one MP4 file, unchanged.

Run it with a Python that has PyGObject and the GstRtspServer typelib (Debian:
``python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good``; see
``scripts/install-test-deps.sh``), not with the project's virtual environment:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount /clip --file clip.mp4 --codec h264

It prints ``READY rtsp://127.0.0.1:<port><mount>`` once it listens, then serves until killed.
Every client gets its own pipeline that plays the file from the start at its own pace
(real time), the way a camera would; the payload is the file's own H.264/MPEG-4 bitstream.
"""

from __future__ import annotations

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

# RTP payloaders for the codecs the demo clip can have (libx264 or FFmpeg's native mpeg4).
PAYLOADERS = {"h264": "rtph264pay config-interval=1", "mpeg4": "rtpmp4vpay config-interval=1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mount", default="/clip")
    parser.add_argument("--file", required=True)
    parser.add_argument("--codec", choices=sorted(PAYLOADERS), default="h264")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    location = args.file.replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! qtdemux ! {PAYLOADERS[args.codec]} name=pay0 pt=96 )'
    )
    server.get_mount_points().add_factory(args.mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    print(f"READY rtsp://127.0.0.1:{args.port}{args.mount}", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
