"""Instructions per call of the serving process (and its trace writer), under callgrind.

``python -m bench.instructions TREE [TREE ...]``: for each tree, ``tvgate serve`` from
that tree (one worker, SQLite, the benchmark's seed and routes) runs under valgrind's
callgrind behind nginx's static upstream; after a warm-up, instruction counting is
switched on for a fixed number of calls at concurrency 1 (small JSON, then the
50-event stream; with ``--translated``, each case of :mod:`bench.translated`, its
passthrough side and its translated side) and off again, and the instructions each
thread executed are read from callgrind's dump. On a machine shared with other work, wall-clock figures are
noise; an instruction count is the same from run to run within a fraction of a
percent.

The serving thread's count is the figure: what the IOLoop spends per call. The
gateway's other threads (the database pool's, and the trace writer's on trees where
it is a thread) and, with ``--writer``, the trace writer process are reported beside
it. Work that runs on a timer (change-count polls, the writer's counters) runs
longer under valgrind than it would at full speed; the count of an idle window as
long as the calls took is reported too, to be read against it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench import payloads
from bench.gateway import MASTER_KEY
from bench.loadgen import read_headers_file
from bench.procs import free_port, stop
from bench.translated import Side, cases
from bench.upstream import start_nginx, write_answers
from tests import harness

#: How long a gateway under valgrind gets to start (the interpreter runs ~50x slower).
START_TIMEOUT = 600.0
_PATH = "/v1/messages?beta=true"
_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)
_SEED = (
    "import sys\n"
    "from bench.gateway import seed\n"
    "print(seed(sys.argv[1], sys.argv[2], sys.argv[2]))\n"
)


@dataclass
class Count:
    """Instructions over a window: the serving thread's, the process's other threads',
    and the writer process's (0 when not traced)."""

    serving: int = 0
    threads: int = 0
    writer: int = 0
    seconds: float = 0.0


def seed_tree(tree: Path, database_url: str, upstream: str) -> str:
    """The benchmark's seed, run by ``tree``'s own code (its own schema); the token."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(
        [sys.executable, "-c", _SEED, database_url, upstream],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


class Gateway:
    """``tvgate serve`` of one tree under callgrind, counting only when told."""

    def __init__(self, tree: Path, data: Path, database_url: str, *, writer: bool) -> None:
        self.port = free_port()
        self.out = data / "callgrind"
        self.out.mkdir()
        env = harness.serve_env(database_url, data, self.port, MASTER_KEY)
        env["PYTHONPATH"] = str(tree)
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=yes",
            f"--trace-children={'yes' if writer else 'no'}",
            f"--callgrind-out-file={self.out}/cg.%p",
            sys.executable,
            "-m",
            "tvgate.cli",
            "serve",
        ]
        self.log = data / "gateway.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc)
                raise RuntimeError(f"gateway did not come up:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        self.writer_pids = [pid for pid in _children(self.proc.pid) if writer]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def _control(self, *args: str) -> None:
        for pid in [self.proc.pid, *self.writer_pids]:
            subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)

    def count(self, window: Callable[[], None], label: str) -> Count:
        """Run ``window()`` with counting on; the instructions each part executed. The
        dumps are kept in a folder named ``label`` (for ``callgrind_annotate``)."""
        self._control("--zero")
        self._control("-i", "on")
        started = time.monotonic()
        window()
        seconds = time.monotonic() - started
        self._control("-i", "off")
        self._control("--dump")
        time.sleep(1.0)  # the dump is written asynchronously, at the next scheduling point
        result = Count(seconds=seconds)
        main = f"cg.{self.proc.pid}"
        kept = self.out.parent / label
        kept.mkdir()
        for dump in self.out.iterdir():
            if "." in dump.name.removeprefix("cg."):  # a dump's part, not the exit's file
                dump.rename(kept / dump.name)
        for path in sorted(kept.iterdir()):
            found = _TOTALS.search(path.read_bytes())
            if found is None:
                continue
            instructions = int(found.group(1))
            if not path.name.startswith(main):
                result.writer += instructions
            elif path.name.endswith("-01"):
                result.serving += instructions
            else:
                result.threads += instructions
        return result

    def close(self) -> None:
        stop(self.proc, timeout=120)


def _children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


class Caller:
    """One keep-alive client connection, calls made one after another (concurrency 1)."""

    def __init__(self, url: str, token: str) -> None:
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=600)
        self.headers = {**payloads.CLAUDE_CODE_HEADERS, "Authorization": f"Bearer {token}"}
        self.seq = 0

    def calls(self, route: str, stream: bool, n: int) -> None:
        self.post(_PATH, payloads.small_request(route, stream=stream), self.headers, n)

    def post(self, path: str, template: bytes, headers: dict[str, str], n: int) -> None:
        """``n`` calls of ``template``, each with its own sequence number (as wrk's)."""
        for _ in range(n):
            self.seq += 1
            body = template.replace(payloads.SEQUENCE_MARK, b"%010d" % self.seq)
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status} {data[:300]!r}")


