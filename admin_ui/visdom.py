"""The org admin's Visdom Trace page: connect the org (URL, project, legacy slug, the
org ingest key, which is never shown back), see what was sent and what is parked, and
disconnect. Admins of the org only (the services check again)."""

from __future__ import annotations

from tornado.web import authenticated

from admin_ui.base import UIHandler
from admin_ui.traces import when
from tvgate import services
from tvgate.api.visdom import connect
from tvgate.models import ROLE_ADMIN


class VisdomHandler(UIHandler):
    @authenticated
    async def get(self) -> None:
        self.require(ROLE_ADMIN)
        user = self.user
        status = await self.run_service(lambda: services.visdom_status(actor=user))
        self.render("visdom.html", status=status, when=when)

    @authenticated
    async def post(self) -> None:
        self.require(ROLE_ADMIN)
        user = self.user
        url = self.get_body_argument("url", "").strip()
        key = self.get_body_argument("key", "").strip()
        project = self.get_body_argument("project", "").strip()
        slug = self.get_body_argument("legacy_org_slug", "").strip()
        await self.run_service(connect(self, user, url, key, project, slug))
        self.done("/ui/visdom")


class VisdomDisconnectHandler(UIHandler):
    @authenticated
    async def post(self) -> None:
        self.require(ROLE_ADMIN)
        user = self.user
        await self.run_service(lambda: services.disconnect_visdom(actor=user))
        self.done("/ui/visdom")


default_handlers = [
    (r"/ui/visdom", VisdomHandler),
    (r"/ui/visdom/disconnect", VisdomDisconnectHandler),
]
