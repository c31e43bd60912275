"""C2SP signed notes (Ed25519) and tlog checkpoints, byte-compatible with golang.org/x/mod/sumdb/note.

Keys travel as text: a verifier key is "name+keyid+base64(0x01 || pubkey)", a signer key is
"PRIVATE+KEY+name+keyid+base64(0x01 || seed)", with keyid = SHA-256(name || 0x0A || 0x01 || pubkey)[:4]
as 8 lowercase hex digits. A note is its text (ending in a newline), a blank line, then one line
"— name base64(keyid || signature)" per signature over the text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fieldprint.errors import NoteError

ALG_ED25519 = 0x01
_SIG_PREFIX = "\u2014 "  # EM DASH + space, as in the Go implementation
_MAX_SIGNATURES = 100
_SIZE_RE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


def _valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() or unicodedata.category(c) == "Zs" for c in name)


def key_id(name: str, public_key: bytes) -> int:
    """The 32-bit key id: the first 4 bytes of SHA-256(name || 0x0A || 0x01 || pubkey), big-endian."""
    return int.from_bytes(hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4], "big")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError(f"{what} is not valid base64 ({exc})") from None


def _encode_key(name: str, kid: int, key: bytes) -> str:
    return f"{name}+{kid:08x}+{base64.b64encode(bytes([ALG_ED25519]) + key).decode()}"


def generate_key(name: str) -> tuple[str, str]:
    """A fresh Ed25519 key pair as (signer key text, verifier key text) for the given name."""
    if not isinstance(name, str) or not _valid_name(name):
        raise NoteError(f"key name {name!r} must be non-empty, without '+' or spaces (e.g. 'example.com/log')")
    seed = os.urandom(32)
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    kid = key_id(name, pub)
    return "PRIVATE+KEY+" + _encode_key(name, kid, seed), _encode_key(name, kid, pub)


@dataclass(slots=True)
class Signer:
    """A parsed signer key: name, key id and the Ed25519 private key."""

    name: str
    key_id: int
    private: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> Signer:
        """Parse 'PRIVATE+KEY+name+keyid+base64'; raises NoteError if malformed or inconsistent."""
        if not isinstance(text, str) or not text.startswith("PRIVATE+KEY+"):
            raise NoteError("a signer key must be text of the form 'PRIVATE+KEY+name+keyid+base64'")
        name, kid, key = _split_key(text[len("PRIVATE+KEY+") :], "signer key")
        private = Ed25519PrivateKey.from_private_bytes(key)
        if key_id(name, private.public_key().public_bytes_raw()) != kid:
            raise NoteError(f"signer key for {name!r}: key id {kid:08x} does not match its public key")
        return cls(name, kid, private)

    def verifier_key(self) -> str:
        """The matching verifier key text."""
        return _encode_key(self.name, self.key_id, self.private.public_key().public_bytes_raw())


@dataclass(slots=True)
class Verifier:
    """A parsed verifier key: name, key id and the Ed25519 public key."""

    name: str
    key_id: int
    public: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse 'name+keyid+base64'; raises NoteError if malformed or inconsistent."""
        if not isinstance(text, str) or text.startswith("PRIVATE+"):
            raise NoteError("a verifier key must be text of the form 'name+keyid+base64' (not a private key)")
        name, kid, key = _split_key(text, "verifier key")
        if key_id(name, key) != kid:
            raise NoteError(f"verifier key for {name!r}: key id {kid:08x} does not match its public key")
        return cls(name, kid, Ed25519PublicKey.from_public_bytes(key))


def _split_key(text: str, what: str) -> tuple[str, int, bytes]:
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise NoteError(f"{what} must have the form 'name+keyid+base64', got {len(parts)} '+'-separated fields")
    name, kid_hex, b64 = parts
    if not _valid_name(name):
        raise NoteError(f"{what}: name {name!r} must be non-empty, without '+' or spaces")
    if not re.fullmatch(r"[0-9a-f]{8}", kid_hex):
        raise NoteError(f"{what}: key id {kid_hex!r} must be 8 lowercase hex digits")
    raw = _b64decode(b64, what)
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError(f"{what}: key must be 0x01 (Ed25519) followed by 32 bytes, got {len(raw)} bytes")
    return name, int(kid_hex, 16), raw[1:]


