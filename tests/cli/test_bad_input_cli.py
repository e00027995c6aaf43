"""The bad-input catalogue (docs/reliability.md) through the command line: each mistake an
operator can make gets one `walship: error:` line (and maybe a hint), no traceback, its own
exit code, and loses nothing: the WAL file stays where PostgreSQL keeps it, nothing appears
at %p, nothing is written to or deleted from the store, DEST is left as it was.

Runs in-process through walship.cli.run (the process's exit code and stderr;
tests/cli/test_cli_basics.py runs both ways for the basics). S3 cases use real moto servers:
the session's, and one started here with IAM enforcement on (moto's
INITIAL_NO_AUTH_ACTION_COUNT), so that "access denied" is the server's own decision against
an IAM policy, not a mock. Entries covered elsewhere are named in
/work/notes/reliability-corruption.md rather than repeated here.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.cli_isolation import isolated_cli
from tests.helpers.moto_server import REGION, free_port, new_bucket, set_aws_environment
from walship import cli, crypto, layout
from walship.config import Config
from walship.storage import open_storage

SEG_SIZE = 1 << 20  # the smallest segment size initdb allows: fast to push and fetch
WAL = "000000010000000000000003"


@dataclass(frozen=True)
class Result:
    code: int
    err: str

    def one_line(self) -> str:
        """The single error line; fails on a traceback or on any other kind of line."""
        assert "Traceback" not in self.err, self.err
        lines = [line for line in self.err.splitlines() if line]
        errors = [line for line in lines if line.startswith("walship: error: ")]
        assert len(errors) == 1, self.err
        others = [line for line in lines if not line.startswith(("walship: error: ",
                                                                  "walship: hint: "))]
        assert not others, self.err
        return errors[0]


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with isolated_cli(monkeypatch):
        monkeypatch.setenv("WALSHIP_PUSH_AHEAD", "0")
        monkeypatch.setenv("WALSHIP_PREFETCH", "0")
        monkeypatch.chdir(tmp_path)
        yield


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    def runner(*args: str) -> Result:
        code = cli.run(list(args))
        return Result(code, capsys.readouterr().err)

    yield runner


def segment(directory: Path, name: str = WAL) -> Path:
    """A WAL segment with a valid long page header (the rest zeros), as pg_wal holds it."""
    segno = int(name[8:16], 16) * (0x100000000 // SEG_SIZE) + int(name[16:], 16)
    head = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, segno * SEG_SIZE, 0,
                       7_300_000_000_000_000_001, SEG_SIZE, 8192)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + bytes(SEG_SIZE - len(head)))
    return path


def _pg_wal(directory: Path) -> list[str]:
    """What is in pg_wal, but for walship's spool (pg_wal/walship, which wal-push creates)."""
    return sorted(p.name for p in directory.iterdir() if p.name != "walship")


def objects(url: str) -> list[str]:
    """What the store holds, listed by walship itself."""
    with open_storage(url, Config(retry_budget=0)) as store:
        return [o.key for o in store.list("")]


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "store").mkdir()
    url = f"file://{tmp_path}/store"
    monkeypatch.setenv("WALSHIP_STORE", url)
    return url


# --- no store, unknown scheme ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["backup-push", "PGDATA"], ["backup-fetch", "DEST", "LATEST"],
                                  ["backup-list"], ["delete", "retain", "1", "--confirm"],
                                  ["check"]])
def test_no_store_configured(run: object, tmp_path: Path, args: list[str]) -> None:
    """wal-push and wal-fetch: tests/cli/test_cli_basics.py."""
    args = [str(tmp_path / a) if a in ("PGDATA", "DEST") else a for a in args]
    result = run(*args)  # type: ignore[operator]
    assert result.code == 2
    assert result.one_line() == "walship: error: no store configured"
    assert not (tmp_path / "DEST").exists()


