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

from fieldprint.atomic import replace_file
from fieldprint.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_ORIGIN,
    LEDGER_DB,
    LEDGER_KEY_STEM,
    SIGNER_KEY_FILE,
    VERIFIER_KEY_FILE,
)
from fieldprint.errors import (
    EngineError,
    EntryError,
    FieldprintError,
    LogError,
    NoteError,
    ProofError,
)


def build_parser() -> argparse.ArgumentParser:
    """The full `fieldprint` argument parser."""
    parser = argparse.ArgumentParser(prog="fieldprint", description="Verifiable, memory-anchored inference for LLM agents.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_ledger_commands(subparsers)
    demo = subparsers.add_parser("demo", help="run the whole path on embedded defaults: states, gate, DQP commit, anchored attention, receipt")
    demo.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"folder for the log, keys, stores and receipts (default {DEFAULT_DATA_DIR}); reused across runs")
    demo.set_defaults(func=run_demo_command)
    gen = subparsers.add_parser("generate", help="answer a prompt, conditioned on verified anchors, and write its receipt")
    gen.add_argument("prompt")
    gen.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"the log, memory and anchor sets (default {DEFAULT_DATA_DIR})")
    gen.add_argument("--model", default="smollm2", help="an HF safetensors folder, a .gguf file, or smollm2 (default)")
    gen.add_argument("--anchors", metavar="QUERY", help="retrieve anchor candidates from memory with this query")
    gen.add_argument("--session", help="a session name: created at its first turn, its history carried into later ones")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--receipt", metavar="FILE", help="where to write the receipt (default: DATA_DIR/receipts/<time>.json)")
    gen.add_argument("--json", action="store_true", help="print text, decisions and the receipt path as JSON")
    gen.set_defaults(func=run_generate_command)
    gen.add_argument("--database", metavar="URL", help="a postgresql:// URL: the log and memory shared by many engines")
    gen.add_argument("--tp-size", type=int, default=1, metavar="N",
                     help="split the model over N GPUs (tensor parallelism; one process each, this one serves)")
    init = subparsers.add_parser("init", help="create the log's and the memory's schema in PostgreSQL (many engines share it)")
    init.add_argument("--database", required=True, metavar="URL", help="postgresql://user@host:port/db")
    init.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"where the keys live (default {DEFAULT_DATA_DIR})")
    init.set_defaults(func=run_init_command)
    ver = subparsers.add_parser("verify", help="verify a generation receipt offline against the log's public key")
    ver.add_argument("receipt", metavar="RECEIPT")
    ver.add_argument("--log-key", required=True, metavar="KEY_FILE", help="the log's verifier key file (e.g. ledger.pub)")
    ver.add_argument("--origin", help="the log origin to expect (default: the key's name)")
    ver.add_argument("--model", help="with --replay: the weights (an HF folder, a .gguf, or smollm2)")
    ver.add_argument("--replay", action="store_true", help="re-run the generation (greedy, or sampled with its seed) and compare its output (same hardware)")
    ver.set_defaults(func=run_verify_command)
    return parser


def _select_triton_backend() -> None:
    import torch

    # Before triton is first imported: without CUDA its interpreter runs the kernels on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run_demo_command(args: argparse.Namespace) -> int:
    """`fieldprint demo`: see fieldprint/demo.py."""
    _select_triton_backend()
    from fieldprint.demo import run_demo

    run_demo(args.data_dir)
    return 0


