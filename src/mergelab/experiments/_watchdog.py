"""Watchdog for a driver's Ray processes: ``python _watchdog.py DRIVER_PID [PID:START ...]``.

Run as a plain script (standard library only, so it starts at once). It starts with the processes the driver
listed, and while the driver lives (is still its parent) it notes the driver's Ray descendants once a second
(servers, agents, workers). When its stdin (a pipe from the driver) closes — the driver called ``close`` or died, even by SIGKILL — it
terminates every noted process still alive (same pid *and* start time, so a reused pid is left alone). Ray's
own fate sharing kills its servers with the driver, but their helper agents are reparented and would linger.
Linux only (/proc); elsewhere it just waits for the pipe to close.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]


def _is_ray(pid: int) -> bool:
    try:
        return b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def ray_descendants(root: int) -> dict[int, str]:
    """{pid: start time} of the Ray processes descended from ``root`` (empty where there is no /proc)."""
    return {p: s for p, s in _descendants(root).items() if _is_ray(p)}


def _descendants(root: int) -> dict[int, str]:
    if not Path("/proc").is_dir():
        return {}
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))):
            table[int(d.name)] = st
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {p for p, (pp, _) in table.items() if pp in frontier and p not in found}
        found.update({p: table[p][1] for p in frontier})
    return found


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    if driver <= 1 or os.getppid() != driver:
        return 0  # the driver is already gone (or was never our parent): nothing is known to be its
    noted: dict[int, str] = dict((int(p), s) for p, s in (a.split(":", 1) for a in argv[1:]))
    fd = sys.stdin.fileno()
    while True:
        if os.getppid() == driver:
            noted.update(ray_descendants(driver))
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready and not os.read(fd, 4096):
            break  # EOF: the driver is done or dead
    noted.pop(os.getpid(), None)
    alive = [p for p, start in noted.items() if (st := _stat(p)) and st[1] == start]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_stat(p) for p in alive):
            time.sleep(0.1)
        alive = [p for p in alive if _stat(p)]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
