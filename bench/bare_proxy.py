"""The floor: a bare Tornado + curl passthrough, the least a Python gateway can do.

It forwards ``POST /<anything>`` to the upstream with the client's headers and
body and streams the answer back chunk by chunk, with Tornado's stock
``CurlAsyncHTTPClient`` streaming path. No authentication, no routing, no
parsing, no capture, no trace. The benchmark measures it beside tvgate, in
the same run, so that "what tvgate adds" can be told apart from "what
Tornado and curl cost" on whatever machine the run is on.

``python -m bench.bare_proxy --port 8081 --upstream http://127.0.0.1:8082``
"""

from __future__ import annotations

import argparse
import asyncio

from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders
from tornado.web import Application, RequestHandler

_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade")
)


class PassthroughHandler(RequestHandler):
    def initialize(self, upstream: str, client: CurlAsyncHTTPClient) -> None:
        self.upstream = upstream
        self.client = client

    def _on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.set_status(int(line.split(" ", 2)[1]))
            return
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() not in _HOP_BY_HOP:
            self.set_header(name.strip(), value.strip())

    def _on_chunk(self, chunk: bytes) -> None:
        self.write(chunk)
        self.flush()

    async def post(self, _path: str) -> None:
        headers = HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in _HOP_BY_HOP:
                headers.add(name, value)
        request = HTTPRequest(
            self.upstream + self.request.uri,
            method="POST",
            headers=headers,
            body=self.request.body,
            header_callback=self._on_header,
            streaming_callback=self._on_chunk,
            request_timeout=0,
            follow_redirects=False,
            decompress_response=False,
        )
        await self.client.fetch(request, raise_error=False)
        self.finish()


async def serve(port: int, upstream: str) -> None:
    client = CurlAsyncHTTPClient(max_clients=1000, force_instance=True)
    app = Application(
        [(r"(/.*)", PassthroughHandler, {"upstream": upstream, "client": client})],
        log_function=lambda _handler: None,
    )
    server = HTTPServer(app, max_body_size=64 * 1024 * 1024)
    server.listen(port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream.rstrip("/")))


if __name__ == "__main__":
    main()
