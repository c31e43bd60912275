"""Merkle hashing and proofs: the transparency-dev/merkle vectors, RFC 9162 references, properties."""

import base64
import glob
import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldprint.errors import ProofError
from fieldprint.ledger import merkle
from fieldprint.ledger.merkle import (
    EMPTY_ROOT,
    append_leaf,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)


def _b(v):
    return base64.b64decode(v) if v is not None else None


def _proof(v):
    return [_b(p) for p in (v or [])]


def _vectors(testdata_dir, kind):
    files = sorted(glob.glob(os.path.join(testdata_dir, "merkle", kind, "*", "*.json")))
    assert len(files) > 20, f"expected the published {kind} vectors under {testdata_dir}"
    return [(f, json.load(open(f))) for f in files]


def _check_vectors(testdata_dir, kind, verify, make_args):
    """Run every vector of one kind: happy paths must verify, every mutation must raise ProofError."""
    outcome = {False: 0, True: 0}
    for _path, v in _vectors(testdata_dir, kind):
        if v["wantErr"]:
            with pytest.raises(ProofError):
                verify(*make_args(v))
        else:
            verify(*make_args(v))
        outcome[v["wantErr"]] += 1
    assert outcome[False] >= 5 and outcome[True] >= 50


def test_inclusion_vectors(testdata_dir):
    _check_vectors(testdata_dir, "inclusion", verify_inclusion,
                   lambda v: (_b(v["leafHash"]), v["leafIdx"], v["treeSize"], _proof(v["proof"]), _b(v["root"])))


def test_consistency_vectors(testdata_dir):
    _check_vectors(testdata_dir, "consistency", verify_consistency,
                   lambda v: (v["size1"], v["size2"], _proof(v["proof"]), _b(v["root1"]), _b(v["root2"])))


