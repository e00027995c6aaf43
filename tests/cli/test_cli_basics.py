"""The command-line contract: exit codes and one-line errors, in-process and as a real process."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import walship
from tests.helpers.cli_isolation import isolated_cli
from walship import cli
from walship.errors import (
    IntegrityError,
    ObjectNotFound,
    StorageUnavailable,
    TransientStorageError,
)

PYTHON = "/opt/walship-venv/bin/python"
REPO = Path(__file__).resolve().parents[2]
WAL = "000000010000000000000003"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Runner = Callable[[list[str]], Result]


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with isolated_cli(monkeypatch):
        monkeypatch.chdir(tmp_path)
        yield


@pytest.fixture(params=["run", "subprocess"])
def walship_cli(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Runner:
    """Runs walship through cli.run() or as `python -m walship` (the environment as it is now)."""
    if request.param == "run":

        def run_inproc(args: list[str]) -> Result:
            code = cli.run(args)
            captured = capsys.readouterr()
            return Result(code, captured.out, captured.err)

        return run_inproc

    def run_process(args: list[str]) -> Result:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        proc = subprocess.run(
            [PYTHON, "-m", "walship", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run_process


def assert_one_line_error(result: Result, message: str) -> None:
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("walship: error:")]
    assert len(errors) == 1, result.err
    assert errors[0].startswith(f"walship: error: {message}"), result.err
    others = [
        line
        for line in result.err.splitlines()
        if line and not line.startswith(("walship: error:", "walship: hint:"))
    ]
    assert not others, result.err


def test_version(walship_cli: Runner) -> None:
    result = walship_cli(["--version"])
    assert result.code == 0
    assert result.out.strip() == f"walship, version {walship.__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(walship_cli: Runner, flag: str) -> None:
    result = walship_cli([flag])
    assert result.code == 0
    for command in ("wal-push", "wal-fetch", "keygen", "backup-push", "backup-fetch"):
        assert command in result.out
    assert result.err == ""


def test_command_help(walship_cli: Runner) -> None:
    result = walship_cli(["wal-fetch", "--help"])
    assert result.code == 0
    assert "restore_command" in result.out


def test_unknown_command(walship_cli: Runner) -> None:
    result = walship_cli(["frobnicate"])
    assert result.code == 2
    assert_one_line_error(result, "No such command")
    assert "frobnicate" in result.err


def test_unknown_option(walship_cli: Runner) -> None:
    result = walship_cli(["--frobnicate", "wal-push", WAL])
    assert result.code == 2
    assert_one_line_error(result, "No such option")


def test_no_command(walship_cli: Runner) -> None:
    result = walship_cli([])
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("walship: error:")]
    assert all("Usage:" not in line for line in errors), result.err


def test_wal_push_without_store(walship_cli: Runner, tmp_path: Path) -> None:
    wal = tmp_path / "pg_wal" / WAL
    result = walship_cli(["wal-push", str(wal)])
    assert result.code == 2
    assert_one_line_error(result, "no store configured")
    assert result.err.splitlines()[0] == "walship: error: no store configured"
    assert "WALSHIP_STORE" in result.err  # the hint says how to set one


@pytest.mark.parametrize(
    "name", ["not-a-wal-file", "000000010000000000000003.ready", "00000000.history", "0000000100"]
)
def test_wal_push_malformed_name(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("WALSHIP_STORE", (tmp_path / "store").as_uri())
    path = tmp_path / name
    path.write_bytes(b"x")
    result = walship_cli(["wal-push", str(path)])
    assert result.code == 2
    assert_one_line_error(result, f"{name!r} is not a WAL file name")
    assert not (tmp_path / "store" / "wal").exists()


def test_wal_push_missing_argument(walship_cli: Runner) -> None:
    result = walship_cli(["wal-push"])
    assert result.code == 2
    assert_one_line_error(result, "Missing argument")


def test_wal_fetch_without_store_aborts_recovery(walship_cli: Runner, tmp_path: Path) -> None:
    result = walship_cli(["wal-fetch", WAL, str(tmp_path / "pg_wal" / "RECOVERYXLOG")])
    # Configuration found broken while fetching: above 125, so the server aborts, not promotes.
    assert result.code == 152
    assert_one_line_error(result, "no store configured")


@pytest.mark.parametrize("name", [WAL, "00000001.history", "00000002.history"])
def test_wal_fetch_absent_file_exits_1(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # PostgreSQL asks for files that do not exist (the next timeline's history, the segment
    # after the end of the archive): exit 1, and nothing appears at %p.
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("WALSHIP_STORE", (tmp_path / "store").as_uri())
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    dest.parent.mkdir()
    result = walship_cli(["wal-fetch", name, str(dest)])
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    assert list(dest.parent.iterdir()) == []


def test_wal_fetch_from_missing_store_root_aborts(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WALSHIP_STORE", (tmp_path / "not-mounted").as_uri())
    dest = tmp_path / "RECOVERYXLOG"
    result = walship_cli(["wal-fetch", WAL, str(dest)])
    assert result.code > 125, result.err


@pytest.mark.parametrize("args", [["wal-fetch"], ["wal-fetch", WAL]])
def test_wal_fetch_missing_arguments(walship_cli: Runner, args: list[str]) -> None:
    result = walship_cli(args)
    assert result.code == 2
    assert_one_line_error(result, "Missing argument")


@pytest.mark.parametrize("url", ["ftp://host/archive", "nope", "s4://bucket/prefix"])
def test_unknown_url_scheme(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    wal = tmp_path / WAL
    wal.write_bytes(b"\0" * 64)
    result = walship_cli(["--store", url, "wal-push", str(wal)])
    assert result.code == 2
    assert_one_line_error(result, "")
    assert url in result.err
    monkeypatch.setenv("WALSHIP_STORE", url)
    assert walship_cli(["wal-push", str(wal)]).code == 2


@pytest.mark.parametrize("symmetric", [False, True], ids=["pair", "symmetric"])
def test_keygen(walship_cli: Runner, tmp_path: Path, symmetric: bool) -> None:
    path = tmp_path / "keys" / "walship.key"
    path.parent.mkdir()
    args = ["keygen", *(["--symmetric"] if symmetric else []), str(path)]
    result = walship_cli(args)
    assert result.code == 0, result.err
    assert str(path) in result.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    if symmetric:
        assert set(written) == {"walship.key"}
    else:
        assert set(written) == {"walship.key", "walship.key.pub"}
        assert written["walship.key"] != written["walship.key.pub"]
        # The public half is what the database host gets; it must never hold the secret.
        assert stat.S_IMODE(path.with_name("walship.key.pub").stat().st_mode) & 0o022 == 0

    again = walship_cli(args)
    assert again.code == 2
    assert_one_line_error(again, "")
    assert "exists" in again.err
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == written


def test_keygen_pair_refuses_existing_public_key(walship_cli: Runner, tmp_path: Path) -> None:
    path = tmp_path / "walship.key"
    path.with_name("walship.key.pub").write_text("precious\n")
    result = walship_cli(["keygen", str(path)])
    assert result.code == 2
    assert path.with_name("walship.key.pub").read_text() == "precious\n"


def test_config_with_unknown_key(walship_cli: Runner, tmp_path: Path) -> None:
    toml = tmp_path / "walship.toml"
    toml.write_text(f'store = "{(tmp_path / "store").as_uri()}"\nprefech = 4\n')
    result = walship_cli(["--config", str(toml), "wal-push", str(tmp_path / WAL)])
    assert result.code == 2
    assert_one_line_error(result, "unknown setting 'prefech'")


def test_walship_config_variable_with_unknown_key(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "walship.toml"
    toml.write_text("bogus_setting = true\n")
    monkeypatch.setenv("WALSHIP_CONFIG", str(toml))
    result = walship_cli(["wal-push", str(tmp_path / WAL)])
    assert result.code == 2
    assert_one_line_error(result, "unknown setting 'bogus_setting'")


def test_bad_environment_value(
    walship_cli: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WALSHIP_STORE", (tmp_path / "store").as_uri())
    monkeypatch.setenv("WALSHIP_PARTITION_SIZE", "12XB")
    result = walship_cli(["wal-push", str(tmp_path / WAL)])
    assert result.code == 2
    assert_one_line_error(result, "bad value for partition_size")


# --- how failures inside a command become exit codes (in-process: a fault per class) ------


@pytest.fixture
def failing_fetch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[[BaseException], int]:
    """Make wal-fetch raise `exc` inside the service and return walship's exit code."""
    from walship.ops import wal_fetch as wal_fetch_mod

    monkeypatch.setenv("WALSHIP_STORE", (tmp_path / "store").as_uri())

    def fail(exc: BaseException) -> int:
        def raiser(*args: object, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr(wal_fetch_mod, "wal_fetch", raiser)
        return cli.run(["wal-fetch", WAL, str(tmp_path / "RECOVERYXLOG")])

    return fail


def test_wal_fetch_not_found_exits_1(failing_fetch: Callable[[BaseException], int]) -> None:
    assert failing_fetch(ObjectNotFound("wal/x does not exist")) == 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (StorageUnavailable("store unreachable"), 156),
        (TransientStorageError("503"), 156),
        (IntegrityError("corrupt"), 159),
        (RuntimeError("boom"), 153),
        (KeyboardInterrupt(), 130),
        (cli.Terminated(), 143),
    ],
)
def test_wal_fetch_failures_abort(
    failing_fetch: Callable[[BaseException], int], exc: BaseException, code: int
) -> None:
    assert failing_fetch(exc) == code


def test_wal_fetch_on_standby(
    failing_fetch: Callable[[BaseException], int], tmp_path: Path
) -> None:
    (tmp_path / "standby.signal").touch()  # the working directory is the data directory
    assert failing_fetch(StorageUnavailable("store unreachable")) == 1
    assert failing_fetch(IntegrityError("corrupt")) == 159
    assert failing_fetch(ObjectNotFound("absent")) == 1


def test_internal_error_outside_wal_fetch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from walship.ops import wal_push as wal_push_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(wal_push_mod, "wal_push", boom)
    assert cli.run(["wal-push", str(tmp_path / WAL)]) == 3
    err = capsys.readouterr().err
    assert "walship: error: internal error: RuntimeError: boom" in err
    assert "Traceback" not in err
