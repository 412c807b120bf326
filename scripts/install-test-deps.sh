#!/usr/bin/env bash
# System packages the test suite needs beyond the Python environment (Debian/Ubuntu, as root).
#
# The RTSP reconnection test (tests/test_rtsp.py) runs a real RTSP server: GStreamer's
# gst-rtsp-server, driven from the system Python through PyGObject (tests/rtsp_server.py).
#   python3-gi                  PyGObject for the system python3
#   gir1.2-gst-rtsp-server-1.0  the GstRtspServer bindings (pulls libgstrtspserver and GStreamer)
#   gstreamer1.0-plugins-base   core elements
#   gstreamer1.0-plugins-good   qtdemux (reads MP4) and rtph264pay / rtpmp4vpay (RTP payloaders)
# Without them that test skips, saying so; everything else needs only the Python environment.
set -euo pipefail

packages=(
    python3-gi
    gir1.2-gst-rtsp-server-1.0
    gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

"${sudo_cmd[@]}" apt-get update
"${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${packages[@]}"
