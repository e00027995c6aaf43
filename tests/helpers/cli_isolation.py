"""Run cli.run() in the test process without leaking its process-wide state between tests."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import pytest

from walship import log


@contextlib.contextmanager
def isolated_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No WALSHIP_* variable from the caller's environment; afterwards, undo what cli.run()
    installs (a SIGTERM handler) and log.setup() adds (a stderr handler and a level)."""
    for var in list(os.environ):
        if var.startswith("WALSHIP_"):
            monkeypatch.delenv(var)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        for handler in list(log.logger.handlers):
            log.logger.removeHandler(handler)
        log.logger.setLevel(logging.NOTSET)
