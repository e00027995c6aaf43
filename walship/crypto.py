"""Key files, key ids, and chunked authenticated encryption (age's STREAM design).

docs/format.md ("## Object format") specifies everything here byte by byte. In short:

- the payload is cut into 64 KiB plaintext chunks, each sealed with ChaCha20-Poly1305 under
  a fresh per-object payload key, nonce = 11-byte big-endian chunk counter + 1-byte
  last-chunk flag, associated data = the object header. A missing, extra, reordered or
  damaged chunk or header byte fails authentication; the flag makes truncation at a chunk
  boundary detectable;
- symmetric mode: payload key = HKDF-SHA256(ikm=secret, salt=header nonce, info=PAYLOAD_INFO);
- x25519 mode: a random 32-byte file key is sealed to the recipient (ephemeral X25519 ECDH,
  HKDF, ChaCha20-Poly1305) and payload key = HKDF-SHA256(ikm=file key, salt=nonce, ...).

Key material lives in objects whose repr never shows it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from walship import format as fmt
from walship.errors import IntegrityError, KeyMismatch, UsageError

if TYPE_CHECKING:
    from walship.config import Config

SECRET_LABEL = "WALSHIP-SECRET-KEY-1"  # noqa: S105 - a file label, not a secret
PRIVATE_LABEL = "WALSHIP-PRIVATE-KEY-1"
PUBLIC_LABEL = "WALSHIP-PUBLIC-KEY-1"
_LABELS = {SECRET_LABEL: "secret", PRIVATE_LABEL: "private", PUBLIC_LABEL: "public"}

KEY_ID_INFO_SECRET = b"walship/v1 key id secret"
KEY_ID_INFO_X25519 = b"walship/v1 key id x25519"
WRAP_INFO = b"walship/v1 x25519 wrap"
PAYLOAD_INFO = b"walship/v1 payload"

KEY_SIZE = 32
# A sealed file key is the only message under its wrap key, which is itself unique per
# object (fresh ephemeral key), so a constant nonce is safe there.
WRAP_NONCE = bytes(12)

# 43 base64url characters, no padding: exactly 32 bytes.
_B64_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")

Random = Callable[[int], bytes]


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def secret_key_id(secret: bytes) -> bytes:
    """8-byte id of a symmetric secret: HKDF-SHA256(secret, salt="", info), first 8 bytes."""
    return _hkdf(secret, b"", KEY_ID_INFO_SECRET, fmt.KEY_ID_SIZE)


def public_key_id(public: bytes) -> bytes:
    """8-byte id of an X25519 public key: HKDF-SHA256(public, salt="", info), first 8 bytes."""
    return _hkdf(public, b"", KEY_ID_INFO_X25519, fmt.KEY_ID_SIZE)


@dataclass(frozen=True)
class SecretKey:
    """A 32-byte symmetric secret. Encrypts and decrypts."""

    raw: bytes = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_SIZE:
            raise ValueError("a secret key is 32 bytes")
        object.__setattr__(self, "key_id", secret_key_id(self.raw))

    def __repr__(self) -> str:
        return f"SecretKey(key_id={self.key_id.hex()})"

    __str__ = __repr__


@dataclass(frozen=True)
class PublicKey:
    """An X25519 public key: encrypts only."""

    raw: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_SIZE:
            raise ValueError("a public key is 32 bytes")
        object.__setattr__(self, "key_id", public_key_id(self.raw))

    def __repr__(self) -> str:
        return f"PublicKey(key_id={self.key_id.hex()})"

    __str__ = __repr__


@dataclass(frozen=True)
class PrivateKey:
    """An X25519 private key: decrypts objects sealed to its public key."""

    raw: bytes = field(repr=False)
    public: PublicKey = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_SIZE:
            raise ValueError("a private key is 32 bytes")
        pub = X25519PrivateKey.from_private_bytes(self.raw).public_key().public_bytes_raw()
        object.__setattr__(self, "public", PublicKey(pub))

    @property
    def key_id(self) -> bytes:
        """The id of the matching public key."""
        return self.public.key_id

    def __repr__(self) -> str:
        return f"PrivateKey(key_id={self.key_id.hex()})"

    __str__ = __repr__


EncryptKey = Union[SecretKey, PublicKey]  # noqa: UP007 - a runtime alias on 3.10
DecryptKey = Union[SecretKey, PrivateKey]  # noqa: UP007


@dataclass(frozen=True)
class Keyring:
    """The keys one command uses: one to encrypt to, any number to decrypt with (rotation).

    allow_plaintext: accept unencrypted objects even though decrypt keys are configured (for
    reading an archive written before encryption was turned on). Off by default: otherwise
    anyone who can write to the store could substitute plaintext objects.
    """

    encrypt_to: EncryptKey | None = None
    decrypt_with: tuple[DecryptKey, ...] = ()
    allow_plaintext: bool = False

    @property
    def encrypts(self) -> bool:
        """Whether encode() encrypts under this keyring."""
        return self.encrypt_to is not None

    @classmethod
    def from_config(cls, config: Config) -> Keyring:
        """Load the key files a Config names: key_file both ways, the others one way each."""
        encrypt_to: EncryptKey | None = None
        decrypt: list[DecryptKey] = []
        if config.key_file is not None:
            secret = load_secret_key(config.key_file)
            encrypt_to = secret
            decrypt.append(secret)
        if config.public_key_file is not None:
            encrypt_to = load_public_key(config.public_key_file)
        for path in config.private_key_files:
            decrypt.append(load_private_key(path))
        return cls(encrypt_to=encrypt_to, decrypt_with=tuple(decrypt))

    def find(self, key_id: bytes, mode: int) -> DecryptKey:
        """The decrypt key for an object header's key id and mode, or KeyMismatch."""
        if not self.decrypt_with:
            raise KeyMismatch(
                "object is encrypted but no decryption key is configured",
                hint="set WALSHIP_KEY_FILE (symmetric) or WALSHIP_PRIVATE_KEY_FILE",
            )
        want = SecretKey if mode == fmt.MODE_SYMMETRIC else PrivateKey
        for key in self.decrypt_with:
            if isinstance(key, want) and key.key_id == key_id:
                return key
        have = ", ".join(k.key_id.hex() for k in self.decrypt_with)
        raise KeyMismatch(
            f"object is encrypted ({fmt.MODE_NAMES.get(mode, '?')}) with key id {key_id.hex()}"
            f" but the configured keys are {have}",
            hint="configure the key it was written with (keep old keys after a rotation),"
            " or the object header is damaged",
        )


