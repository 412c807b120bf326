"""Run a command as the leader of its own process group, and take the whole group down with it.

``PR_SET_PDEATHSIG`` kills a child server when its parent dies, even by kill -9, but not the
server's own children: tritonserver's Python backend stubs outlived a killed server (about
270 MB each). ``python -m stream.reaper CMD ...`` sits between the two. It dies with its parent
(SIGHUP), runs CMD in a new process group, forwards SIGTERM and SIGINT to it, and kills that
whole group when CMD exits or its own parent dies. It ends as CMD did: with the same exit code,
or by the same signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType

from stream.runtime import set_parent_death_signal


def _kill_group(pgid: int | None) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(pgid, signal.SIGKILL)


def run(argv: list[str]) -> int:
    """Run ``argv`` under the reaper; returns its exit code (or re-raises its signal)."""
    child: list[subprocess.Popen[bytes]] = []

    def parent_gone(signum: int, frame: FrameType | None) -> None:
        _kill_group(child[0].pid if child else None)
        os._exit(128 + signum)

    def forward(signum: int, frame: FrameType | None) -> None:
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    signal.signal(signal.SIGHUP, parent_gone)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    set_parent_death_signal(signal.SIGHUP)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        return 128 + signal.SIGHUP
    child.append(subprocess.Popen(argv, start_new_session=True))
    code = child[0].wait()
    _kill_group(child[0].pid)  # what the command left behind (tritonserver's stubs)
    if code < 0:  # end by the same signal (SIGKILL and SIGSTOP cannot be caught or reset)
        if -code in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m stream.reaper COMMAND [ARG ...]")
    sys.exit(run(sys.argv[1:]))
