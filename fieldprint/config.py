"""The data folder's layout: one place the library, the CLI, the demo and the engine read it from."""

from __future__ import annotations

DEFAULT_DATA_DIR = "./fieldprint-data"
DEFAULT_ORIGIN = "fieldprint.local/ledger"
LEDGER_DB = "ledger.sqlite"
LEDGER_KEY_STEM = "ledger"
SIGNER_KEY_FILE, VERIFIER_KEY_FILE = LEDGER_KEY_STEM + ".key", LEDGER_KEY_STEM + ".pub"