# ---------------------------------------------------------------------------------------
# Key files


def format_key_file(label: str, raw: bytes, comment: str = "") -> str:
    """The text of a key file: optional '# comment' lines, then 'LABEL base64url'."""
    body = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append(f"{label} {body}")
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    # O_EXCL refuses an existing file (or a symlink planted in its place), and the mode is
    # set at creation so the secret is never readable by others, not even for an instant.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     mode)
    except FileExistsError:
        raise UsageError(f"key file {path} already exists; refusing to overwrite it",
                         hint="choose another path, or move the old key away first") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UsageError(f"cannot write key file {path}: {exc.strerror}") from None


def keygen_symmetric(path: Path, *, random: Random = os.urandom) -> str:
    """Write a new secret key file at `path` (mode 0600); returns its key id in hex."""
    key = SecretKey(random(KEY_SIZE))
    comment = f"walship secret key, key id {key.key_id.hex()}\nkeep it secret, keep a copy"
    _write_new(Path(path), format_key_file(SECRET_LABEL, key.raw, comment), 0o600)
    return key.key_id.hex()


def keygen_pair(path: Path, *, random: Random = os.urandom) -> str:
    """Write PATH (private key, 0600) and PATH.pub (public key, 0644); returns the key id."""
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if pub_path.exists():
        raise UsageError(f"key file {pub_path} already exists; refusing to overwrite it")
    key = PrivateKey(random(KEY_SIZE))
    kid = key.key_id.hex()
    _write_new(path, format_key_file(
        PRIVATE_LABEL, key.raw,
        f"walship private key, key id {kid}\nneeded to fetch and restore: keep it off the "
        "database host"), 0o600)
    _write_new(pub_path, format_key_file(
        PUBLIC_LABEL, key.public.raw,
        f"walship public key, key id {kid}\nfor pushing: give it to the database host"), 0o644)
    return kid


