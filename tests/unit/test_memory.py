"""walship.memory: the malloc arena cap really reaches glibc here."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_limit_arenas_is_accepted_by_glibc() -> None:
    # In a child: the cap is process-wide and must not leak into the other tests.
    code = ("import sys\nfrom walship.memory import limit_arenas\n"
            "sys.exit(0 if limit_arenas() else 1)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
