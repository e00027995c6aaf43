"""The envelope of an encrypted object: magic, version, mode, cipher, codec, key id, nonce.

docs/format.md ("## Object format") is the specification; this module is its only encoder
and parser. Unencrypted objects have no envelope at all: they are bare standard frames
(lz4, zstd, gzip) or the plain bytes (none), recognised by their own magic numbers.

Layout (all integers big-endian):

    offset  size  field
    0       8     MAGIC  89 77 61 6c 73 68 69 70   ("\\x89walship")
    8       1     version (1)
    9       1     mode: 1 symmetric, 2 x25519
    10      1     cipher: 1 chacha20-poly1305 STREAM
    11      1     codec id (walship.codecs.CODEC_IDS)
    12      4     plaintext chunk size (65536)
    16      8     key id
    24      16    nonce (random per object; the HKDF salt of the payload key)
    -- mode 1 ends here: 40 bytes
    40      32    ephemeral X25519 public key
    72      48    file key sealed to the recipient (32 bytes + 16-byte Poly1305 tag)
    -- mode 2 ends here: 120 bytes

The whole header is the associated data of every payload chunk, so changing any header
byte makes the first chunk fail authentication.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from walship.errors import IntegrityError

# 0x89 first, as PNG does: a high byte no text file starts with, caught by 7-bit mangling,
# and different from the first byte of every codec's magic (04, 28, 1f) so sniffing the
# first bytes of any object tells encrypted from unencrypted.
MAGIC = b"\x89walship"
VERSION = 1

MODE_SYMMETRIC = 1
MODE_X25519 = 2
MODE_NAMES = {MODE_SYMMETRIC: "symmetric", MODE_X25519: "x25519"}

CIPHER_CHACHA20_POLY1305 = 1

# 64 KiB as in age: a tag per 64 KiB costs 0.02% in size, and a reader holds at most one
# chunk of ciphertext beyond what it has handed on.
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
KEY_ID_SIZE = 8
NONCE_SIZE = 16
EPHEMERAL_SIZE = 32
SEALED_KEY_SIZE = 32 + TAG_SIZE

_FIXED = struct.Struct(">8sBBBBI8s16s")
FIXED_SIZE = _FIXED.size  # 40
HEADER_SIZES = {
    MODE_SYMMETRIC: FIXED_SIZE,
    MODE_X25519: FIXED_SIZE + EPHEMERAL_SIZE + SEALED_KEY_SIZE,
}
MAX_HEADER_SIZE = max(HEADER_SIZES.values())
# How many bytes parse_header needs before it can tell the header's full length.
PREFIX_SIZE = 10


@dataclass(frozen=True)
class Header:
    """A parsed envelope header. `raw` is the exact bytes, used as associated data."""

    mode: int
    cipher: int
    codec_id: int
    chunk_size: int
    key_id: bytes
    nonce: bytes
    ephemeral: bytes = b""
    sealed_key: bytes = b""
    version: int = VERSION

    @property
    def raw(self) -> bytes:
        """The header's bytes as stored."""
        return encode_header(self)

    @property
    def size(self) -> int:
        """Length of the header in bytes."""
        return HEADER_SIZES[self.mode]


def is_encrypted(head: bytes) -> bool:
    """Whether an object starting with `head` (at least 8 bytes of it) is encrypted."""
    return bytes(head[: len(MAGIC)]) == MAGIC


def header_size(prefix: bytes) -> int:
    """The full header length, from its first PREFIX_SIZE bytes (checks magic and version)."""
    if len(prefix) < PREFIX_SIZE or not is_encrypted(prefix):
        raise IntegrityError("encrypted object header is truncated or has a bad magic")
    _check_version(prefix[8])
    size = HEADER_SIZES.get(prefix[9])
    if size is None:
        raise IntegrityError(
            f"encrypted object has unknown mode {prefix[9]}",
            hint="the object is damaged, or was written by a newer walship",
        )
    return size


def _check_version(version: int) -> None:
    if version != VERSION:
        if version > VERSION:
            raise IntegrityError(
                f"object format version {version} is newer than this walship understands"
                f" (it reads version {VERSION})",
                hint="upgrade walship on this host, or the object is damaged",
            )
        raise IntegrityError(f"object format version {version} is not valid")


def encode_header(header: Header) -> bytes:
    """The header's bytes. Refuses fields of the wrong length."""
    if len(header.key_id) != KEY_ID_SIZE or len(header.nonce) != NONCE_SIZE:
        raise ValueError("key id must be 8 bytes and nonce 16 bytes")
    fixed = _FIXED.pack(MAGIC, header.version, header.mode, header.cipher, header.codec_id,
                        header.chunk_size, header.key_id, header.nonce)
    if header.mode == MODE_X25519:
        if len(header.ephemeral) != EPHEMERAL_SIZE or len(header.sealed_key) != SEALED_KEY_SIZE:
            raise ValueError("x25519 header needs a 32-byte ephemeral key and 48-byte sealed key")
        return fixed + header.ephemeral + header.sealed_key
    if header.mode != MODE_SYMMETRIC or header.ephemeral or header.sealed_key:
        raise ValueError(f"bad header mode {header.mode}")
    return fixed


def parse_header(raw: bytes) -> Header:
    """Parse exactly one header (len(raw) == header_size(raw)). IntegrityError if invalid."""
    size = header_size(raw)
    if len(raw) != size:
        raise IntegrityError("encrypted object header is truncated")
    _magic, version, mode, cipher, codec_id, chunk_size, key_id, nonce = _FIXED.unpack_from(raw)
    if cipher != CIPHER_CHACHA20_POLY1305:
        raise IntegrityError(
            f"encrypted object uses unknown cipher {cipher}",
            hint="the object is damaged, or was written by a newer walship",
        )
    # Only the one chunk size is written; accepting others would let a damaged header pick
    # a reader's buffer size.
    if chunk_size != CHUNK_SIZE:
        raise IntegrityError(f"encrypted object has unsupported chunk size {chunk_size}")
    ephemeral = sealed = b""
    if mode == MODE_X25519:
        ephemeral = bytes(raw[FIXED_SIZE : FIXED_SIZE + EPHEMERAL_SIZE])
        sealed = bytes(raw[FIXED_SIZE + EPHEMERAL_SIZE :])
    return Header(mode=mode, cipher=cipher, codec_id=codec_id, chunk_size=chunk_size,
                  key_id=bytes(key_id), nonce=bytes(nonce), ephemeral=ephemeral,
                  sealed_key=sealed, version=version)