def _read_key_file(path: Path, expect: str) -> bytes:
    """The 32 raw bytes from a key file of kind `expect` (a label), or UsageError."""
    path = Path(path)
    kind = _LABELS[expect]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{kind} key file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot open {kind} key file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"{kind} key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(64 * 1024 + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {kind} key file {path}: {exc.strerror}") from None
    if len(data) > 64 * 1024:
        raise UsageError(f"key file {path} is not a walship key file (too large)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"key file {path} is not a walship key file (not ASCII text)") from None
    lines = [ln.strip() for ln in text.splitlines()]
    payload = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(payload) != 1:
        raise UsageError(f"key file {path} is not a walship key file"
                         f" (expected one key line, found {len(payload)})")
    parts = payload[0].split()
    if len(parts) != 2 or parts[0] not in _LABELS:
        raise UsageError(f"key file {path} is not a walship key file (no {expect} line)")
    label, body = parts
    if label != expect:
        got = _LABELS[label]
        raise UsageError(
            f"key file {path} holds a {got} key, but a {kind} key is expected here",
            hint=_wrong_kind_hint(got, kind),
        )
    # Checked on the open file (fstat), so the file we read is the file we checked; and after
    # the label, so a public key given as a private one is reported as exactly that.
    if expect != PUBLIC_LABEL and st.st_mode & 0o077:
        raise UsageError(
            f"{kind} key file {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
            hint=f"chmod 600 {path}",
        )
    if not _B64_RE.match(body):
        raise UsageError(f"key file {path} is malformed: the key is not 43 base64url characters")
    try:
        return base64.urlsafe_b64decode(body + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the regex already vetted it
        raise UsageError(f"key file {path} is malformed: bad base64") from None


def _wrong_kind_hint(got: str, want: str) -> str:
    if got == "private" and want == "public":
        return "give the .pub file to the pushing side; the private key stays off it"
    if got == "public" and want == "private":
        return "a public key only encrypts; fetching needs the private key file"
    return ("a secret key goes in WALSHIP_KEY_FILE; a key pair in WALSHIP_PUBLIC_KEY_FILE "
            "and WALSHIP_PRIVATE_KEY_FILE")


def load_secret_key(path: Path) -> SecretKey:
    """Load a WALSHIP-SECRET-KEY-1 file (must not be readable by group or others)."""
    return SecretKey(_read_key_file(path, SECRET_LABEL))


def load_private_key(path: Path) -> PrivateKey:
    """Load a WALSHIP-PRIVATE-KEY-1 file (must not be readable by group or others)."""
    return PrivateKey(_read_key_file(path, PRIVATE_LABEL))


def load_public_key(path: Path) -> PublicKey:
    """Load a WALSHIP-PUBLIC-KEY-1 file."""
    return PublicKey(_read_key_file(path, PUBLIC_LABEL))


# ---------------------------------------------------------------------------------------
# The STREAM construction


def _chunk_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


_MAX_COUNTER = (1 << 88) - 1


def new_header(key: EncryptKey, codec_id: int, random: Random = os.urandom
               ) -> tuple[bytes, bytes]:
    """A fresh header for one object and its payload key: (header bytes, payload key)."""
    nonce = random(fmt.NONCE_SIZE)
    if isinstance(key, SecretKey):
        header = fmt.Header(mode=fmt.MODE_SYMMETRIC, cipher=fmt.CIPHER_CHACHA20_POLY1305,
                            codec_id=codec_id, chunk_size=fmt.CHUNK_SIZE, key_id=key.key_id,
                            nonce=nonce)
        return header.raw, _hkdf(key.raw, nonce, PAYLOAD_INFO)
    file_key = random(KEY_SIZE)
    ephemeral = X25519PrivateKey.from_private_bytes(random(KEY_SIZE))
    eph_pub = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(key.raw))
    except ValueError:
        raise UsageError("the configured public key is not a usable x25519 key") from None
    wrap_key = _hkdf(shared, eph_pub + key.raw, WRAP_INFO)
    prefix = fmt.Header(mode=fmt.MODE_X25519, cipher=fmt.CIPHER_CHACHA20_POLY1305,
                        codec_id=codec_id, chunk_size=fmt.CHUNK_SIZE, key_id=key.key_id,
                        nonce=nonce, ephemeral=eph_pub, sealed_key=bytes(fmt.SEALED_KEY_SIZE)
                        ).raw[: fmt.FIXED_SIZE + fmt.EPHEMERAL_SIZE]
    # The sealed key's associated data is the header up to and including the ephemeral key.
    sealed = ChaCha20Poly1305(wrap_key).encrypt(WRAP_NONCE, file_key, prefix)
    return prefix + sealed, _hkdf(file_key, nonce, PAYLOAD_INFO)


def open_header(header: fmt.Header, raw: bytes, keyring: Keyring) -> bytes:
    """The payload key of an object, given its parsed header; KeyMismatch/IntegrityError."""
    key = keyring.find(header.key_id, header.mode)
    if isinstance(key, SecretKey):
        return _hkdf(key.raw, header.nonce, PAYLOAD_INFO)
    try:
        shared = X25519PrivateKey.from_private_bytes(key.raw).exchange(
            X25519PublicKey.from_public_bytes(header.ephemeral))
    except ValueError:
        # An all-zero shared secret: a low-order ephemeral point, never written by walship.
        raise IntegrityError("encrypted object header has an invalid ephemeral key") from None
    wrap_key = _hkdf(shared, header.ephemeral + key.public.raw, WRAP_INFO)
    try:
        file_key = ChaCha20Poly1305(wrap_key).decrypt(
            WRAP_NONCE, header.sealed_key, raw[: fmt.FIXED_SIZE + fmt.EPHEMERAL_SIZE])
    except InvalidTag:
        raise IntegrityError(
            "cannot unseal the object's file key: the header is damaged",
            hint="its key id matches a configured private key, so the key is right",
        ) from None
    return _hkdf(file_key, header.nonce, PAYLOAD_INFO)


class StreamEncryptor:
    """Seals a byte stream into chunks. update() may return b''; finish() seals the last one."""

    def __init__(self, payload_key: bytes, header: bytes) -> None:
        self._aead = ChaCha20Poly1305(payload_key)
        self._aad = header
        self._buf = bytearray()
        self._counter = 0
        self._done = False

    def update(self, data: bytes) -> list[bytes]:
        """Buffer data; return the chunks that are certainly not the last one."""
        buf = self._buf
        buf += data
        size = fmt.CHUNK_SIZE
        # Keep at least one byte back: a full chunk is sealed only once more data proves it
        # is not the last (the last chunk carries the flag). Like age, the final chunk may
        # be full but is empty only when the whole plaintext is.
        n = (len(buf) - 1) // size
        if n <= 0:
            return []
        out = []
        view = memoryview(buf)
        try:
            for i in range(n):
                out.append(self._seal(view[i * size : (i + 1) * size], last=False))
        finally:
            view.release()
        del buf[: n * size]
        return out

    def finish(self) -> bytes:
        """Seal and return the final chunk (possibly of empty plaintext)."""
        if self._done:
            raise ValueError("finish() called twice")
        self._done = True
        out = self._seal(bytes(self._buf), last=True)
        self._buf.clear()
        return out

    def _seal(self, chunk: memoryview | bytes, last: bool) -> bytes:
        if self._counter > _MAX_COUNTER:  # pragma: no cover - 2^88 chunks
            raise ValueError("object too large for one stream")
        nonce = _chunk_nonce(self._counter, last)
        self._counter += 1
        return self._aead.encrypt(nonce, chunk, self._aad)


class StreamDecryptor:
    """Opens a chunk stream. Feed ciphertext; get plaintext; finish() demands the last chunk."""

    SEALED = fmt.CHUNK_SIZE + fmt.TAG_SIZE

    def __init__(self, payload_key: bytes, header: bytes) -> None:
        self._aead = ChaCha20Poly1305(payload_key)
        self._aad = header
        self._buf = bytearray()
        self._counter = 0
        self._done = False

    def update(self, data: bytes) -> list[bytes]:
        """Buffer ciphertext; open and return the chunks that are certainly not the last."""
        if self._done:
            if data:
                raise IntegrityError("unexpected bytes after the final chunk")
            return []
        buf = self._buf
        buf += data
        size = self.SEALED
        # A full-size sealed chunk may still be the last: open it only when a byte beyond
        # it shows that it is not.
        n = (len(buf) - 1) // size
        if n <= 0:
            return []
        out = []
        view = memoryview(buf)
        try:
            for i in range(n):
                out.append(self._open(view[i * size : (i + 1) * size], last=False))
        finally:
            view.release()
        del buf[: n * size]
        return out

    def finish(self) -> bytes:
        """Open what is left as the final chunk: IntegrityError if it is missing or damaged."""
        if self._done:
            return b""
        self._done = True
        rest = bytes(self._buf)
        self._buf.clear()
        if len(rest) < fmt.TAG_SIZE:
            raise IntegrityError(
                "encrypted object is truncated: the final chunk is missing"
                if not rest else "encrypted object is truncated inside a chunk")
        if len(rest) == fmt.TAG_SIZE and self._counter > 0:
            # Never written (see StreamEncryptor.update); refused so the encoding is unique.
            raise IntegrityError("encrypted object has an empty final chunk after data")
        return self._open(rest, last=True)

    def _open(self, chunk: memoryview | bytes, last: bool) -> bytes:
        nonce = _chunk_nonce(self._counter, last)
        try:
            out = self._aead.decrypt(nonce, chunk, self._aad)
        except InvalidTag:
            where = f"chunk {self._counter}"
            if not last:
                raise IntegrityError(f"encrypted object failed authentication at {where}",
                                     hint="the object is damaged or was tampered with") from None
            # The last chunk may also be a non-final chunk whose successors were cut off.
            raise IntegrityError(
                f"encrypted object failed authentication at {where} (the last present):"
                " it is truncated, damaged or was tampered with") from None
        self._counter += 1
        return out
