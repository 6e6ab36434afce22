"""A session's calls reach Visdom Trace in order when one worker's trace writer lags (issue 18).

Two worker processes, each with its trace writer process. One writer is paused
(SIGSTOP); a session's first call goes to its worker, the second to the other worker,
which writes it at once. Past the old fixed wait (5 s after a call ended), the outbox
must still not read the second call: the paused writer's watermark says the first may
not be written. Once the writer runs again (SIGCONT), the transcript is in order.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx2

from tests.fake_visdom_ingest import FakeVisdomIngest
from tests.harness import GatewayProcess, launch_gateway
from tests.test_visdom_sink import (
    PUSH,
    REPO,
    assert_claude_session,
    assert_clean,
    claude_call,
    connect,
    ended,
    ingest,  # noqa: F401 - a fixture
    status,
    wait_for,
)
from tvgate.db import open_database
from tvgate.models import Trace

#: How long the writer stays paused after the second call: past the outbox's old HOLD
#: (5 s), well within a watermark's STALE (30 s).
PAUSE = 8.0
REPO_HEADER = {"x-tracevault-repo": REPO}


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def writer_processes(gw: GatewayProcess) -> list[int]:
    """The pids of the trace writer processes under the gateway (one per worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            pid = int(entry.name)
            if b"tvgate.traces.child" not in argv:
                continue
            ancestor = _parent(pid)
            while ancestor > 1 and ancestor != gw.proc.pid:
                ancestor = _parent(ancestor)
        except OSError:
            continue
        if ancestor == gw.proc.pid:
            found.append(pid)
    return sorted(found)


def written(database_url: str, message_id: str) -> bool:
    open_database(database_url)
    return bool(Trace.select().where(Trace.message_id == message_id).exists())


def ask(prompt: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": prompt}]}


def served_by_paused(gw: GatewayProcess, database_url: str, message_id: str) -> bool:
    """Whether the call answered with ``message_id`` went to the worker whose writer is
    paused: a later call (a probe, on a connection of its own) that the running writer
    wrote finds it unwritten. A writer writes what it is sent in order, so had the call
    been that worker's, it would be written with the probe or before."""
    for _ in range(30):
        probe = claude_call(gw, f"probe-{uuid.uuid4().hex}", [ask("probe")], **REPO_HEADER)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if written(database_url, probe["id"]):
                return not written(database_url, message_id)
            time.sleep(0.1)
        # That probe went to the paused worker too: another one.
    raise AssertionError("no call reached the running writer")


def test_a_lagging_writer_holds_its_sessions_later_calls_back_until_it_writes(
    seeded: tuple[str, Path, dict[str, str]],
    ingest: FakeVisdomIngest,  # noqa: F811 - the fixture imported
) -> None:
    url, data_dir, tokens = seeded
    with launch_gateway(url, data_dir, tokens, TVGATE_WORKERS="2", **PUSH) as gw:
        connect(gw, ingest)
        wait_for(lambda: len(writer_processes(gw)) == 2, 30, lambda: str(writer_processes(gw)))
        writers = writer_processes(gw)
        for attempt in range(30):
            # Each writer in turn: the kernel may favour one worker's listener for a while.
            paused = writers[attempt % 2]
            sid = f"cc-order-{attempt}"
            prompt = f"prompt {attempt}"
            os.kill(paused, signal.SIGSTOP)
            try:
                first = claude_call(gw, sid, [ask(prompt)], **REPO_HEADER)
                if not served_by_paused(gw, url, first["id"]):
                    continue
                (use,) = [b for b in first["content"] if b["type"] == "tool_use"]
                result = {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": use["id"], "content": "tvgate-ok"}
                    ],
                }
                history = [ask(prompt), {"role": "assistant", "content": first["content"]}]
                second = claude_call(gw, sid, [*history, result], **REPO_HEADER)
                if served_by_paused(gw, url, second["id"]):
                    continue
                # Past the old fixed wait, the second call is written and the first is
                # not: it was the paused worker's (a call is recorded a little after its
                # answer, so a probe can overtake it: then it is written by now).
                time.sleep(PAUSE)
                if written(url, first["id"]) or not written(url, second["id"]):
                    continue
            finally:
                os.kill(paused, signal.SIGCONT)
            break
        else:
            raise AssertionError("the two calls never went to different workers")
        wait_for(ended(ingest, sid), 60, lambda: str(status(gw)))
        wait_for(lambda: status(gw)["pending"] == 0, 60, lambda: str(status(gw)))
        # What the outbox waits for: every live writer, by host, worker and pid for the
        # operator; by worker alone for an org admin.
        shown = status(gw)["waiting_for"]
        assert len(shown) == 2 and all(mark["upto"] > 0 for mark in shown), shown
        assert {mark["writer"].split("/")[2] for mark in shown} == {str(p) for p in writers}
        admin = {"authorization": "Bearer " + gw.tokens["admin@acme.test"]}
        seen = httpx2.get(gw.url + "/api/v1/visdom", headers=admin).json()["waiting_for"]
        assert {mark["writer"] for mark in seen} == {"worker 0", "worker 1"}, seen
    assert_clean(ingest)
    assert_claude_session(ingest.session(sid), [first, second], prompt)
