"""Process plumbing for the harness: free ports, waiting for listeners, stopping, memory.

Every process the harness starts is stopped by its own handle (never by name),
and every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Return once 127.0.0.1:port accepts connections; fail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{proc.args!r} did not listen on {port}:\n{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-4000:]
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc; (0, 0) when unknown."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def family(pid: int) -> list[int]:
    """``pid`` and its live descendants (a tvgate worker's trace writer process), from /proc."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as fh:
                todo.extend(int(child) for child in fh.read().split())
        except OSError:
            pass
    return found


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of ``pid`` itself, and of its descendants (a tvgate
    worker's trace writer process): the live ones and those it has waited for."""
    tick = os.sysconf("SC_CLK_TCK")
    own = descendants = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if member == pid:
            own = int(fields[11]) + int(fields[12])
            descendants += int(fields[13]) + int(fields[14])
        else:
            descendants += int(fields[11]) + int(fields[12])
    return own / tick, descendants / tick


def family_rss_kib(pid: int) -> int:
    """The RSS of ``pid`` and its live descendants together, in KiB."""
    return sum(rss_kib(member)[0] for member in family(pid))


def pss_kib(pid: int) -> int:
    """A process's proportional set size in KiB (0 when unknown): its RSS with each page it
    shares divided among the processes that map it. The serving process and its trace
    writer process map the same libraries, so their RSS figures added count those twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def family_pss_kib(pid: int) -> int:
    """The PSS of ``pid`` and its live descendants together, in KiB."""
    return sum(pss_kib(member) for member in family(pid))


class RssSampler:
    """Samples the RSS of a process and its children (the trace writer process) together, in
    a thread; ``peak_mib`` is the largest sum seen (or the process's own VmHWM, if larger),
    ``peak_pss_mib`` the largest sum of their PSS (shared pages counted once)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.peak_pss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        _rss, hwm = rss_kib(self.pid)
        self.peak_kib = max(self.peak_kib, hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, family_rss_kib(self.pid))
            self.peak_pss_kib = max(self.peak_pss_kib, family_pss_kib(self.pid))

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def peak_pss_mib(self) -> float:
        return self.peak_pss_kib / 1024
