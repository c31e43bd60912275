"""Real components wired together for memory tests: SQLite log and state store, LanceDB, the gate."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.note import generate_key
from fieldprint.memory.embed import HashingEmbedderForTests
from fieldprint.memory.pacemaker import Pacemaker
from fieldprint.memory.policy import GateConfig, PromotionGate
from fieldprint.memory.store import SQLiteStateStore
from fieldprint.memory.vectors import LanceVectorStore

LOG_SIGNER, LOG_VERIFIER = generate_key("log.fieldprint.test")
OPS_SIGNER, OPS_VERIFIER = generate_key("ops.fieldprint.test")
# Same key name as the configured override key, different key: what a forger would try first.
ROGUE_SIGNER, ROGUE_VERIFIER = generate_key("ops.fieldprint.test")
T0 = 1_800_000_000 * 10**9


class Clock:
    """A settable clock (Unix ns) so expiry is tested without sleeping."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclass
class Memory:
    log: TransparencyLog
    store: SQLiteStateStore
    vectors: LanceVectorStore
    gate: PromotionGate
    pm: Pacemaker
    clock: Clock
    root: str

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "log.db")

    def snapshot(self) -> tuple:
        """Everything a failed operation must leave unchanged."""
        self.log.flush()
        return (self.log.size, len(self.store), self.store.record_count(), len(self.vectors), self.vectors.version())

    def sign(self) -> None:
        """Have the log sign a checkpoint of everything appended so far (the gate only reads checkpoints)."""
        self.log.flush()
        self.log.checkpoint()

    def close(self) -> None:
        self.log.close()
        self.store.close()


def make_memory(root: str, clock: Clock | None = None, override_keys: list[str] | None = None, embedder=None) -> Memory:
    """Open a fresh log, state store and vector store under `root` and wire the Pacemaker."""
    clock = clock or Clock()
    log = TransparencyLog.open(os.path.join(root, "log.db"), LOG_SIGNER, batch_wait_ms=0, checkpoint_interval_s=None,
                               durability="normal")
    store = SQLiteStateStore(os.path.join(root, "states.db"))
    vectors = LanceVectorStore(os.path.join(root, "vectors"))
    keys = [OPS_VERIFIER] if override_keys is None else override_keys
    gate = PromotionGate(store, log, GateConfig(log_keys=[LOG_VERIFIER], override_keys=keys), clock=clock)
    pm = Pacemaker(store, log, vectors, embedder or HashingEmbedderForTests(), gate)
    return Memory(log, store, vectors, gate, pm, clock, root)


def run_on_read_only_folder(folder: str, code: str) -> str:
    """Run `code` in a fresh Python process that sees `folder` read-only; return its stdout.

    As root, permissions do not stop writes, so the folder is bind-mounted read-only in a private
    mount namespace (unshare); otherwise its write permission bits are removed while the child runs.
    """
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if os.geteuid() != 0:
        modes = {}
        for root, _dirs, files in os.walk(folder):
            for path in [root, *(os.path.join(root, f) for f in files)]:
                modes[path] = os.stat(path).st_mode
                os.chmod(path, modes[path] & ~0o222)
        try:
            out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
        finally:
            for path, mode in modes.items():
                os.chmod(path, mode)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        script = (f"mount --bind {shlex.quote(folder)} {shlex.quote(folder)} && "
                  f"mount -o remount,bind,ro {shlex.quote(folder)} && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}")
        out = subprocess.run(["unshare", "-rm", "sh", "-c", script], check=False, capture_output=True, text=True, env=env,
                             timeout=120)
        if out.returncode != 0 and "mount" in out.stderr and "Traceback" not in out.stderr:
            pytest.skip(f"cannot make a read-only mount here: {out.stderr.strip()}")
    if out.returncode != 0:
        raise AssertionError(f"the read-only child failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout
