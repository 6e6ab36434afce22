"""What the benchmark knows of the machine: what it is, its descriptor limit, how busy it was.

``machine`` names the CPU, memory, kernel, the versions of what tvgate runs on and the
commit, for the top of ``bench/RESULTS.md``; ``MachineLoad`` measures how busy the
whole machine and one process (with its children) were over a block of the run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

from bench.procs import cpu_split

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    """The output of a git command on this checkout."""
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False, timeout=10
    ).stdout.strip()


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    import orjson
    import peewee  # its stubs do not declare __version__
    import pycurl
    import tornado

    import tvgate

    info = {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tvgate": tvgate.__version__,
        "tornado": tornado.version,
        "pycurl": pycurl.version,
        "orjson": orjson.__version__,
        "peewee": str(getattr(peewee, "__version__", "?")),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        if commit:
            info["commit"] = commit + (" (with uncommitted changes)" if dirty else "")
    return info


def raise_fd_limit() -> None:
    """1,000 streams need ~2,000 descriptors in the gateway: lift the soft limit (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class MachineLoad:
    """How busy the machine (all cores, in % of one core) and one process were, over a block."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.busy = 0.0
        self.cpu = 0.0

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]

    def _proc(self) -> float:
        """CPU seconds of the process and its children (a worker's trace writer process is
        part of the gateway): the live ones, and those it has waited for."""
        return sum(cpu_split(self.pid)) if self.pid is not None else 0.0

    def __enter__(self) -> MachineLoad:
        self._t0 = time.monotonic()
        self._s0 = self._stat()
        self._p0 = self._proc()
        return self

    def __exit__(self, *_exc: object) -> None:
        elapsed = max(1e-6, time.monotonic() - self._t0)
        delta = [b - a for a, b in zip(self._s0, self._stat(), strict=False)]
        total = sum(delta) or 1
        idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
        self.busy = 100.0 * (os.cpu_count() or 1) * (total - idle) / total
        self.cpu = 100.0 * (self._proc() - self._p0) / elapsed
