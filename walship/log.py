"""stderr logging, one line per event, prefixed `walship:`; PostgreSQL copies it into its log."""

from __future__ import annotations

import logging
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

logger = logging.getLogger("walship")


def setup(level: str = "info") -> None:
    """Send walship's log to stderr. Idempotent."""
    if not any(getattr(h, "_walship", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("walship: %(message)s"))
        handler._walship = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(_LEVELS.get(level, logging.INFO))


def get(name: str) -> logging.Logger:
    """A child logger of walship's, e.g. get('wal_push')."""
    return logger.getChild(name)