def _workloads(caller: Caller, data: Path, token: str, translated: bool) -> list[Workload]:
    """(name, the calls of a window) of each workload: small JSON and SSE, or with
    ``translated`` the cases of ``bench.translated``, passthrough and translated side."""
    if not translated:
        return [
            (name, partial(caller.calls, route, stream))
            for name, route, stream in (
                ("json", payloads.ROUTE_JSON, False),
                ("sse", payloads.ROUTE_SSE, True),
            )
        ]
    out: list[Workload] = []
    for case in cases(data / "bodies", token):
        for side_name in ("passthrough", "translated"):
            side: Side = getattr(case, side_name)
            headers = read_headers_file(side.headers)
            out.append(
                (
                    f"{case.name}-{side_name}",
                    partial(caller.post, side.path, side.body.read_bytes(), headers),
                )
            )
    return out


#: A workload's name, and its calls: ``calls(n)`` makes ``n`` of them.
Workload = tuple[str, Callable[[int], None]]


def measure(tree: Path, tmp: Path, upstream: str, args: argparse.Namespace) -> None:
    data = tmp / tree.name
    data.mkdir()
    database_url = f"sqlite:///{data / 'tvgate.db'}"
    token = seed_tree(tree, database_url, upstream)
    gateway = Gateway(tree, data, database_url, writer=args.writer)
    try:
        caller = Caller(gateway.url, token)
        for name, calls in _workloads(caller, data, token, args.translated):
            if args.only and not any(part in name for part in args.only):
                continue
            calls(args.warm)
            time.sleep(1.0)  # the warm-up's traces written before counting starts

            def window(calls: Callable[[int], None] = calls) -> None:
                calls(args.calls)
                time.sleep(args.settle)  # the writer's batches of these calls

            counted = gateway.count(window, name)
            idle = gateway.count(partial(time.sleep, counted.seconds), name + "-idle")
            n = args.calls
            print(
                f"{tree.name:>12} {name:>4}: serving {counted.serving / n:10,.0f} Ir/call  "
                f"other threads {counted.threads / n:9,.0f}  writer process "
                f"{counted.writer / n:9,.0f}"
                f"  | idle window {counted.seconds:5.1f} s: serving {idle.serving / n:8,.0f}, "
                f"threads {idle.threads / n:8,.0f}, writer {idle.writer / n:8,.0f} per call",
                flush=True,
            )
    finally:
        gateway.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--calls", type=int, default=200, help="calls counted per workload")
    parser.add_argument("--warm", type=int, default=100, help="calls before counting")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds counted after the last call"
    )
    parser.add_argument("--writer", action="store_true", help="count the writer process too")
    parser.add_argument(
        "--translated",
        action="store_true",
        help="the translated workloads (bench.translated's cases) instead of small JSON and SSE",
    )
    parser.add_argument(
        "--only", action="append", help="only the workloads whose name holds this (repeatable)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tvgate-instr-"))
    tmp.chmod(0o755)  # nginx's worker (another user) reads the upstream's files
    root = tmp / "upstream"
    write_answers(root)
    upstream_port = free_port()
    nginx = start_nginx(tmp, root, upstream_port)
    try:
        for tree in args.trees:
            measure(tree.resolve(), tmp, f"http://127.0.0.1:{upstream_port}", args)
    finally:
        stop(nginx)


if __name__ == "__main__":
    main()
