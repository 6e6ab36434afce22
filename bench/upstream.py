"""The benchmark's upstream: a fast static server on loopback that plays the provider.

This module owns serving the canned answers of :mod:`bench.payloads`: nginx
when it is installed (one worker, keep-alive, access log off, the Anthropic
response headers added), else a built-in asyncio server that speaks just
enough HTTP/1.1 for curl and the load generators. Either way ``POST
/json/v1/messages`` answers the Message JSON and ``POST /sse/v1/messages`` the
50-event stream, and ``POST /chat-json/v1/chat/completions`` and
``/chat-sse/v1/chat/completions`` their OpenAI Chat twins (``bench.chat_payloads``),
whatever the body, so the measured cost is the gateway's and the load generator's,
not the upstream's.

Run the built-in server alone with ``python -m bench.upstream --port 9999 --root DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
from pathlib import Path

from bench import chat_payloads, payloads
from bench.chat_payloads import OPENAI_RESPONSE_HEADERS
from bench.payloads import ANTHROPIC_RESPONSE_HEADERS
from bench.procs import wait_port

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    # Read request bodies into memory, never into temporary files.
    client_body_buffer_size 1m;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    etag off;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        # The static module refuses POST with 405; answer the file instead.
        error_page 405 =200 $uri;
{locations}
    }}
}}
"""

_LOCATION = """        location /{prefix}/ {{
            default_type "{content_type}";
{headers}
        }}"""

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"

#: Each answer's path prefix, its content type and the provider's response headers:
#: Anthropic's answers, and the OpenAI Chat ones of the translated workloads.
ANSWERS: dict[str, tuple[str, dict[str, str]]] = {
    "json": (_JSON, ANTHROPIC_RESPONSE_HEADERS),
    "sse": (_SSE, ANTHROPIC_RESPONSE_HEADERS),
    "chat-json": (_JSON, OPENAI_RESPONSE_HEADERS),
    "chat-sse": (_SSE, OPENAI_RESPONSE_HEADERS),
}


def write_answers(root: Path) -> None:
    """The answer files under ``root``, at the path each provider's API is posted to."""
    payloads.write_upstream_files(root)
    for prefix, body in (
        ("chat-json", chat_payloads.chat_completion()),
        ("chat-sse", chat_payloads.chat_stream()),
    ):
        path = root / prefix / "v1" / "chat" / "completions"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def _answer_file(root: Path, prefix: str) -> Path:
    """The one file under ``root/prefix`` (every path of a prefix gets its answer)."""
    return next(p for p in (root / prefix).rglob("*") if p.is_file())


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


def nginx_version() -> str:
    result = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).strip().replace("nginx version: ", "")


def start_nginx(tmp: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    locations = []
    for prefix, (content_type, provider_headers) in ANSWERS.items():
        headers = {**provider_headers}
        if content_type == _SSE:
            headers["Cache-Control"] = "no-cache"
        lines = "\n".join(
            f"            add_header {name} {value!r} always;".replace("'", '"')
            for name, value in headers.items()
        )
        locations.append(_LOCATION.format(prefix=prefix, content_type=content_type, headers=lines))
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(tmp=tmp, root=root, port=port, locations="\n".join(locations))
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "nginx-stderr.log").open("wb"),
    )
    wait_port(port, proc, tmp / "nginx-stderr.log")
    return proc


# --- the built-in server ---


def _response(body: bytes, content_type: str, headers: dict[str, str]) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + content_type.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        + b"\r\n"
        + body
    )


class _StaticProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive: read a request (headers and Content-Length body), answer a file."""

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        self.answers = answers
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            path = head.split(" ", 2)[1].encode() if " " in head else b"/"
            prefix = path.split(b"/", 2)[1] if path.count(b"/") >= 2 else b""
            answer = self.answers.get(prefix)
            assert self.transport is not None
            if answer is None:
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                self.transport.write(answer)


async def _serve_builtin(root: Path, port: int) -> None:
    answers = {
        prefix.encode(): _response(
            _answer_file(root, prefix).read_bytes(), content_type, provider_headers
        )
        for prefix, (content_type, provider_headers) in ANSWERS.items()
    }
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _StaticProtocol(answers), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def start_builtin(tmp: Path, root: Path, port: int, python: str) -> subprocess.Popen[bytes]:
    log = tmp / "upstream.log"
    proc = subprocess.Popen(
        [python, "-m", "bench.upstream", "--port", str(port), "--root", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_port(port, proc, log)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(_serve_builtin(args.root, args.port))


if __name__ == "__main__":
    main()
