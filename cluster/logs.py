"""Where the project's log records go when it runs as a program: stderr, one line each, for the `cluster` loggers.

The command line sets it up, and so does each Ray process the serving stack starts (Serve replicas and shard
actors, whose stderr Ray forwards to the driver and to its log files). A program that embeds the package keeps its
own logging: nothing here runs on import.
"""

from __future__ import annotations

import logging
import sys

ROOT = "cluster"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a redirect, a test's capture), not to the one it was
    made with, which may be closed by then."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send the `cluster` loggers' records at `level` and above to stderr; calling it again changes only the level."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level)
