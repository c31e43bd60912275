"""RFC 9162 Merkle tree hashing and proofs as small pure functions.

Nodes are named by (level, index): the complete subtree of 2**level leaves starting at leaf
index * 2**level. Only complete subtrees are ever stored; a subtree that is not complete in a
tree of some size (an "ephemeral" node) is re-hashed from the complete subtrees covering it.
Proof generation therefore returns a *plan* (which stored nodes, and how to fold them), fetches
them in one call, and folds: O(log n) reads, never a pass over the leaves.

Verification follows transparency-dev/merkle (proof/verify.go) step for step, with one named
error per failure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from fieldprint.canon import is_int
from fieldprint.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeId = tuple[int, int]  # (level, index)
GetNodes = Callable[[list[NodeId]], list[bytes]]


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """Reference MTH over leaf hashes (SHA-256 of the empty string for an empty tree)."""
    border: list[bytes] = []
    for size, h in enumerate(leaf_hashes):
        append_leaf(border, size, h, None)
    return border_root(border)


# --- compact range: the right border of a tree, one hash per set bit of its size ---------------


def append_leaf(border: list[bytes], size: int, leaf: bytes, emit: list[tuple[int, int, bytes]] | None) -> None:
    """Append leaf number `size` to a compact range; record every completed node in `emit`."""
    h, level, index = leaf, 0, size
    if emit is not None:
        emit.append((0, index, h))
    while index & 1:  # each trailing one bit of the index closes a complete subtree
        h = node_hash(border.pop(), h)
        level, index = level + 1, index >> 1
        if emit is not None:
            emit.append((level, index, h))
    border.append(h)


def border_root(border: Sequence[bytes]) -> bytes:
    """Root hash of a tree given its compact range (highest subtree first)."""
    if not border:
        return EMPTY_ROOT
    h = border[-1]
    for left in reversed(border[:-1]):
        h = node_hash(left, h)
    return h


def border_ids(size: int) -> list[NodeId]:
    """The complete subtrees forming the compact range of a tree of `size` leaves, highest first."""
    return range_nodes(0, size)


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The fewest complete subtrees covering leaves [begin, end), left to right."""
    out: list[NodeId] = []
    while begin < end:
        level = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << level) > end:
            level -= 1
        out.append((level, begin >> level))
        begin += 1 << level
    return out


# --- proof plans: each proof element is a list of complete nodes folded right to left ----------


def _largest_pow2_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_plan(index: int, size: int) -> list[list[NodeId]]:
    """Nodes of PATH(index, D[0:size]) (RFC 9162 2.1.3.1), each element as nodes to fold."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}; ask for 0 <= index < size")
    out: list[list[NodeId]] = []
    begin, end = 0, size
    while end - begin > 1:
        k = _largest_pow2_below(end - begin)
        if index < begin + k:
            out.append(range_nodes(begin + k, end))
            end = begin + k
        else:
            out.append([(k.bit_length() - 1, begin // k)])
            begin += k
    out.reverse()  # RFC order: the sibling nearest the leaf first
    return out


def consistency_plan(size1: int, size2: int) -> list[list[NodeId]]:
    """Nodes of PROOF(size1, D[0:size2]) (RFC 9162 2.1.4.1); empty when size1 is 0 or size2."""
    if not 0 <= size1 <= size2:
        raise ProofError(f"consistency needs 0 <= size1 <= size2, got size1={size1} size2={size2}")
    out: list[list[NodeId]] = []
    if size1 in (0, size2):
        return out
    begin, end, whole = 0, size2, True
    while True:
        if size1 == end:
            if not whole:
                out.append(range_nodes(begin, end))
            break
        k = _largest_pow2_below(end - begin)
        if size1 <= begin + k:
            out.append(range_nodes(begin + k, end))
            end = begin + k
        else:
            out.append([(k.bit_length() - 1, begin // k)])
            begin += k
            whole = False
    out.reverse()
    return out


def fold_plan(plan: list[list[NodeId]], get_nodes: GetNodes) -> list[bytes]:
    """Fetch every node a plan names in one call and fold each element into one hash."""
    ids = [nid for element in plan for nid in element]
    hashes = get_nodes(ids)
    if len(hashes) != len(ids):  # a storage bug, not bad input: never fold a short list silently
        raise ProofError(f"storage returned {len(hashes)} node hashes for {len(ids)} node ids; run the log's audit")
    proof, pos = [], 0
    for element in plan:
        part = hashes[pos : pos + len(element)]
        pos += len(element)
        proof.append(border_root(part))
    return proof


def inclusion_proof(index: int, size: int, get_nodes: GetNodes) -> list[bytes]:
    """Inclusion proof of leaf `index` in the tree of `size` leaves, from stored complete nodes."""
    return fold_plan(inclusion_plan(index, size), get_nodes)


def consistency_proof(size1: int, size2: int, get_nodes: GetNodes) -> list[bytes]:
    """Consistency proof between tree sizes size1 <= size2, from stored complete nodes."""
    return fold_plan(consistency_plan(size1, size2), get_nodes)


def subtree_root(size: int, get_nodes: GetNodes) -> bytes:
    """Root hash of the tree of `size` leaves from its compact range of stored nodes."""
    return border_root(get_nodes(border_ids(size)))


# --- verification (transparency-dev/merkle proof/verify.go) ------------------------------------


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        n = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {n}")
    return bytes(value)


def _check_proof(proof: object) -> list[bytes]:
    if not isinstance(proof, (list, tuple)):
        raise ProofError(f"proof must be a list of {HASH_SIZE}-byte hashes, got {type(proof).__name__}")
    if all(type(p) is bytes and len(p) == HASH_SIZE for p in proof):  # the common case: no copy, no message
        return list(proof)
    return [_check_hash(p, f"proof[{i}]") for i, p in enumerate(proof)]  # every element, bytearrays copied


def _check_size(value: object, what: str) -> int:
    if not is_int(value) or value < 0:
        raise ProofError(f"{what} must be a non-negative integer, got {value!r}")
    return value


# The chains are the verification hot path (~20-40 hashes per proof): hashlib is bound locally and
# node_hash inlined, which is about a third faster than a call per node.


def _chain_inner(seed: bytes, proof: list[bytes], index: int) -> bytes:
    sha = hashlib.sha256
    for i, h in enumerate(proof):
        seed = sha(b"\x01" + seed + h).digest() if (index >> i) & 1 == 0 else sha(b"\x01" + h + seed).digest()
    return seed


def _chain_inner_right(seed: bytes, proof: list[bytes], index: int) -> bytes:
    sha = hashlib.sha256
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = sha(b"\x01" + h + seed).digest()
    return seed


def _chain_border_right(seed: bytes, proof: list[bytes]) -> bytes:
    sha = hashlib.sha256
    for h in proof:
        seed = sha(b"\x01" + h + seed).digest()
    return seed


def _decomp_inclusion(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: list[bytes]) -> bytes:
    """The root hash an inclusion proof implies; raises ProofError if its shape is wrong."""
    leaf = _check_hash(leaf, "leaf hash")
    index, size, proof = _check_size(index, "index"), _check_size(size, "size"), _check_proof(proof)
    if index >= size:
        raise ProofError(f"index is beyond size: {index} >= {size}")
    inner, border = _decomp_inclusion(index, size)
    if len(proof) != inner + border:
        raise ProofError(f"wrong proof size {len(proof)}, want {inner + border}")
    res = _chain_inner(leaf, proof[:inner], index)
    return _chain_border_right(res, proof[inner:])


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves with `root`."""
    root = _check_hash(root, "root")
    calculated = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if calculated != root:
        raise ProofError(f"root mismatch: proof gives {calculated.hex()}, expected {root.hex()}")


def verify_consistency(size1: int, size2: int, proof: list[bytes], root1: bytes, root2: bytes) -> None:
    """Check that the tree (size1, root1) is a prefix of the tree (size2, root2).

    Policy for size1 == 0: the empty tree is a prefix of every tree, so the proof must be empty and
    root1 must be the empty-tree root SHA-256(""); root2 is not constrained by an empty proof.
    """
    size1, size2 = _check_size(size1, "size1"), _check_size(size2, "size2")
    root1, root2 = _check_hash(root1, "root1"), _check_hash(root2, "root2")
    proof = _check_proof(proof)
    if size2 < size1:
        raise ProofError(f"size2 ({size2}) < size1 ({size1})")
    if size1 == size2:
        if proof:
            raise ProofError("size1 == size2, but the proof is not empty")
        if root1 != root2:
            raise ProofError(f"root mismatch: equal sizes but root1 {root1.hex()} != root2 {root2.hex()}")
        return
    if size1 == 0:
        if proof:
            raise ProofError(f"expected an empty proof from size 0, got {len(proof)} components")
        if root1 != EMPTY_ROOT:
            raise ProofError(f"root1 of a tree of size 0 must be SHA-256(\"\") = {EMPTY_ROOT.hex()}")
        return
    if not proof:
        raise ProofError("empty proof")

    inner, border = _decomp_inclusion(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1
    inner -= shift
    # The proof starts with the root of the subtree of size 2**shift ending at size1, unless size1
    # is that very power of two, whose root the verifier already holds as root1.
    seed, start = proof[0], 1
    if size1 == 1 << shift:
        seed, start = root1, 0
    if len(proof) != start + inner + border:
        raise ProofError(f"wrong proof size {len(proof)}, want {start + inner + border}")
    proof = proof[start:]
    mask = (size1 - 1) >> shift
    hash1 = _chain_border_right(_chain_inner_right(seed, proof[:inner], mask), proof[inner:])
    if hash1 != root1:
        raise ProofError(f"root1 mismatch: proof gives {hash1.hex()}, expected {root1.hex()}")
    hash2 = _chain_border_right(_chain_inner(seed, proof[:inner], mask), proof[inner:])
    if hash2 != root2:
        raise ProofError(f"root2 mismatch: proof gives {hash2.hex()}, expected {root2.hex()}")
