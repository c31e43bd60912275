"""The `fieldprint` command.

`build_parser()` returns the top-level parser; each command group registers itself on its
subparsers with one `add_*_commands(subparsers)` function and sets `func` on its leaf parsers, so a
new group (e.g. `demo`) is one function and one line in build_parser().
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fieldprint.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_ORIGIN,
    LEDGER_DB,
    LEDGER_KEY_STEM,
    SIGNER_KEY_FILE,
    VERIFIER_KEY_FILE,
)
from fieldprint.errors import FieldprintError, LogError, ProofError


def build_parser() -> argparse.ArgumentParser:
    """The full `fieldprint` argument parser."""
    parser = argparse.ArgumentParser(prog="fieldprint", description="Verifiable, memory-anchored inference for LLM agents.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_ledger_commands(subparsers)
    demo = subparsers.add_parser("demo", help="run the whole path on embedded defaults: states, gate, DQP commit, anchored attention, receipt")
    demo.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"folder for the log, keys, stores and receipts (default {DEFAULT_DATA_DIR}); reused across runs")
    demo.set_defaults(func=run_demo_command)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    """`fieldprint demo`: see fieldprint/demo.py."""
    import torch

    # Before triton is first imported: without CUDA its interpreter runs the kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from fieldprint.demo import run_demo

    run_demo(args.data_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse arguments, run the command, turn FieldprintErrors into exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return func(args) or 0
    except FieldprintError as exc:
        print(f"fieldprint: error: {exc}", file=sys.stderr)
        return 1


# --- ledger ----------------------------------------------------------------------------------------


def add_ledger_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `fieldprint ledger init|add|checkpoint|prove|verify|audit`."""
    ledger = subparsers.add_parser("ledger", help="the transparency log: init, add, checkpoint, prove, verify, audit")
    ledger.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"folder with the log and its keys (default {DEFAULT_DATA_DIR})")
    ledger.set_defaults(group_parser=ledger)
    sub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")

    p = sub.add_parser("init", help="create the data folder, a signing key and an empty log")
    p.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"the log's origin line and key name (default {DEFAULT_ORIGIN})")
    p.set_defaults(func=ledger_init)

    p = sub.add_parser("add", help="add entries: each FILE is one entry (- or none: standard input)")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--lines", action="store_true", help="add every non-blank line of the input as its own entry (blank lines are skipped)")
    p.set_defaults(func=ledger_add)

    p = sub.add_parser("checkpoint", help="sign and print a checkpoint of the current tree")
    p.set_defaults(func=ledger_checkpoint)

    p = sub.add_parser("prove", help="print an inclusion proof bundle (JSON) for an entry")
    p.add_argument("index", type=int)
    p.add_argument("-o", "--output", help="write the bundle to this file instead of standard output")
    p.set_defaults(func=ledger_prove)

    p = sub.add_parser("verify", help="check a proof bundle offline against a verifier key")
    p.add_argument("bundle", help="bundle file (- for standard input)")
    p.add_argument("--key", help="verifier key text 'name+keyid+base64' (default: the data folder's ledger.pub)")
    p.set_defaults(func=ledger_verify)

    p = sub.add_parser("audit", help="re-verify every leaf, node and checkpoint of the stored log")
    p.set_defaults(func=ledger_audit)


def _paths(args: argparse.Namespace) -> tuple[str, str, str]:
    d = args.data_dir
    return os.path.join(d, LEDGER_DB), os.path.join(d, SIGNER_KEY_FILE), os.path.join(d, VERIFIER_KEY_FILE)


def _open_log(args: argparse.Namespace):
    from fieldprint.ledger.log import TransparencyLog

    db, key_file, _ = _paths(args)
    if os.path.exists(db) and not os.path.exists(key_file):
        raise LogError(f"{args.data_dir} holds a log database but no {SIGNER_KEY_FILE}; restore the key, or, "
                       f"if the log holds nothing you need, remove {db} and run init again")
    if not os.path.exists(key_file) or not os.path.exists(db):
        raise LogError(f"no ledger in {args.data_dir}; run `fieldprint ledger --data-dir {args.data_dir} init` first")
    with open(key_file) as f:
        signer = f.read().strip()
    return TransparencyLog.open(db, signer, checkpoint_interval_s=None)


