"""WireGuard keys as natfail reads and writes them: 32 bytes, one line of
base64 in a file only its owner may touch (as ``wg genkey`` and
``wg genpsk`` write them). No message here ever contains key material."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from natfail.config.files import Unreadable, foreign_owner, read_regular
from natfail.config.problems import escape_unprintable
from natfail.core.model import kind

KEY_LEN: Final = 32  # Curve25519 keys and WireGuard preshared keys
KEY_FILE_LIMIT: Final = 1024  # a key file is one 44-character line


class KeyFileError(ValueError):
    """A key file that cannot be used; ``reason`` never contains key material."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return escape_unprintable(f"{self.path}: {self.reason}")


def decode_key(text: str) -> bytes:
    """Decode a base64 WireGuard key (32 bytes). The ValueError never quotes
    the input: it may be a private key."""
    if not isinstance(text, str):
        raise ValueError(f"a key must be a string, not {kind(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"decodes to {len(raw)} bytes; a WireGuard key is {KEY_LEN} bytes "
            "(44 base64 characters)"
        )
    return raw


def encode_key(key: bytes) -> str:
    """A key as WireGuard writes it: base64, 44 characters."""
    return base64.b64encode(key).decode("ascii")


def generate_key() -> bytes:
    """A new private key, clamped as ``wg genkey`` clamps it (X25519 clamps
    anyway; a clamped key reads the same to every tool)."""
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return bytes(raw)


def create_key_file(path: Path, key: bytes) -> None:
    """Write a new key file, mode 0600 from its first byte on; raises
    FileExistsError rather than replace a key, OSError otherwise."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(encode_key(key) + "\n")


def load_key_file(path: Path | str) -> bytes:
    """Read a WireGuard key file: one line of base64 for 32 bytes, surrounding
    whitespace allowed. Raises KeyFileError (a ValueError) whose message names
    the file and never contains key material."""
    path = Path(path)
    data = _read_key_file(path)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(path, "is not text; expected one line of base64") from None
    if not text:
        raise KeyFileError(path, "is empty; expected one line of base64")
    if any(ch.isspace() for ch in text):
        raise KeyFileError(path, "must hold exactly one key on one line")
    try:
        return decode_key(text)
    except ValueError as exc:
        raise KeyFileError(path, f"content {exc}") from None


def _too_open(mode: int) -> str | None:
    """Why a secret's permissions are refused, as ssh refuses a private key
    that anyone but its owner may touch: a key another local user can read
    lets them impersonate the probe, one they can write lets them swap it."""
    if mode & 0o077:
        return (
            f"permissions {stat.S_IMODE(mode):04o} are too open: a key must not be "
            "accessible by group or others (chmod 600)"
        )
    return None


def _read_key_file(path: Path) -> bytes:
    def vet(info: os.stat_result) -> str | None:
        return _too_open(info.st_mode) or foreign_owner(info.st_uid, "a key")

    try:
        return read_regular(path, KEY_FILE_LIMIT, vet)
    except Unreadable as exc:
        reason = {
            "missing": "does not exist",
            "denied": "is not readable (permission denied)",
            "open": f"cannot be opened: {exc.detail}",
            "type": "is not a regular file",
            "vetted": exc.detail,
            "read": f"cannot be read: {exc.detail}",
            "size": f"is larger than {KEY_FILE_LIMIT} bytes; expected one key",
        }[exc.kind]
        raise KeyFileError(path, reason) from None
