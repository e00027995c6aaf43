"""Security properties, each checked against the real thing:

- no shell anywhere in walship (an AST scan of the source);
- secrets (key material, the DSN's password, AWS credentials) never in the argv of the
  processes walship starts, nor in the restore_command it writes, nor in its log or error
  text, even at debug level;
- key files are created 0600 whatever the umask;
- TLS certificates are verified by default; tls_verify = false turns it off and warns.

The restored data directory's modes and owner: tests/e2e/test_corruption.py
(test_the_intact_archives_restore) and tests/storage/test_hostile.py.
"""

from __future__ import annotations

import ast
import datetime
import http.server
import logging
import os
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import walship
from walship import cli, crypto, log
from walship.config import Config
from walship.ops import background

PACKAGE = Path(walship.__file__).resolve().parent
PYTHON = sys.executable
REPO = PACKAGE.parent
WAL = "000000010000000000000003"
# Distinctive strings: if one shows up anywhere, it leaked.
AWS_SECRET = "aws-secret-Zq8Xv1Lm9Kp2Nr7"
DSN_PASSWORD = "dsn-password-Hq4Wt6Yc3Bn8"


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for var in list(os.environ):
        if var.startswith(("WALSHIP_", "AWS_")):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    yield
    for handler in list(log.logger.handlers):
        log.logger.removeHandler(handler)
    log.logger.setLevel(logging.NOTSET)


# --- no shell --------------------------------------------------------------------------------


def _shell_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant)
                                          and kw.value.value is False):
                found.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
        func = ast.unparse(node.func)
        if func in ("os.system", "os.popen", "subprocess.getoutput",
                    "subprocess.getstatusoutput", "os.execl", "os.execlp", "os.spawnl",
                    "os.spawnlp", "pty.spawn"):
            found.append(f"line {node.lineno}: {func}")
    return found


def test_no_shell_anywhere() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    offenders = {str(p.relative_to(REPO)): uses for p in sources
                 if (uses := _shell_uses(ast.parse(p.read_text(), str(p))))}
    assert offenders == {}


def test_the_scan_finds_a_shell() -> None:
    """The scanner itself: it must see what it looks for."""
    code = ("import os, subprocess\nsubprocess.run('ls', shell=True)\n"
            "subprocess.run(['ls'], shell=flag)\nos.system('ls')\nsubprocess.run(['ls'])\n")
    assert len(_shell_uses(ast.parse(code))) == 3


# --- secrets never in argv or restore_command --------------------------------------------------


@pytest.fixture
def secrets(tmp_path: Path) -> tuple[Config, list[str]]:
    """A configuration with every kind of secret, and the strings that must never leak."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    crypto.keygen_symmetric(keys / "secret.key")
    crypto.keygen_pair(keys / "pair.key")
    config = Config(store=f"file://{tmp_path}/store", key_file=keys / "secret.key",
                    private_key_files=(keys / "pair.key",),
                    dsn=f"host=/nonexistent port=1 user=postgres password={DSN_PASSWORD}")
    material = [line.split()[1] for name in ("secret.key", "pair.key", "pair.key.pub")
                for line in (keys / name).read_text().splitlines()
                if line and not line.startswith("#")]
    return config, [DSN_PASSWORD, AWS_SECRET, *material[:2]]


def test_background_workers_get_no_secret_in_argv(
        secrets: tuple[Config, list[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The push-ahead worker and the prefetcher start through background.spawn: their argv is
    world-readable (/proc/PID/cmdline), so secrets go in files and the environment only."""
    config, never = secrets
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    seen: list[list[str]] = []
    real_spawn = os.posix_spawn

    def recording_spawn(path: str, argv: list[str], env: dict[str, str],
                        **kwargs: object) -> int:
        seen.append(list(argv))
        return real_spawn(path, argv, env, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "posix_spawn", recording_spawn)
    # A real spawn of walship's entry point, which prints its version and exits.
    logfile = tmp_path / "worker.log"
    background.spawn("walship.__main__", ["--version"], config, logfile)
    assert len(seen) == 1
    cmdline = "\0".join(seen[0])
    for secret in never:
        assert secret not in cmdline
    assert "--version" in seen[0]


def test_restore_command_carries_no_secret(secrets: tuple[Config, list[str]]) -> None:
    """backup-fetch writes restore_command into postgresql.auto.conf (readable by anyone who
    can read the data directory's configuration): key file paths yes, keys and the DSN no."""
    config, never = secrets
    command = cli._walship_command(config)
    for secret in never:
        assert secret not in command
    assert str(config.key_file) in command  # the path, so that recovery finds the key
    assert "WALSHIP_DSN" not in command


# --- secrets never in logs or error text --------------------------------------------------------


def _walship(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("WALSHIP_", "AWS_"))}
    full.update(env)
    full["PYTHONPATH"] = str(REPO)
    return subprocess.run([PYTHON, "-m", "walship", "--log-level", "debug", *args], env=full,
                          capture_output=True, text=True, timeout=120, check=False)


def _segment(directory: Path) -> Path:
    import struct

    head = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, 1, 3 << 20, 0, 7_300_000_000_000_000_001,
                       1 << 20, 8192)
    path = directory / "pg_wal" / WAL
    path.parent.mkdir(parents=True)
    path.write_bytes(head + bytes((1 << 20) - len(head)))
    return path