def run_generate_command(args: argparse.Namespace) -> int:
    """`fieldprint generate PROMPT`: print the answer, write the bound receipt."""
    _select_triton_backend()
    import time

    from fieldprint.engine.engine import Engine
    from fieldprint.engine.receipt import dump_receipt
    from fieldprint.engine.sequence import SamplingParams

    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    with Engine(args.model, data_dir=args.data_dir, database=args.database, tp_size=args.tp_size) as engine:
        if args.session and engine.memory.sessions.get(args.session) is None:  # a later turn goes on in it
            try:
                engine.new_session(args.session)
            except EngineError:
                if engine.memory.sessions.get(args.session) is None:  # not made by another process meanwhile
                    raise
        out = engine.generate(args.prompt, params, session=args.session, anchors=args.anchors)[0]
        receipt = engine.bind(out.receipt)
    path = args.receipt or os.path.join(args.data_dir, "receipts", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_file(path, dump_receipt(receipt), mode=0o644)  # a receipt is for anyone to verify
    if args.json:
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "anchors": out.anchors,
                          "decisions": out.decisions, "receipt": path}, indent=2))
    else:
        print(out.text)
        print(f"receipt: {path}", file=sys.stderr)
    return 0


def run_init_command(args: argparse.Namespace) -> int:
    """`fieldprint init --database URL`: keys in DATA_DIR, the log's and the memory's schema in PostgreSQL."""
    from fieldprint.ledger.keys import ensure_key_pair
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.memory.pg_store import create_memory
    from fieldprint.postgres import redact

    if not args.database.startswith(("postgresql://", "postgres://")):
        raise LogError(f"--database must be a postgresql:// URL, got {args.database!r}")
    os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
    signer, verifier = ensure_key_pair(args.data_dir, LEDGER_KEY_STEM, DEFAULT_ORIGIN)
    ensure_key_pair(args.data_dir, "operator", "fieldprint.local/operator")
    with TransparencyLog.open(args.database, signer, checkpoint_interval_s=None) as log:
        size = log.size
    versions = create_memory(args.database)
    print(f"log {log.origin} at {redact(args.database)}: size {size}; memory schema versions {versions}; "
          f"keys in {args.data_dir} (copy them to every engine's data folder)")
    return 0


def run_verify_command(args: argparse.Namespace) -> int:
    """`fieldprint verify RECEIPT --log-key KEY`: exit 0 if it verifies, 1 naming the first failure."""
    from fieldprint.engine.receipt import verify_receipt
    from fieldprint.errors import ReceiptError

    try:
        with open(args.log_key, encoding="utf-8") as f:
            key = f.read().strip()
        with open(args.receipt, encoding="utf-8") as f:
            receipt = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ReceiptError(f"cannot read the receipt or the key: {e}") from None
    print(verify_receipt(receipt, key, origin=args.origin).summary())
    if args.replay:
        if not args.model:
            raise ReceiptError("--replay needs --model PATH (the weights the receipt names by id)")
        _select_triton_backend()
        from fieldprint.engine.replay import replay_receipt

        report = replay_receipt(receipt, args.model)
        print(report.summary())
        if not report.output_equal:
            return 1
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