def _mth(leaves):
    """RFC 9162 2.1.1 MTH, written recursively as the RFC states it (the independent reference)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _path(m, leaves):
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return _path(m, leaves[:k]) + [_mth(leaves[k:])]
    return _path(m - k, leaves[k:]) + [_mth(leaves[:k])]


def _subproof(m, leaves, b):
    n = len(leaves)
    if m == n:
        return [] if b else [_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return _subproof(m, leaves[:k], b) + [_mth(leaves[k:])]
    return _subproof(m - k, leaves[k:], False) + [_mth(leaves[:k])]


class Tree:
    """An in-memory store of complete nodes, filled by the same append path the log uses."""

    def __init__(self, leaves):
        self.leaves, self.nodes, border, emitted = leaves, {}, [], []
        for i, d in enumerate(leaves):
            append_leaf(border, i, leaf_hash(d), emitted)
        self.nodes = {(lvl, idx): h for lvl, idx, h in emitted}
        self.root = merkle.border_root(border)

    def get(self, ids):
        return [self.nodes[i] for i in ids]


def test_empty_tree_root():
    assert root_hash([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_rfc_reference_all_small_trees():
    leaves = [bytes([i]) * (i % 5) for i in range(40)]
    for n in range(1, 41):
        t = Tree(leaves[:n])
        assert t.root == _mth(leaves[:n]) == root_hash([leaf_hash(d) for d in leaves[:n]])
        for m in range(n):
            p = merkle.inclusion_proof(m, n, t.get)
            assert p == _path(m, leaves[:n])
            verify_inclusion(leaf_hash(leaves[m]), m, n, p, t.root)
        for m in range(1, n + 1):
            p = merkle.consistency_proof(m, n, t.get)
            assert p == (_subproof(m, leaves[:n], True) if m < n else [])
            verify_consistency(m, n, p, _mth(leaves[:m]), t.root)


def test_consistency_from_size_zero_policy():
    root = _mth([b"a", b"b"])
    verify_consistency(0, 2, [], EMPTY_ROOT, root)
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError, match="empty proof from size 0"):
        verify_consistency(0, 2, [root], EMPTY_ROOT, root)
    with pytest.raises(ProofError, match="size 0 must be"):
        verify_consistency(0, 2, [], root, root)
    assert merkle.consistency_proof(0, 5, lambda ids: []) == []


def test_malformed_inputs_are_named():
    h = leaf_hash(b"x")
    with pytest.raises(ProofError, match="leaf hash must be 32 bytes"):
        verify_inclusion(b"short", 0, 1, [], h)
    with pytest.raises(ProofError, match="index is beyond size"):
        verify_inclusion(h, 1, 1, [], h)
    with pytest.raises(ProofError, match="non-negative integer"):
        verify_inclusion(h, -1, 1, [], h)
    with pytest.raises(ProofError, match="proof must be a list"):
        verify_inclusion(h, 0, 1, "abc", h)
    with pytest.raises(ProofError, match=r"proof\[0\] must be 32 bytes"):
        verify_consistency(1, 2, [b"x"], h, h)
    with pytest.raises(ProofError, match="size2 .* < size1"):
        verify_consistency(3, 2, [], h, h)
    with pytest.raises(ProofError, match="outside a tree"):
        merkle.inclusion_plan(5, 5)


def _flip(proof, i, bit):
    p = list(proof)
    b = bytearray(p[i])
    b[bit // 8] ^= 1 << (bit % 8)
    p[i] = bytes(b)
    return p


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_property_inclusion_and_mutations(n, data):
    leaves = [i.to_bytes(4, "big") for i in range(n)]
    t = Tree(leaves)
    m = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(m, n, t.get)
    lh = leaf_hash(leaves[m])
    verify_inclusion(lh, m, n, proof, t.root)
    mutants = []
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        mutants.append((lh, m, n, _flip(proof, i, data.draw(st.integers(0, 255))), t.root))
        mutants.append((lh, m, n, proof[:-1], t.root))
    mutants.append((lh, m, n, proof + [lh], t.root))
    mutants.append((leaf_hash(leaves[m] + b"!"), m, n, proof, t.root))
    mutants.append((lh, m, n, proof, _flip([t.root], 0, 7)[0]))
    other = data.draw(st.integers(0, n - 1))
    if other != m:
        mutants.append((lh, other, n, proof, t.root))
    # Sizes: a proof does not always pin the size exactly (index 0 of sizes 5 and 6 chain alike),
    # so only the size changes the published vectors make are mutations here.
    mutants += [(lh, m, 2 * n, proof, t.root), (lh, m, m, proof, t.root)]
    for args in mutants:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 300), data=st.data())
def test_property_consistency_and_mutations(n, data):
    leaves = [i.to_bytes(4, "big") + b"c" for i in range(n)]
    t = Tree(leaves)
    m = data.draw(st.integers(1, n - 1))
    r1 = root_hash([leaf_hash(d) for d in leaves[:m]])
    proof = merkle.consistency_proof(m, n, t.get)
    verify_consistency(m, n, proof, r1, t.root)
    i = data.draw(st.integers(0, len(proof) - 1))
    mutants = [
        (m, n, _flip(proof, i, data.draw(st.integers(0, 255))), r1, t.root),
        (m, n, proof[:-1], r1, t.root),
        (m, n, proof + [r1], r1, t.root),
        (m, n, proof, t.root, r1),
        (m, n, proof, _flip([r1], 0, 0)[0], t.root),
        (m, n, proof, r1, _flip([t.root], 0, 0)[0]),
    ]
    other = data.draw(st.integers(1, n - 1))
    if other != m:
        mutants.append((other, n, proof, r1, t.root))
    for args in mutants:
        with pytest.raises(ProofError):
            verify_consistency(*args)


def test_every_proof_element_is_checked_not_only_up_to_a_bytearray():
    # A bytearray of the right size used to end the element check: the str after it reached hashing
    # and raised TypeError. Every element is checked, and bytearrays are still accepted.
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(3)]
    root = merkle.root_hash(leaves)
    good = merkle.inclusion_proof(0, 3, lambda ids: [merkle.root_hash(leaves[i << lvl:(i + 1) << lvl]) for lvl, i in ids])
    with pytest.raises(ProofError, match=r"proof\[1\] must be 32 bytes, got str"):
        merkle.verify_inclusion(leaves[0], 0, 3, [bytearray(32), "a" * 32], root)
    with pytest.raises(ProofError, match=r"proof\[2\] must be 32 bytes, got 31"):
        merkle.verify_inclusion(leaves[0], 0, 3, [bytearray(good[0]), good[1], bytes(31)], root)
    with pytest.raises(ProofError, match=r"proof\[1\] must be 32 bytes, got NoneType"):
        merkle.verify_consistency(1, 3, [bytearray(32), None], leaves[0], root)
    merkle.verify_inclusion(leaves[0], 0, 3, [bytearray(h) for h in good], root)


def test_fold_plan_refuses_a_short_node_list():
    # Was an assert (gone under python -O): a storage returning too few nodes must not fold silently.
    with pytest.raises(ProofError, match="returned 1 node hashes for 2 node ids"):
        merkle.inclusion_proof(0, 3, lambda ids: [bytes(32)])