def sign_note(text: str, signer_key: str) -> str:
    """Sign `text` (non-empty, ending in a newline) and return the signed note."""
    signer = Signer.parse(signer_key)
    _check_text(text)
    sig = signer.private.sign(text.encode())
    b64 = base64.b64encode(signer.key_id.to_bytes(4, "big") + sig).decode()
    return f"{text}\n{_SIG_PREFIX}{signer.name} {b64}\n"


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("note text must be a string ending in a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("note text must not contain control characters other than newline")


def open_note(note: str, verifier_keys: list[str]) -> str:
    """Verify a signed note against known verifier keys and return its text.

    Raises NoteError when the note is malformed, when any signature by a known key is invalid, or
    when no known key signed it (signatures by unknown keys are ignored, as in Go).
    """
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not valid UTF-8") from None
    if not isinstance(note, str):
        raise NoteError(f"note must be text, got {type(note).__name__}")
    if any(ord(c) < 0x20 and c != "\n" for c in note) or any(0xD800 <= ord(c) <= 0xDFFF for c in note):
        raise NoteError("malformed note: control characters or invalid UTF-8")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line separating the text from its signatures")
    text, sigs = note[: split + 1], note[split + 2 :]
    if not sigs or not sigs.endswith("\n"):
        raise NoteError("malformed note: the signature block is empty or does not end in a newline")
    known: dict[tuple[str, int], Verifier] = {}
    for k in verifier_keys:
        v = Verifier.parse(k)
        known[(v.name, v.key_id)] = v
    verified: set[tuple[str, int]] = set()
    lines = sigs[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {_MAX_SIGNATURES} signatures")
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"malformed note: signature line {line!r} does not start with '\u2014 '")
        name, _, b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not _valid_name(name) or not b64:
            raise NoteError(f"malformed note: bad signature line {line!r}")
        raw = _b64decode(b64, "signature")
        if len(raw) < 5:
            raise NoteError("malformed note: signature too short")
        kid = int.from_bytes(raw[:4], "big")
        v = known.get((name, kid))
        if v is None or (name, kid) in verified:
            continue
        try:
            v.public.verify(raw[4:], text.encode())
        except InvalidSignature:
            raise NoteError(f"invalid signature by {name}+{kid:08x}: the note was altered or signed by another key") from None
        verified.add((name, kid))
    if not verified:
        raise NoteError("note has no signature by any of the given verifier keys")
    return text


@dataclass(slots=True)
class Checkpoint:
    """A C2SP tlog-checkpoint: origin, tree size and root hash, with the full signed note."""

    origin: str
    size: int
    root_hash: bytes
    note: str

    @staticmethod
    def body(origin: str, size: int, root_hash: bytes) -> str:
        """The checkpoint text: origin, decimal size and base64 root, each on its own line."""
        return f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\n"

    @classmethod
    def open(cls, note: str | bytes, verifier_keys: list[str], *, origin: str) -> Checkpoint:
        """Verify the signature, parse the body and require the expected origin; raises NoteError.

        A key can sign for several logs, so a valid signature alone does not say which log a
        checkpoint is from: as transparency-dev/formats' ParseCheckpoint does, the caller names the
        origin it expects (for a C2SP log, its key's name) and any other is refused.
        """
        if not isinstance(origin, str) or not origin:
            raise NoteError(f"the expected origin must be a non-empty string, got {origin!r}")
        text = open_note(note, verifier_keys)
        if isinstance(note, bytes):
            note = note.decode("utf-8")  # open_note has checked that it is UTF-8
        cp = cls.parse_body(text, note)
        if cp.origin != origin:
            raise NoteError(f"checkpoint is for origin {cp.origin!r}, expected {origin!r}: it is another log's checkpoint")
        return cp

    @classmethod
    def parse_body(cls, text: str, note: str) -> Checkpoint:
        """Parse a checkpoint body (already verified); raises NoteError if malformed."""
        lines = text.split("\n")
        if len(lines) < 4:
            raise NoteError("malformed checkpoint: want origin, size and root hash lines")
        origin, size_text, root_text = lines[0], lines[1], lines[2]
        if not origin:
            raise NoteError("malformed checkpoint: empty origin line")
        if not _SIZE_RE.match(size_text) or int(size_text) >= 2**64:
            raise NoteError(f"malformed checkpoint: size {size_text!r} is not a decimal 64-bit integer")
        root = _b64decode(root_text, "checkpoint root hash")
        if len(root) != 32:
            raise NoteError(f"malformed checkpoint: root hash is {len(root)} bytes, want 32")
        return cls(origin, int(size_text), root, note)
