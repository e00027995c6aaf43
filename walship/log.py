"""stderr logging, one line per event, prefixed `walship:`; PostgreSQL copies it into its log."""

from __future__ import annotations

import logging
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

logger = logging.getLogger("walship")


def setup(level: str = "info", *, timestamps: bool = False) -> None:
    """Send walship's log to stderr. Idempotent. With timestamps (the detached workers, whose
    stderr is their own log file rather than PostgreSQL's log), each line starts with the time
    and the process id."""
    if not any(getattr(h, "_walship", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s walship[%(process)d]: %(message)s" if timestamps
            else "walship: %(message)s"))
        handler._walship = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(_LEVELS.get(level, logging.INFO))


def get(name: str) -> logging.Logger:
    """A child logger of walship's, e.g. get('wal_push')."""
    return logger.getChild(name)
