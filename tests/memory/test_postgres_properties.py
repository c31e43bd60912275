"""The property machine of test_properties.py, with the state store and the vector index on PostgreSQL.

The same rules, model and invariants (anchors match the model after every step; refused operations
change nothing; deciding never writes to the log); each run opens a fresh schema, and the tamper
rule rewrites rows through PostgreSQL.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis.stateful import RuleBasedStateMachine
from pg import pg_dsn  # noqa: F401,I001  (a fresh database per module)
from test_postgres_memory import Schemas, make_pg_memory, require_pgvector
from test_properties import GateMachine, Model

_database: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def database(pg_dsn):  # noqa: F811
    _database["url"] = require_pgvector(pg_dsn)
    yield
    _database.clear()


class PostgresGateMachine(GateMachine):
    """GateMachine over PostgresStateStore and PgVectorStore, one schema per run."""

    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.dir = tempfile.mkdtemp(prefix="fp-memory-pg-prop-")
        self.schemas = Schemas(_database["url"])
        self.m = make_pg_memory(self.schemas.url, self.schemas.new(), self.dir)
        self.model = Model()

    def teardown(self) -> None:
        self.m.close()
        self.schemas.drop_all()
        shutil.rmtree(self.dir, ignore_errors=True)


PostgresGateMachine.TestCase.settings = GateMachine.TestCase.settings
test_gate_machine_on_postgres = pytest.mark.slow(PostgresGateMachine.TestCase)