def ledger_init(args: argparse.Namespace) -> int:
    """Create the data folder, an Ed25519 signing key (mode 0600) and an empty log with a checkpoint.

    The key files take their names only once the log and its first checkpoint exist; on any failure
    the log files, the key files and a folder this command created are removed, so init can rerun.
    """
    from fieldprint.ledger.keys import ensure_key_pair
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.note import generate_key

    db, key_file, pub_file = _paths(args)
    if os.path.exists(db) and not os.path.exists(key_file):
        raise LogError(f"{args.data_dir} holds a log database but no {SIGNER_KEY_FILE} (an interrupted init?); "
                       f"if it holds nothing you need, remove {db} and run init again")
    if any(os.path.exists(p) for p in (key_file, pub_file, db)):
        raise LogError(f"{args.data_dir} already holds a ledger; use another --data-dir or remove it")
    generate_key(args.origin)  # NoteError on a bad origin, before any file exists
    created_dir = not os.path.isdir(args.data_dir)
    try:
        os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise LogError(f"cannot create the data folder {args.data_dir}: {exc.strerror}") from None

    def create_log(signer: str, verifier: str) -> None:
        with TransparencyLog.open(db, signer, checkpoint_interval_s=None) as log:
            log.checkpoint()

    try:
        _, verifier = ensure_key_pair(args.data_dir, LEDGER_KEY_STEM, args.origin, before_publish=create_log)
    except BaseException:
        for path in (db, db + "-wal", db + "-shm", db + "-journal"):
            if os.path.exists(path):
                os.remove(path)
        if created_dir:
            try:
                os.rmdir(args.data_dir)
            except OSError:
                pass  # something else was put there meanwhile: leave it
        raise
    print(f"initialized ledger {args.origin} in {args.data_dir}")
    print(f"verifier key: {verifier}")
    return 0


def _read_inputs(files: list[str]) -> list[bytes]:
    out = []
    for name in files or ["-"]:
        if name == "-":
            out.append(sys.stdin.buffer.read())
        else:
            try:
                with open(name, "rb") as f:
                    out.append(f.read())
            except OSError as exc:
                raise LogError(f"cannot read entry file {name}: {exc.strerror}") from None
    return out


def ledger_add(args: argparse.Namespace) -> int:
    """Add entries and print one 'index<TAB>leaf hash' line per entry once they are durable."""
    from fieldprint.ledger.log import check_entry
    from fieldprint.ledger.merkle import leaf_hash

    with _open_log(args) as log:
        blobs = _read_inputs(args.files)
        if args.lines:
            lines = [line for blob in blobs for line in blob.splitlines()]
            entries = [line for line in lines if line.strip()]  # a blank line is a separator, not an entry
            if len(entries) < len(lines):
                print(f"skipped {len(lines) - len(entries)} blank lines", file=sys.stderr)
        else:
            entries = blobs
        for e in entries:
            check_entry(e)  # refuse the whole command before anything is written
        futures = [log.add(e) for e in entries]
        for e, fut in zip(entries, futures):
            print(f"{fut.result()}\t{leaf_hash(e).hex()}")
    return 0


def ledger_checkpoint(args: argparse.Namespace) -> int:
    """Sign a checkpoint of the current tree and print the signed note."""
    with _open_log(args) as log:
        sys.stdout.write(log.checkpoint().note)
    return 0


def ledger_prove(args: argparse.Namespace) -> int:
    """Print an inclusion proof bundle for entry `index` against the latest covering checkpoint."""
    from fieldprint.ledger.receipt import inclusion_bundle

    with _open_log(args) as log:
        bundle = inclusion_bundle(log, args.index)
    text = json.dumps(bundle, indent=2) + "\n"
    if args.output:
        _write_output(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _write_output(path: str, text: str) -> None:
    """Write `text` to `path`; on failure remove what this call created and raise LogError."""
    existed = os.path.exists(path)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        if not existed and os.path.isfile(path):
            os.remove(path)  # never leave a half-written bundle behind
        raise LogError(f"cannot write the bundle to {path}: {exc.strerror or exc}; choose another -o path") from None


def ledger_verify(args: argparse.Namespace) -> int:
    """Verify a proof bundle offline; exit 0 and say what was proven, or exit 1 with the reason."""
    key = args.key
    if key is None:
        pub_file = _paths(args)[2]
        if not os.path.exists(pub_file):
            raise LogError(f"no verifier key given and {pub_file} does not exist; pass --key 'name+keyid+base64'")
        with open(pub_file) as f:
            key = f.read().strip()
    try:
        if args.bundle == "-":
            text = sys.stdin.read()
        else:
            with open(args.bundle, encoding="utf-8") as f:
                text = f.read()
        bundle = json.loads(text)
    except OSError as exc:
        raise ProofError(f"cannot read bundle {args.bundle}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProofError(f"bundle {args.bundle} is not UTF-8 text; pass the JSON file `ledger prove` wrote") from None
    except json.JSONDecodeError as exc:
        raise ProofError(f"bundle {args.bundle} is not JSON: {exc}") from None
    if not isinstance(bundle, dict):
        raise ProofError("a proof bundle is a JSON object")
    from fieldprint.ledger.receipt import verify_bundle

    cp = verify_bundle(bundle, key)
    print(f"OK: entry {bundle['index']} is included in {cp.origin} at size {cp.size} (root {cp.root_hash.hex()})")
    return 0


def ledger_audit(args: argparse.Namespace) -> int:
    """Re-verify the whole stored log; exit 1 and list the problems if any."""
    with _open_log(args) as log:
        report = log.audit()
    print(
        f"audited {report.leaves_checked} leaves, {report.nodes_checked} nodes, "
        f"{report.checkpoints_checked} checkpoints of a log of size {report.size}: "
        + ("OK" if report.ok else f"{len(report.problems)} problems")
    )
    for p in report.problems:
        print(f"  {p}")
    return 0 if report.ok else 1
