"""Signing key pairs on disk: `stem`.key (private, mode 0600) and `stem`.pub, created atomically.

Both files are written under temporary names and linked into place only when complete, so a crash
never leaves a truncated key, and a key file that already exists is never replaced. Two renames cannot be one atomic step: a crash between them leaves a
half pair, which is refused with a message naming the file to remove, never silently replaced (a
new key would no longer verify the checkpoints the old one signed).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldprint.atomic import remove_quietly, sweep_temporaries, sync_dir, temporary
from fieldprint.errors import NoteError
from fieldprint.ledger.note import Signer, generate_key


def key_paths(folder: str | os.PathLike, stem: str) -> tuple[str, str]:
    """The (private key file, verifier key file) paths of key pair `stem` in `folder`."""
    folder = os.fspath(folder)
    return os.path.join(folder, stem + ".key"), os.path.join(folder, stem + ".pub")


def ensure_key_pair(
    folder: str | os.PathLike,
    stem: str,
    name: str,
    before_publish: Callable[[str, str], object] | None = None,
) -> tuple[str, str]:
    """Load key pair `stem` from `folder`, or create it atomically; return (signer key, verifier key).

    When the pair is created, `before_publish(signer, verifier)` runs (if given) before the key files
    take their final names; if it raises, no key file is left behind and the error propagates.
    """
    key_file, pub_file = key_paths(folder, stem)
    have_key, have_pub = os.path.exists(key_file), os.path.exists(pub_file)
    if have_key and have_pub:
        return _load(key_file, pub_file)
    if have_key or have_pub:
        present, missing = (key_file, pub_file) if have_key else (pub_file, key_file)
        raise NoteError(
            f"half a key pair: {present} exists but {missing} does not (an interrupted creation?); "
            f"restore {missing} from a backup, or remove {present} to create a new key pair"
        )
    sweep_temporaries(folder)  # key files a killed creation left under temporary names
    signer, verifier = generate_key(name)  # NoteError on a bad name, before any file exists
    temps: list[str] = []
    published: list[str] = []
    done = False
    try:
        try:
            tmp_key = _write_temp(folder, stem + ".key", signer + "\n", 0o600, temps)
            tmp_pub = _write_temp(folder, stem + ".pub", verifier + "\n", 0o644, temps)
        except OSError as exc:
            raise NoteError(f"cannot write key pair {stem} in {os.fspath(folder)}: {exc}; nothing was kept") from None
        if before_publish is not None:
            before_publish(signer, verifier)
        try:
            for tmp, final in ((tmp_pub, pub_file), (tmp_key, key_file)):
                os.link(tmp, final)  # unlike a rename, never replaces a key another process published meanwhile
                published.append(final)
        except FileExistsError as exc:
            raise NoteError(f"{exc.filename2 or exc.filename} appeared while this key pair was being created "
                            f"(another process?); it was left alone and this pair discarded") from None
        except OSError as exc:
            raise NoteError(f"cannot move key pair {stem} into place in {os.fspath(folder)}: {exc}; nothing was kept") from None
        done = True
    finally:
        for path in temps + ([] if done else published):
            remove_quietly(path)
    sync_dir(folder)
    return signer, verifier


def _load(key_file: str, pub_file: str) -> tuple[str, str]:
    try:
        with open(key_file, encoding="utf-8") as f, open(pub_file, encoding="utf-8") as g:
            signer, verifier = f.read().strip(), g.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise NoteError(f"cannot read key pair {key_file} / {pub_file}: {exc}") from None
    if Signer.parse(signer).verifier_key() != verifier:
        raise NoteError(f"{pub_file} is not the verifier key of {key_file}; restore the matching pair")
    return signer, verifier


def _write_temp(folder: str | os.PathLike, final: str, text: str, mode: int, temps: list[str]) -> str:
    fd, path = temporary(folder, final)
    temps.append(path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), mode)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path
