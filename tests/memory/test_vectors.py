"""The vector store (LanceDB embedded) and the embedders, including the real MiniLM-L6 model."""

import numpy as np
import pytest

from fieldprint.errors import StateError
from fieldprint.memory.embed import Embedder, HashingEmbedderForTests, MiniLMEmbedder
from fieldprint.memory.vectors import LanceVectorStore, VectorStore


def sid(i: int) -> str:
    return f"blake3:{i:064x}"


def unit_rows(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path) -> LanceVectorStore:
    return LanceVectorStore(tmp_path / "vectors")


def test_lance_store_implements_the_interface(store):
    assert isinstance(store, VectorStore)
    assert isinstance(HashingEmbedderForTests(), Embedder) and isinstance(MiniLMEmbedder(), Embedder)


def test_search_finds_the_nearest_rows_with_filters(store):
    v = unit_rows(40)
    sessions = ["a" if i % 2 else "b" for i in range(40)]
    types = ["belief" if i % 3 else "summary" for i in range(40)]
    store.add([sid(i) for i in range(40)], v, sessions, types, [i < 10 for i in range(40)])
    hits = store.search(v[7], 3)
    assert hits[0].state_id == sid(7) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Exact cosine ranking agrees with numpy's.
    expected = np.argsort(-(v @ v[7]))[:5]
    assert [h.state_id for h in store.search(v[7], 5, exact=True)] == [sid(i) for i in expected]
    assert all(h.session == "b" for h in store.search(v[7], 10, session="b"))
    assert store.search(v[7], 10, session="b")[0].state_id != sid(7)  # row 7 is in session a
    assert all(h.state_type == "summary" for h in store.search(v[7], 10, state_type="summary"))
    prom = store.search(v[7], 40, promotable_only=True)
    assert {h.state_id for h in prom} == {sid(i) for i in range(10)}
    assert store.search(v[7], 5, session="nobody") == []


def test_versions_and_rollback(store):
    v = unit_rows(6)
    v0 = store.version()
    v1 = store.add([sid(i) for i in range(3)], v[:3], ["s"] * 3, ["belief"] * 3, [False] * 3)
    v2 = store.add([sid(i) for i in range(3, 6)], v[3:], ["s"] * 3, ["belief"] * 3, [False] * 3)
    v3 = store.set_promotable([sid(1)], True)
    assert v0 < v1 < v2 < v3 and len(store) == 6
    assert [h.state_id for h in store.search(v[1], 5, promotable_only=True)] == [sid(1)]
    store.rollback(v1)
    assert len(store) == 3 and store.search(v[1], 5, promotable_only=True) == []
    assert store.version() > v3  # a rollback is itself a new version: history is kept
    store.rollback(v3)
    assert len(store) == 6
    with pytest.raises(StateError, match="no version"):
        store.rollback(10_000)
    reopened = LanceVectorStore(store.path)
    assert len(reopened) == 6 and reopened.version() == store.version()


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(vectors=a["vectors"][:, :10]), "shape"),
    (lambda a: a.update(vectors=a["vectors"] * 2), "unit-norm"),
    (lambda a: a.update(vectors=np.full_like(a["vectors"], np.nan)), "NaN"),
    (lambda a: a.update(state_ids=[sid(1), sid(1)]), "unique"),
    (lambda a: a.update(state_ids=["x", sid(2)]), "digest"),
    (lambda a: a.update(sessions=["ok", "not ok"]), "session"),
    (lambda a: a.update(promotable=[True]), "disagree"),
    (lambda a: a.update(state_ids=sid(1)[:2]), "not one string"),
    (lambda a: a.update(sessions="ss"), "not one string"),
])
def test_bad_rows_are_refused_and_nothing_is_stored(store, mutate, match):
    args = {"state_ids": [sid(1), sid(2)], "vectors": unit_rows(2), "sessions": ["s", "s"], "state_types": ["belief"] * 2,
                "promotable": [True, True]}
    mutate(args)
    before = store.version()
    with pytest.raises(StateError, match=match):
        store.add(**args)
    assert store.version() == before and len(store) == 0
    with pytest.raises(StateError):
        store.search(np.zeros(10, dtype=np.float32), 3)
    with pytest.raises(StateError, match="session"):
        store.search(unit_rows(1)[0], 3, session="a' OR '1'='1")
    with pytest.raises(StateError, match="not one string"):
        store.set_promotable(sid(1), False)


def test_ann_index_search_agrees_with_exact_search(store):
    v = unit_rows(2000, seed=3)
    store.add([sid(i) for i in range(2000)], v, ["s"] * 2000, ["belief"] * 2000, [True] * 2000)
    store.build_index(num_partitions=8, num_sub_vectors=48)
    hits = store.search(v[123], 1)
    assert hits[0].state_id == sid(123)


def test_hashing_test_embedder_is_deterministic_and_unit_norm():
    e = HashingEmbedderForTests()
    a = e.embed(["the cat sat", "", "the cat sat"])
    assert a.shape == (3, 384) and np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert np.array_equal(a[0], a[2])
    with pytest.raises(StateError, match="single str"):
        e.embed("not a list")


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()  # loading takes seconds: one instance for the module


@pytest.mark.slow
def test_minilm_embedder_is_real_and_offline(minilm):
    e = minilm
    texts = ["The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window.",
             "Quarterly revenue rose by twelve percent."]
    v = e.embed(texts)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    # Meaning, not words: the two cat sentences share almost no words yet are far closer to each other.
    assert sims[0, 1] > 0.5 and sims[0, 1] > sims[0, 2] + 0.3
    assert e.embed([]).shape == (0, 384)


def test_compact_keeps_rows_results_and_rollback_history(store):
    v = unit_rows(30)
    versions = [store.add([sid(i)], v[i:i + 1], ["s"], ["belief"], [True]) for i in range(30)]
    before = [h.state_id for h in store.search(v[3], 5, exact=True)]
    store.compact()
    assert len(store) == 30 and [h.state_id for h in store.search(v[3], 5, exact=True)] == before
    store.rollback(versions[9])
    assert len(store) == 10


@pytest.mark.slow
def test_pacemaker_retrieves_by_meaning_with_minilm(tmp_path, minilm):
    from memory_harness import make_memory

    m = make_memory(str(tmp_path), embedder=minilm)
    try:
        texts = ["The cat sleeps on the warm windowsill.", "Quarterly revenue rose by twelve percent.",
                 "Deploy the service on Friday evening."]
        for i, text in enumerate(texts):
            m.pm.add("user_input", session="s-1", creator="agent", text=text, sources=["user:alice"], time_ns=1 + i)
        m.sign()
        hits = m.pm.search("a kitten napping by the window", 2, session="s-1", anchors_only=True)
        assert hits[0].state.text == texts[0] and hits[0].score > hits[1].score
    finally:
        m.close()