MAX_KEY_FILE_BYTES = 4096  # a key is ~100 characters; never read a huge or endless file whole
MAX_BUNDLE_BYTES = 1 << 20
MAX_LINES_INPUT = 64 << 20  # `add --lines` reads at most this much; the library's extend() is the bulk path
ADD_CHUNK = 4096  # entries `add` queues before printing their indices
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def add_ledger_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `fieldprint ledger init|add|checkpoint|prove|consistency|verify|audit`."""
    ledger = subparsers.add_parser("ledger", help="the transparency log: init, add, checkpoint, prove, consistency, verify, audit")
    ledger.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"folder with the log and its keys (default {DEFAULT_DATA_DIR})")
    ledger.set_defaults(group_parser=ledger)
    sub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")

    p = sub.add_parser("init", help="create the data folder, a signing key and an empty log")
    p.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"the log's origin line and key name (default {DEFAULT_ORIGIN})")
    p.set_defaults(func=ledger_init)

    p = sub.add_parser("add", help="add canonical records (docs/formats.md): each FILE is one entry (- or none: standard input)")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--lines", action="store_true", help="add every non-blank line of the input as its own entry (blank lines are skipped)")
    p.add_argument("--raw", action="store_true", help="log any bytes as they are (1 to 65536 each), not only canonical records")
    p.set_defaults(func=ledger_add)

    p = sub.add_parser("checkpoint", help="sign and print a checkpoint of the current tree")
    p.set_defaults(func=ledger_checkpoint)

    p = sub.add_parser("prove", help="print an inclusion proof bundle (JSON) for an entry (needs only ledger.pub)")
    p.add_argument("index", type=int)
    p.add_argument("-o", "--output", help="write the bundle to this file instead of standard output")
    p.set_defaults(func=ledger_prove)

    p = sub.add_parser("consistency", help="print a consistency proof bundle (JSON) between two signed tree sizes (needs only ledger.pub)")
    p.add_argument("size1", type=int, metavar="SIZE1")
    p.add_argument("size2", type=int, metavar="SIZE2")
    p.add_argument("-o", "--output", help="write the bundle to this file instead of standard output")
    p.set_defaults(func=ledger_consistency)

    p = sub.add_parser("verify", help="check an inclusion or consistency bundle offline against a verifier key")
    p.add_argument("bundle", help="bundle file (- for standard input)")
    p.add_argument("--key", help="verifier key text 'name+keyid+base64' (default: the data folder's ledger.pub)")
    p.add_argument("--origin", help="the log the checkpoints must name (default: the verifier key's name, a C2SP log's origin)")
    p.set_defaults(func=ledger_verify)

    p = sub.add_parser("audit", help="re-verify every leaf, node and checkpoint of the stored log (needs only ledger.pub)")
    p.add_argument("--against", metavar="CHECKPOINT_FILE", help="also check that the log extends this signed checkpoint saved elsewhere")
    p.set_defaults(func=ledger_audit)


def _paths(args: argparse.Namespace) -> tuple[str, str, str]:
    d = args.data_dir
    return os.path.join(d, LEDGER_DB), os.path.join(d, SIGNER_KEY_FILE), os.path.join(d, VERIFIER_KEY_FILE)


def _read_text_file(path: str, what: str, limit: int) -> str:
    """The UTF-8 text of a small file, with a FieldprintError naming the file for every way it can fail."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except IsADirectoryError:
        raise LogError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise LogError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise LogError(f"{what} {path} is over {limit} bytes; it is not a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError(f"{what} {path} is not UTF-8 text; it is not a {what}") from None


def _no_ledger(args: argparse.Namespace) -> LogError:
    return LogError(f"no ledger in {args.data_dir}; run `fieldprint ledger --data-dir {args.data_dir} init` first")


def _open_log(args: argparse.Namespace):
    """The data folder's log opened for writing with its signing key; it must already exist."""
    from fieldprint.ledger.log import TransparencyLog

    db, key_file, _ = _paths(args)
    if os.path.exists(db) and not os.path.exists(key_file):
        raise LogError(f"{args.data_dir} holds a log database but no {SIGNER_KEY_FILE}; restore the key, or, if the "
                       f"log holds nothing you need, remove {db} and {db}.checkpoint and run init again")
    if not os.path.exists(key_file):
        raise _no_ledger(args)
    signer = _read_text_file(key_file, "signing key file", MAX_KEY_FILE_BYTES).strip()
    return TransparencyLog.open(db, signer, checkpoint_interval_s=None, create=False)


def _verifier_key(args: argparse.Namespace) -> str:
    key = getattr(args, "key", None)
    if key is not None:
        return key
    pub_file = _paths(args)[2]
    if not os.path.exists(pub_file):
        raise LogError(f"no verifier key given and {pub_file} does not exist; pass --key 'name+keyid+base64'")
    return _read_text_file(pub_file, "verifier key file", MAX_KEY_FILE_BYTES).strip()


def _open_reader(args: argparse.Namespace):
    """The data folder's log opened read-only with ledger.pub: works on a read-only folder and beside a writer."""
    from fieldprint.ledger.reader import LogReader

    db, _, pub_file = _paths(args)
    if not os.path.exists(pub_file):
        raise _no_ledger(args)
    return LogReader.open(db, _verifier_key(args))


def ledger_init(args: argparse.Namespace) -> int:
    """Create the data folder, an Ed25519 signing key (mode 0600) and an empty log with a checkpoint.

    Exclusive and atomic: it holds a lock on the data folder, builds the log under a temporary name,
    then renames the database, its checkpoint file and the key files into place. A second init of
    the same folder stops without touching anything; a failed init removes what it wrote.
    """
    import fcntl

    from fieldprint.ledger.note import generate_key

    generate_key(args.origin)  # NoteError on a bad origin, before any file exists
    created_dir = not os.path.isdir(args.data_dir)
    try:
        os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
        folder_fd = os.open(args.data_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise LogError(f"cannot create the data folder {args.data_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogError(f"another `fieldprint ledger init` is creating a ledger in {args.data_dir} right now; "
                           f"this one stopped and left its files alone") from None
        verifier = _init_locked(args, created_dir)
    finally:
        os.close(folder_fd)  # releases the lock
    print(f"initialized ledger {args.origin} in {args.data_dir}")
    print(f"verifier key: {verifier}")
    return 0


def _init_locked(args: argparse.Namespace, created_dir: bool) -> str:
    """ledger_init's work, under the data folder's lock: nothing else creates these files meanwhile."""
    from fieldprint.ledger.keys import ensure_key_pair
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.published import published_path

    db, key_file, pub_file = _paths(args)
    published = published_path(db)
    if os.path.exists(db) and not os.path.exists(key_file):
        raise LogError(f"{args.data_dir} holds a log database but no {SIGNER_KEY_FILE} (an interrupted init?); "
                       f"if it holds nothing you need, remove {db} and {published} and run init again")
    if any(os.path.exists(p) for p in (key_file, pub_file, db, published)):
        raise LogError(f"{args.data_dir} already holds a ledger; use another --data-dir or remove it")
    tmp_db = os.path.join(args.data_dir, f".{LEDGER_DB}.init-{os.getpid()}")
    moved: list[str] = []

    def create_log(signer: str, verifier: str) -> None:
        with TransparencyLog.open(tmp_db, signer, checkpoint_interval_s=None) as log:
            log.checkpoint()
        if os.path.exists(tmp_db + "-wal"):  # closing folds the WAL into the file; never rename half a log
            raise LogError(f"the new log {tmp_db} kept a write-ahead log after closing; nothing was kept")
        for tmp, final in ((tmp_db, db), (published_path(tmp_db), published)):
            os.replace(tmp, final)
            moved.append(final)

    try:
        _, verifier = ensure_key_pair(args.data_dir, LEDGER_KEY_STEM, args.origin, before_publish=create_log)
    except BaseException:
        for path in moved + [tmp_db + suffix for suffix in ("", "-wal", "-shm", "-journal", ".checkpoint")]:
            _remove_if_present(path)
        if created_dir:
            try:
                os.rmdir(args.data_dir)
            except OSError:
                pass  # something else was put there meanwhile: leave it
        raise
    finally:
        _remove_if_present(tmp_db + ".lock")
    return verifier


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _check_entry(data: bytes, where: str, raw: bool) -> bytes:
    """Refuse what is not a leaf entry (or, with --raw, not 1..MAX bytes), naming where it came from."""
    from fieldprint.ledger.entry import MAX_ENTRY_BYTES, decode_entry

    if not data:
        raise EntryError(f"{where}: an empty entry is nothing to log")
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"{where}: a log entry is at most {MAX_ENTRY_BYTES} bytes; log a digest of large content instead")
    if not raw:
        try:
            decode_entry(data)
        except EntryError as exc:
            raise EntryError(f"{where}: {exc}; an entry is a canonical version-1 record (docs/formats.md, "
                             f"'Leaf entries'); pass --raw to log other bytes as they are") from None
    return data


def _read_source(name: str, limit: int) -> bytes:
    """At most limit + 1 bytes of a file or standard input (a 2 GB input is refused, never loaded)."""
    if name == "-":
        return sys.stdin.buffer.read(limit + 1)
    try:
        with open(name, "rb") as f:
            return f.read(limit + 1)
    except IsADirectoryError:
        raise LogError(f"cannot read entry file {name}: it is a folder") from None
    except OSError as exc:
        raise LogError(f"cannot read entry file {name}: {exc.strerror or exc}") from None


def _read_entries(files: list[str], lines: bool, raw: bool) -> list[bytes]:
    """Every entry the command adds, all checked before anything is written."""
    from fieldprint.ledger.entry import MAX_ENTRY_BYTES

    out: list[bytes] = []
    blank = 0
    for name in files or ["-"]:
        label = "standard input" if name == "-" else name
        if not lines:
            out.append(_check_entry(_read_source(name, MAX_ENTRY_BYTES), label, raw))
            continue
        data = _read_source(name, MAX_LINES_INPUT)
        if len(data) > MAX_LINES_INPUT:
            raise EntryError(f"{label}: `add --lines` reads at most {MAX_LINES_INPUT} bytes; split the input. Nothing was added")
        for n, line in enumerate(data.splitlines(), 1):
            if line.strip():
                out.append(_check_entry(line, f"{label} line {n}", raw))
            else:
                blank += 1  # a blank line is a separator, not an entry
    if blank:
        print(f"skipped {blank} blank lines", file=sys.stderr)
    return out


def ledger_add(args: argparse.Namespace) -> int:
    """Add entries and print one 'index<TAB>leaf hash' line per entry once durable, then sign a checkpoint.

    Interrupted (Ctrl-C) or with standard output closed, it stops adding, lets the log sequence what
    it had queued, and says exactly which entries are in the log; it exits non-zero.
    """
    import signal

    from fieldprint.ledger.merkle import leaf_hash

    log = None
    try:
        log = _open_log(args)
        entries = _read_entries(args.files, args.lines, args.raw)
    except BaseException as exc:
        if log is not None:
            log.close()
        if not isinstance(exc, KeyboardInterrupt):
            raise
        print("fieldprint: interrupted before anything was added; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    start, printed, stopped = log.size, 0, None
    try:
        try:
            for lo in range(0, len(entries), ADD_CHUNK):  # bounded: an interrupt stops within a chunk
                chunk = entries[lo : lo + ADD_CHUNK]
                futures = [log.add(e) for e in chunk]
                for e, fut in zip(chunk, futures):
                    print(f"{fut.result()}\t{leaf_hash(e).hex()}")
                    printed += 1
            sys.stdout.flush()
        except (KeyboardInterrupt, BrokenPipeError) as exc:
            stopped = exc
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report short
            if isinstance(exc, BrokenPipeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        log.flush()  # everything queued is sequenced: one producer, so in input order from `start`
        added = log.size - start
        if added:
            log.checkpoint()  # publish what was added, so that `prove` finds a covering checkpoint
    finally:
        log.close()
    if stopped is None:
        return 0
    why = "interrupted" if isinstance(stopped, KeyboardInterrupt) else "standard output was closed"
    done = (f"the first {added} of {len(entries)} entries are in the log at indices {start}..{start + added - 1}"
            if added else f"none of the {len(entries)} entries was added")
    print(f"fieldprint: {why}: {done}; the other {len(entries) - added} were not added "
          f"({printed} index lines were printed)", file=sys.stderr)
    return EXIT_INTERRUPTED if isinstance(stopped, KeyboardInterrupt) else 1


def ledger_checkpoint(args: argparse.Namespace) -> int:
    """Sign a checkpoint of the current tree and print the signed note."""
    with _open_log(args) as log:
        sys.stdout.write(log.checkpoint().note)
    return 0


def ledger_prove(args: argparse.Namespace) -> int:
    """Print an inclusion proof bundle for entry `index` against the latest covering checkpoint."""
    from fieldprint.ledger.bundle import inclusion_bundle

    with _open_reader(args) as log:
        bundle = inclusion_bundle(log, args.index)
    _emit(args.output, json.dumps(bundle, indent=2) + "\n")
    return 0


def ledger_consistency(args: argparse.Namespace) -> int:
    """Print a consistency proof bundle between the log's signed checkpoints for SIZE1 and SIZE2."""
    from fieldprint.ledger.bundle import consistency_bundle

    with _open_reader(args) as log:
        bundle = consistency_bundle(log, args.size1, args.size2)
    _emit(args.output, json.dumps(bundle, indent=2) + "\n")
    return 0


def _emit(path: str | None, text: str) -> None:
    """Write `text` to standard output, or to `path`, whole (on failure the old file stays as it was: LogError)."""
    if path is None:
        sys.stdout.write(text)
        return
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a pipe or a device (/dev/stdout): written as it is
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            replace_file(path, text, mode=0o644, durable=False)
    except OSError as exc:
        raise LogError(f"cannot write the bundle to {path}: {exc.strerror or exc}; choose another -o path") from None


def _read_bundle(name: str) -> dict:
    try:
        raw = sys.stdin.buffer.read(MAX_BUNDLE_BYTES + 1) if name == "-" else None
        if raw is None:
            with open(name, "rb") as f:
                raw = f.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise ProofError(f"cannot read bundle {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise ProofError(f"bundle {name} is over {MAX_BUNDLE_BYTES} bytes; pass the JSON file `ledger prove` wrote")
    try:
        bundle = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProofError(f"bundle {name} is not UTF-8 text; pass the JSON file `ledger prove` wrote") from None
    except json.JSONDecodeError as exc:
        raise ProofError(f"bundle {name} is not JSON: {exc}") from None
    if not isinstance(bundle, dict):
        raise ProofError("a proof bundle is a JSON object")
    return bundle


def ledger_verify(args: argparse.Namespace) -> int:
    """Verify an inclusion or consistency bundle offline; exit 0 and say what was proven, or 1 and why."""
    from fieldprint.ledger.bundle import (
        CONSISTENCY_FORMAT,
        verify_bundle,
        verify_consistency_bundle,
    )

    key = _verifier_key(args)
    bundle = _read_bundle(args.bundle)
    if bundle.get("format") == CONSISTENCY_FORMAT:
        cp1, cp2 = verify_consistency_bundle(bundle, key, origin=args.origin)
        print(f"OK: {cp2.origin} at size {cp2.size} (root {cp2.root_hash.hex()}) extends its tree at size "
              f"{cp1.size} (root {cp1.root_hash.hex()})")
        return 0
    cp = verify_bundle(bundle, key, origin=args.origin)
    print(f"OK: entry {bundle['index']} is included in {cp.origin} at size {cp.size} (root {cp.root_hash.hex()})")
    return 0


def ledger_audit(args: argparse.Namespace) -> int:
    """Re-verify the whole stored log in one snapshot (beside a writer, on a read-only folder); exit 1 on problems."""
    from fieldprint.ledger.note import Checkpoint

    against = []
    with _open_reader(args) as log:
        if args.against:
            note = _read_text_file(args.against, "checkpoint file", MAX_BUNDLE_BYTES)
            against.append(Checkpoint.open(note, [log.verifier_key], origin=log.origin))
        report = log.audit(against)
    print(
        f"audited {report.leaves_checked} leaves, {report.nodes_checked} nodes, "
        f"{report.checkpoints_checked} checkpoints of a log of size {report.size}: "
        + ("OK" if report.ok else f"{len(report.problems)} problems")
    )
    for p in report.problems:
        print(f"  {p}")
    return 0 if report.ok else 1
