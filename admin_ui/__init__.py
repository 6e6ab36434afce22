"""Server-rendered admin and self-service pages under ``/ui/``, over tvgate's services."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = str(Path(__file__).parent / "templates")
STATIC_PATH = str(Path(__file__).parent / "static")
