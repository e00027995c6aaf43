"""Key files, key ids, keyrings: permissions, refusals, one-line errors, no leaked secrets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from walship import crypto
from walship.config import Config
from walship.errors import UsageError


def one_line(exc: pytest.ExceptionInfo[UsageError]) -> str:
    message = exc.value.message
    assert "\n" not in message and message == message.strip()
    assert message[0].islower() and not message.endswith(".")
    return message


def test_keygen_symmetric_mode_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    kid = crypto.keygen_symmetric(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = crypto.load_secret_key(path)
    assert key.key_id.hex() == kid and len(kid) == 16
    with pytest.raises(UsageError) as exc:
        crypto.keygen_symmetric(path)
    assert "refusing to overwrite" in one_line(exc)
    assert crypto.load_secret_key(path) == key  # untouched


def test_keygen_pair(tmp_path: Path) -> None:
    path = tmp_path / "k"
    kid = crypto.keygen_pair(path)
    pub = tmp_path / "k.pub"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    private = crypto.load_private_key(path)
    public = crypto.load_public_key(pub)
    assert private.key_id == public.key_id and public.key_id.hex() == kid
    with pytest.raises(UsageError):
        crypto.keygen_pair(path)
    path.unlink()
    with pytest.raises(UsageError):  # the .pub is still there
        crypto.keygen_pair(path)


def test_keygen_refuses_a_symlink_in_place(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UsageError):
        crypto.keygen_symmetric(tmp_path / "link")
    assert not target.exists()


def test_loose_permissions_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    crypto.keygen_symmetric(path)
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(UsageError) as exc:
            crypto.load_secret_key(path)
        assert "group or others" in one_line(exc)
        assert exc.value.hint == f"chmod 600 {path}"
    pair = tmp_path / "pair"
    crypto.keygen_pair(pair)
    pair.chmod(0o644)
    with pytest.raises(UsageError, match="group or others"):
        crypto.load_private_key(pair)


def test_wrong_kind_of_key(tmp_path: Path) -> None:
    pair = tmp_path / "pair"
    crypto.keygen_pair(pair)
    with pytest.raises(UsageError) as exc:
        crypto.load_public_key(pair)
    assert "holds a private key, but a public key is expected" in one_line(exc)
    with pytest.raises(UsageError) as exc:
        crypto.load_private_key(tmp_path / "pair.pub")
    assert "holds a public key, but a private key is expected" in one_line(exc)
    secret = tmp_path / "secret"
    crypto.keygen_symmetric(secret)
    with pytest.raises(UsageError, match="holds a secret key"):
        crypto.load_public_key(secret)
    with pytest.raises(UsageError, match="holds a private key"):
        crypto.load_secret_key(pair)


def _write(path: Path, content: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    return path


@pytest.mark.parametrize("content", [
    b"",
    b"# only a comment\n",
    b"garbage\n",
    b"\x00\xff\xfe binary",
    b"WALSHIP-SECRET-KEY-1\n",
    b"WALSHIP-SECRET-KEY-1 tooshort\n",
    b"WALSHIP-SECRET-KEY-1 " + b"A" * 44 + b"\n",
    b"WALSHIP-SECRET-KEY-1 " + b"A" * 42 + b"+\n",
    b"WALSHIP-SECRET-KEY-1 " + b"A" * 43 + b"\nWALSHIP-SECRET-KEY-1 " + b"A" * 43 + b"\n",
    b"WALSHIP-SECRET-KEY-2 " + b"A" * 43 + b"\n",
])
def test_garbage_key_file(tmp_path: Path, content: bytes) -> None:
    path = _write(tmp_path / "bad.key", content)
    with pytest.raises(UsageError) as exc:
        crypto.load_secret_key(path)
    assert str(path) in one_line(exc)


def test_comments_and_blank_lines_allowed(tmp_path: Path) -> None:
    raw = bytes(range(32))
    text = "# a comment\n\n" + crypto.format_key_file(crypto.SECRET_LABEL, raw) + "\n# more\n"
    path = _write(tmp_path / "s.key", text.encode())
    assert crypto.load_secret_key(path).raw == raw


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        crypto.load_secret_key(tmp_path / "nope")
    assert "does not exist" in one_line(exc)
    with pytest.raises(UsageError, match="not a regular file"):
        crypto.load_public_key(tmp_path)


def test_secrets_never_in_repr(tmp_path: Path) -> None:
    raw = bytes(range(32))
    secret = crypto.SecretKey(raw)
    private = crypto.PrivateKey(bytes(range(32, 64)))
    ring = crypto.Keyring(secret, (secret, private))
    for obj in (secret, private, ring):
        for text in (repr(obj), str(obj)):
            assert raw.hex() not in text and str(raw) not in text
            assert bytes(range(32, 64)).hex() not in text and "raw" not in text
    assert secret.key_id.hex() in repr(ring)


def test_key_ids_are_stable() -> None:
    # Pinned: the key id is part of the stored format (see docs/format.md).
    assert crypto.SecretKey(bytes(range(32))).key_id.hex() == "45b93f3c026bd748"
    assert crypto.PrivateKey(bytes(range(32, 64))).key_id.hex() == "f7ac6e66c07ed22f"


def test_keyring_from_config(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    crypto.keygen_symmetric(secret)
    ring = crypto.Keyring.from_config(Config(key_file=secret))
    assert ring.encrypts and ring.encrypt_to in ring.decrypt_with
    old = tmp_path / "old"
    new = tmp_path / "new"
    crypto.keygen_pair(old)
    crypto.keygen_pair(new)
    ring = crypto.Keyring.from_config(Config(public_key_file=tmp_path / "new.pub",
                                             private_key_files=(old, new)))
    assert isinstance(ring.encrypt_to, crypto.PublicKey)
    assert [k.key_id for k in ring.decrypt_with] == [
        crypto.load_private_key(old).key_id, crypto.load_private_key(new).key_id]
    push_only = crypto.Keyring.from_config(Config(public_key_file=tmp_path / "new.pub"))
    assert push_only.encrypts and push_only.decrypt_with == ()
    assert not crypto.Keyring.from_config(Config()).encrypts
