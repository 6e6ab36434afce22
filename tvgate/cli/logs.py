"""How the ``tvgate`` command logs: JSON lines for ``serve``, plain warnings for the rest."""

from __future__ import annotations

import logging
import sys

from tvgate.logformat import JsonFormatter


def setup_logging(level: str, *, serving: bool) -> None:
    """JSON lines at ``level`` for ``serve``; plain text for the other commands, whose
    output a person reads: warnings and errors only, unless debug is asked for."""
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    if serving:
        handler.setFormatter(JsonFormatter())
        root.setLevel(level.upper())
    else:
        handler.setFormatter(logging.Formatter("tvgate: %(levelname)s: %(message)s"))
        root.setLevel(
            logging.DEBUG if level.lower() == "debug" else max(logging.WARNING, _level(level))
        )
    root.handlers[:] = [handler]
    # Python warnings would otherwise be printed as plain text, breaking one-JSON-per-line.
    logging.captureWarnings(True)
    # At debug, Tornado turns on curl's verbose trace, which logs the upstream request
    # headers (the provider key) and body (the prompt). Never let it: pin that logger.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO
