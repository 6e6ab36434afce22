"""Operations endpoints: ``/healthz`` (alive) and ``/readyz`` (can serve)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tvgate.models import Org
from tvgate.web import BaseHandler


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(b'{"status":"ok"}')


class ReadyHandler(BaseHandler):
    """Ready when the database and the keyring answer; says which does not."""

    async def get(self) -> None:
        checks: dict[str, Any] = {}
        gateway = self.gateway
        try:
            await asyncio.wait_for(
                gateway.runner.run(lambda: Org.select().limit(1).count()), timeout=5
            )
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = f"unavailable: {type(exc).__name__}"
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(
                loop.run_in_executor(gateway.runner.executor, gateway.keyring.check), timeout=5
            )
            checks["keyring"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["keyring"] = f"unavailable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        self.set_status(200 if ready else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"ready": ready, "checks": checks}))


default_handlers = [
    ("/healthz", HealthHandler),
    ("/readyz", ReadyHandler),
]