@pytest.mark.parametrize("url", ["ftp://host/archive", "s4://bucket/p", "file:/relative"])
def test_unknown_scheme_or_malformed_url(run: object, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """wal-push: test_cli_basics.py. Inside wal-fetch a configuration error aborts recovery."""
    monkeypatch.setenv("WALSHIP_STORE", url)
    (tmp_path / "pg_wal").mkdir()
    fetch = run("wal-fetch", WAL, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert fetch.code == 152
    assert url in fetch.one_line() or "store URL" in fetch.one_line()
    assert list((tmp_path / "pg_wal").iterdir()) == []
    for args in (["backup-list"], ["backup-fetch", str(tmp_path / "dest"), "LATEST"],
                 ["delete", "retain", "1"]):
        result = run(*args)  # type: ignore[operator]
        assert result.code == 2, (args, result.err)
        result.one_line()
    assert not (tmp_path / "dest").exists()


# --- S3: missing bucket, no credentials ------------------------------------------------------


@pytest.mark.s3
def test_missing_bucket(run: object, tmp_path: Path, moto_server: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    set_aws_environment(monkeypatch, moto_server)
    monkeypatch.setenv("WALSHIP_STORE", "s3://walship-no-such-bucket/p")
    wal = segment(tmp_path / "pg_wal")
    push = run("wal-push", str(wal))  # type: ignore[operator]
    assert push.code == 5  # StorageError: not transient, not retried for the whole budget
    assert "bucket walship-no-such-bucket does not exist" in push.one_line()
    assert wal.stat().st_size == SEG_SIZE  # PostgreSQL still has it
    fetch = run("wal-fetch", WAL, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert fetch.code == 155
    assert "does not exist" in fetch.one_line()
    assert _pg_wal(tmp_path / "pg_wal") == [WAL]
    listing = run("backup-list")  # type: ignore[operator]
    assert listing.code == 5 and "does not exist" in listing.one_line()


@pytest.mark.s3
def test_no_credentials(run: object, tmp_path: Path, moto_server: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    set_aws_environment(monkeypatch, moto_server)
    monkeypatch.setenv("WALSHIP_STORE", f"s3://{new_bucket(moto_server)}/p")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe here
    wal = segment(tmp_path / "pg_wal")
    push = run("wal-push", str(wal))  # type: ignore[operator]
    assert push.code == 7
    assert "no usable AWS credentials" in push.one_line()
    assert "AWS_ACCESS_KEY_ID" in push.err  # the hint says what to set
    assert wal.exists()
    fetch = run("wal-fetch", WAL, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert fetch.code == 157
    fetch.one_line()
    assert _pg_wal(tmp_path / "pg_wal") == [WAL]


# --- S3: access denied, decided by a moto server enforcing IAM -------------------------------


@dataclass(frozen=True)
class IamServer:
    endpoint: str
    bucket: str
    reader: tuple[str, str]  # s3:GetObject + s3:ListBucket only
    writer: tuple[str, str]  # s3:PutObject only


# Requests the fixture makes before IAM is enforced: create the bucket, then per user
# CreateUser, PutUserPolicy, CreateAccessKey.
_SETUP_ACTIONS = 7


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):  # noqa: S310 - our own server
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def iam_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamServer]:
    """A moto server of its own that enforces IAM after the setup requests."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_ACTIONS)
    log_path = tmp_path_factory.mktemp("moto-iam") / "moto.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                    "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
    try:
        deadline = time.monotonic() + 30
        while not _answers(endpoint):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        admin = {"endpoint_url": endpoint, "region_name": REGION,
                 "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        bucket = "walship-iam-test"
        boto3.client("s3", **admin).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **admin)
        keys = []
        for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]),
                              ("writer", ["s3:PutObject"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="walship", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [
                    {"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append((key["AccessKeyId"], key["SecretAccessKey"]))
        yield IamServer(endpoint, bucket, keys[0], keys[1])
    finally:
        process.kill()
        process.wait(timeout=10)


def _as(monkeypatch: pytest.MonkeyPatch, server: IamServer, creds: tuple[str, str]) -> None:
    set_aws_environment(monkeypatch, server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds[1])
    monkeypatch.setenv("WALSHIP_STORE", f"s3://{server.bucket}/denied")


@pytest.mark.s3
def test_access_denied(run: object, tmp_path: Path, iam_server: IamServer,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    wal = segment(tmp_path / "pg_wal")
    # The reader may list and read, not write: wal-push is refused by the server's policy.
    _as(monkeypatch, iam_server, iam_server.reader)
    push = run("wal-push", str(wal))  # type: ignore[operator]
    assert push.code == 7, push.err
    assert push.one_line().startswith("walship: error: access denied: ")
    assert "bucket policy" in push.err  # the hint
    assert wal.stat().st_size == SEG_SIZE
    assert run("backup-list").code == 0  # type: ignore[operator]
    assert objects(f"s3://{iam_server.bucket}/denied") == []  # nothing was stored
    # Credentials the server does not know at all.
    _as(monkeypatch, iam_server, ("AKIAUNKNOWNUNKNOWN12", "nope"))
    unknown = run("wal-push", str(wal))  # type: ignore[operator]
    assert unknown.code == 7, unknown.err
    unknown.one_line()
    # The writer may not read: wal-fetch aborts recovery (157), it never claims "absent".
    _as(monkeypatch, iam_server, iam_server.writer)
    fetch = run("wal-fetch", WAL, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert fetch.code == 157, fetch.err
    fetch.one_line()
    assert _pg_wal(tmp_path / "pg_wal") == [WAL]


# --- key files -------------------------------------------------------------------------------


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    crypto.keygen_symmetric(path / "secret.key")
    crypto.keygen_pair(path / "pair.key")
    return path


@pytest.mark.parametrize(("variable", "key", "mode", "message"), [
    ("WALSHIP_KEY_FILE", "absent.key", None, "secret key file {path} does not exist"),
    ("WALSHIP_KEY_FILE", "secret.key", 0o644, "secret key file {path} is accessible by group"),
    ("WALSHIP_KEY_FILE", "secret.key", 0o640, "secret key file {path} is accessible by group"),
    ("WALSHIP_KEY_FILE", "pair.key", None, "key file {path} holds a private key, but a secret"),
    ("WALSHIP_PUBLIC_KEY_FILE", "pair.key", None,
     "key file {path} holds a private key, but a public key is expected"),
    ("WALSHIP_PUBLIC_KEY_FILE", "secret.key", None, "key file {path} holds a secret key"),
    ("WALSHIP_PUBLIC_KEY_FILE", "absent.key.pub", None, "public key file {path} does not exist"),
])
def test_bad_key_files_on_push(run: object, tmp_path: Path, keydir: Path, file_store: str,
                               monkeypatch: pytest.MonkeyPatch, variable: str, key: str,
                               mode: int | None, message: str) -> None:
    path = keydir / key
    if mode is not None:
        path.chmod(mode)
    monkeypatch.setenv(variable, str(path))
    wal = segment(tmp_path / "pg_wal")
    result = run("wal-push", str(wal))  # type: ignore[operator]
    assert result.code == 2, result.err
    assert result.one_line().startswith("walship: error: " + message.format(path=path))
    assert objects(file_store) == []  # refused before anything was written
    assert wal.stat().st_size == SEG_SIZE


@pytest.mark.parametrize(("variable", "key", "mode", "message"), [
    ("WALSHIP_PRIVATE_KEY_FILE", "pair.key.pub", None,
     "key file {path} holds a public key, but a private key is expected"),
    ("WALSHIP_PRIVATE_KEY_FILE", "pair.key", 0o604, "private key file {path} is accessible"),
    ("WALSHIP_PRIVATE_KEY_FILE", "gone.key", None, "private key file {path} does not exist"),
    ("WALSHIP_KEY_FILE", "keys-dir", None, "secret key file {path} is not a regular file"),
])
def test_bad_key_files_on_fetch(run: object, tmp_path: Path, keydir: Path, file_store: str,
                                monkeypatch: pytest.MonkeyPatch, variable: str, key: str,
                                mode: int | None, message: str) -> None:
    wal = segment(tmp_path / "pg_wal")
    assert run("wal-push", str(wal)).code == 0  # type: ignore[operator]
    path = keydir if key == "keys-dir" else keydir / key
    if mode is not None:
        path.chmod(mode)
    monkeypatch.setenv(variable, str(path))
    fetch = run("wal-fetch", WAL, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert fetch.code == 152, fetch.err  # configuration broken: abort, never "end of archive"
    assert fetch.one_line().startswith("walship: error: " + message.format(path=path))
    assert _pg_wal(tmp_path / "pg_wal") == [WAL]
    restore = run("backup-fetch", str(tmp_path / "dest"), "LATEST")  # type: ignore[operator]
    assert restore.code == 2
    assert not (tmp_path / "dest").exists()


# --- %p: missing, malformed names, full disk, read-only ---------------------------------------


def test_wal_push_of_a_path_that_does_not_exist(run: object, tmp_path: Path,
                                                file_store: str) -> None:
    result = run("wal-push", str(tmp_path / "pg_wal" / WAL))  # type: ignore[operator]
    assert result.code == 17
    assert "does not exist" in result.one_line()
    assert objects(file_store) == []


@pytest.mark.parametrize("name", ["foo", f"{WAL}\n", f"../{WAL}", f"pg_wal/{WAL}",
                                  "00000001000000000000000G", "00000001.history.tmp", ""])
def test_wal_fetch_of_a_malformed_name(run: object, tmp_path: Path, file_store: str,
                                       name: str) -> None:
    """wal-push of malformed names: test_cli_basics.py."""
    (tmp_path / "pg_wal").mkdir()
    result = run("wal-fetch", name, "pg_wal/RECOVERYXLOG")  # type: ignore[operator]
    assert result.code == 152
    assert "is not a WAL file name" in result.one_line()
    assert list((tmp_path / "pg_wal").iterdir()) == []


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a 1 MiB segment does not fit (ENOSPC)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_wal_fetch_to_a_full_disk_and_a_read_only_directory(
        run: object, tmp_path: Path, file_store: str, small_mount: Path) -> None:
    wal = segment(tmp_path / "pg_wal")
    assert run("wal-push", str(wal)).code == 0  # type: ignore[operator]
    (small_mount / "pg_wal").mkdir()
    full = run("wal-fetch", WAL, str(small_mount / "pg_wal" / "RECOVERYXLOG"))  # type: ignore[operator]
    assert full.code == 167, full.err  # LocalIOError: abort, fix the disk, recovery resumes
    assert "No space left on device" in full.one_line()
    assert list((small_mount / "pg_wal").iterdir()) == [], "no partial file, no temp file"
    assert os.statvfs(small_mount).f_bfree == os.statvfs(small_mount).f_blocks

    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    ro = run("wal-fetch", WAL, str(small_mount / "pg_wal" / "RECOVERYXLOG"))  # type: ignore[operator]
    assert ro.code == 167, ro.err
    assert "Read-only file system" in ro.one_line()
    assert objects(file_store) == [layout.IDENTITY_KEY, layout.wal_key(WAL)]  # nothing lost


# --- backup-fetch: DEST, names, times; delete on an empty store -------------------------------


def test_backup_fetch_into_a_non_empty_or_non_directory_dest(run: object, tmp_path: Path,
                                                              file_store: str) -> None:
    """Also end to end, against a real backup: tests/e2e/test_backup.py."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep me")
    result = run("backup-fetch", str(busy), "LATEST")  # type: ignore[operator]
    assert result.code == 2
    assert "is not empty" in result.one_line()
    assert (busy / "precious").read_text() == "keep me" and len(list(busy.iterdir())) == 1
    afile = tmp_path / "a-file"
    afile.write_text("keep me too")
    result = run("backup-fetch", str(afile), "LATEST")  # type: ignore[operator]
    assert result.code == 2
    assert "is a file" in result.one_line()  # click's own check of DEST, in one line
    assert afile.read_text() == "keep me too"


@pytest.mark.parametrize(("name", "message"), [
    ("base_000000010000000000000099_00000028", "does not exist"),
    ("yesterday", "is not a backup name"),
    ("LATEST", "there are no complete backups"),
])
def test_backup_fetch_of_an_unknown_backup(run: object, tmp_path: Path, file_store: str,
                                           name: str, message: str) -> None:
    """Exit 1, as wal-fetch for a missing file: the store confirmed there is no such backup."""
    result = run("backup-fetch", str(tmp_path / "dest"), name)  # type: ignore[operator]
    assert result.code == 1, result.err
    assert message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("args", [
    ["delete", "before", "yesterday"],
    ["delete", "before", "2026-13-01", "--confirm"],
    ["delete", "retain-window", "a week"],
    ["backup-fetch", "DEST", "LATEST", "--target-time", "not a time"],
    ["backup-fetch", "DEST", "LATEST", "--target-time", "2026-02-30 10:00"],
    ["backup-fetch", "DEST", "LATEST", "--target-lsn", "0/XYZ"],
])
def test_a_timestamp_that_is_not_a_time(run: object, tmp_path: Path, file_store: str,
                                        args: list[str]) -> None:
    store = Path(file_store.removeprefix("file://"))
    (store / "wal").mkdir()
    (store / "wal" / WAL).write_bytes(b"kept")
    args = [str(tmp_path / "dest") if a == "DEST" else a for a in args]
    result = run(*args)  # type: ignore[operator]
    assert result.code == 2, result.err
    result.one_line()
    assert (store / "wal" / WAL).read_bytes() == b"kept"
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("args", [["retain", "1"], ["before", "2026-01-01 00:00"],
                                  ["retain-window", "7d"]])
def test_confirm_on_an_empty_store(run: object, tmp_path: Path, file_store: str,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """A confirmed delete in a store with neither backups nor WAL is a wrong store URL (a
    cluster archives WAL before its first backup): exit 4 in one line, nothing written (not
    even the lock). A store that is not there at all is an outage (exit 6)."""
    code = cli.run(["delete", *args, "--confirm"])
    out, err = capsys.readouterr()
    assert code == 4, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("walship: error: ") and "holds no backups and no WAL" in lines[0]
    assert all(line.startswith("walship: ") for line in lines) and "Traceback" not in err
    assert objects(file_store) == []
    missing = Path(file_store.removeprefix("file://")).parent / "not-mounted"
    monkeypatch.setenv("WALSHIP_STORE", f"file://{missing}")
    gone = run("delete", *args, "--confirm")  # type: ignore[operator]
    assert gone.code == 6, gone.err  # StorageUnavailable: an unmounted store is an outage
    gone.one_line()
    assert not missing.exists()