@pytest.mark.s3
def test_aws_secret_never_in_stderr_at_debug(tmp_path: Path, moto_server: str) -> None:
    """A successful push, a missing bucket, an unreachable endpoint and a fetch of a missing
    file, at --log-level debug with the secret key in the environment."""
    wal = _segment(tmp_path)
    env = {"AWS_ACCESS_KEY_ID": "walship-test-key", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_ENDPOINT_URL": moto_server,
           "WALSHIP_PUSH_AHEAD": "0", "WALSHIP_PREFETCH": "0", "WALSHIP_RETRY_BUDGET": "1"}
    from tests.helpers.moto_server import new_bucket

    bucket = new_bucket(moto_server)
    runs = [
        _walship("wal-push", str(wal), env={**env, "WALSHIP_STORE": f"s3://{bucket}/p"}),
        _walship("wal-fetch", "000000010000000000000004", str(tmp_path / "x"),
                 env={**env, "WALSHIP_STORE": f"s3://{bucket}/p"}),
        _walship("wal-push", str(wal), env={**env, "WALSHIP_STORE": "s3://walship-none/p"}),
        _walship("wal-push", str(wal), env={**env, "WALSHIP_STORE": f"s3://{bucket}/p",
                                            "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
    ]
    assert [r.returncode for r in runs] == [0, 1, 5, 6], [r.stderr for r in runs]
    for run in runs:
        assert AWS_SECRET not in run.stderr + run.stdout
    assert "walship:" in runs[0].stderr  # debug logging did run


def test_dsn_password_never_in_error_text(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    dsn = f"host=/nonexistent port=1 user=postgres password={DSN_PASSWORD}"
    for env in ({"WALSHIP_DSN": dsn}, {"PGPASSWORD": DSN_PASSWORD, "PGHOST": "/nonexistent"}):
        proc = _walship("backup-push", str(pgdata),
                        env={"WALSHIP_STORE": f"file://{tmp_path}/store", **env})
        assert proc.returncode == 13, proc.stderr
        assert "cannot connect to postgresql" in proc.stderr
        assert DSN_PASSWORD not in proc.stderr + proc.stdout
    proc = _walship("backup-push", "--dsn", f"host=/x password={DSN_PASSWORD}", str(pgdata),
                    env={"WALSHIP_STORE": f"file://{tmp_path}/store"})
    assert proc.returncode == 13 and DSN_PASSWORD not in proc.stderr


@pytest.mark.parametrize("content", [
    "WALSHIP-SECRET-KEY-1 {secret}x\n",  # one character too many
    "{secret}\n",  # a bare secret, no label
    "WALSHIP-SECRET-KEY-1 {secret}\nWALSHIP-SECRET-KEY-1 {secret}\n",
])
def test_key_material_never_in_error_text(tmp_path: Path, content: str) -> None:
    """A malformed key file is reported by path and reason, never by quoting it."""
    secret = "Q" * 40 + "abc"  # 43 base64url characters, like a real key
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content.format(secret=secret).encode())
    os.close(fd)
    (tmp_path / "pg_wal").mkdir()
    proc = _walship("wal-fetch", WAL, "pg_wal/RECOVERYXLOG",
                    env={"WALSHIP_STORE": f"file://{tmp_path}", "WALSHIP_KEY_FILE": str(path)})
    assert proc.returncode == 152, proc.stderr
    assert str(path) in proc.stderr
    assert secret not in proc.stderr


# --- key files 0600 ----------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_key_files_are_0600_whatever_the_umask(tmp_path: Path, symmetric: bool) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "walship.key"
        (crypto.keygen_symmetric if symmetric else crypto.keygen_pair)(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if not symmetric:
        # The public half may be read by anyone, written by nobody else.
        assert stat.S_IMODE(path.with_name("walship.key.pub").stat().st_mode) == 0o644


# --- TLS ------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


class _NotFound(http.server.BaseHTTPRequestHandler):
    """An S3 bucket (path style) that holds no keys: HEAD of the bucket 200, of a key 404;
    GET of a key 404 with S3's NoSuchKey error body."""

    def _bucket_only(self) -> bool:
        return self.path.split("?")[0].strip("/").count("/") == 0

    def do_HEAD(self) -> None:
        self.send_response(200 if self._bucket_only() else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
                b"<Message>The specified key does not exist.</Message></Error>")
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_endpoint(tmp_path: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    context = _self_signed(tmp_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tls_verified_by_default_and_off_only_with_a_warning(tmp_path: Path,
                                                              https_endpoint: str) -> None:
    """An S3 endpoint with a self-signed certificate: refused by default (a TLS error, exit
    155 in wal-fetch), accepted with tls_verify = false (the fetch then gets the server's
    "no such key", exit 1) with a warning in the log."""
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_ENDPOINT_URL": https_endpoint,
           "WALSHIP_STORE": "s3://walship-tls/p", "WALSHIP_PREFETCH": "0",
           "WALSHIP_RETRY_BUDGET": "0"}
    strict = _walship("wal-fetch", WAL, str(tmp_path / "x"), env=env)
    assert strict.returncode == 155, strict.stderr
    assert "TLS error" in strict.stderr and "certificate verify failed" in strict.stderr
    assert "verification is off" not in strict.stderr
    loose = _walship("wal-fetch", WAL, str(tmp_path / "x"),
                     env={**env, "WALSHIP_TLS_VERIFY": "false"})
    assert loose.returncode == 1, loose.stderr
    assert "TLS certificate verification is off" in loose.stderr
    # One warning from walship, not one multi-line Python warning per request.
    assert "InsecureRequestWarning" not in loose.stderr
    assert not (tmp_path / "x").exists()
    assert Config().tls_verify is True
