"""Deterministic Quantization Protocol (DQP v1): canonical INT8 codes of K/V state and their digests.

A K/V state of one layer has the canonical layout [T, H_kv, D] (tokens, kv heads, head dim),
row-major. Every element is mapped to an int8 code with a power-of-two scale taken from a
calibrated profile (docs/formats.md, "DQP v1"):

    code = clamp(round_half_to_even(x / 2**e), -127, 127)        dequantized value = code * 2**e

A profile may instead scale V per (token, head) row (profile format 3): each row's exponent is
the smallest e with 127 * 2**e >= max |row| (no headroom: the row is its own range), and the state
is stored in the row layout, every row being its D codes followed by its exponent as one int8
byte ([T, H, D + 1]); the header then carries no exponents and the layout number ROW_LAYOUT.

Division by a power of two is exact in float32 (the result stays a normal number for every
exponent the profile allows), so the only rounding is the final round-half-to-even, which every
IEEE machine does identically: the CPU reference here and the Triton kernel in
fieldprint/kernels/quant.py give the same codes for the same inputs. Digests are BLAKE3 over a
canonical header and the codes, plus per-block digests (blocks of `block_size` tokens, the
paged-cache block) so an audit can say which block differs.

This module is the CPU reference and the byte format; the profile lives in fieldprint/dqp_profile.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import numpy as np
import torch

from fieldprint.canon import parse_digest, tag_digest
from fieldprint.dqp_profile import (
    DQP_VERSION,
    EXP_MAX,
    EXP_MIN,
    KINDS,
    DQPProfile,
    exponent_for_bound,
)
from fieldprint.errors import DQPError, EntryError

__all__ = [
    "DQP_VERSION",
    "DQPProfile",
    "QuantizedState",
    "AuditThresholds",
    "AuditReport",
    "quantize",
    "quantize_codes",
    "dequantize",
    "check_finite",
    "inverse_scales",
    "state_header",
    "block_digests",
    "state_digest",
    "stack_digest",
    "differing_blocks",
    "audit",
    "exponent_for_bound",
    "row_exponents",
    "quantize_rows",
    "dequantize_rows",
    "ROW_LAYOUT",
]

SOURCE_DTYPES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_NAME_TO_DTYPE = {name: dt for dt, name in DTYPE_NAMES.items()}
HEADER_MAGIC = b"FPDQP"
_HEADER = struct.Struct("<5sBBBIIIII")  # magic, version, dtype, kind, layer, block, T, H, D
_STACK_MAGIC = b"FPDQP-stack"
ROW_LAYOUT = 2  # the header's version byte for a state in the row layout (exponents inside the rows)
_U32 = 2**32


def _check_u32(value: object, what: str) -> int:
    # Header fields are u32 (docs/formats.md): a negative or huge value has no encoding, and a bool is no number.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < _U32:
        raise DQPError(f"{what} must be an integer in [0, 2**32), got {value!r}")
    return int(value)


def _kind_code(kind: object) -> int:
    if kind not in KINDS:
        raise DQPError(f"kind must be one of {KINDS}, got {kind!r}")
    return KINDS.index(kind)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise DQPError naming the first NaN or Inf in `x`; nothing is quantized from such a tensor."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise DQPError(
            f"{what} holds {count} NaN/Inf value(s), the first at index {first}; "
            "a non-finite state has no canonical codes: fix the computation that produced it"
        )


def _check_state(x: torch.Tensor, exponents: np.ndarray | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise DQPError(f"a K/V state must be a [T, H_kv, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in SOURCE_DTYPES:
        raise DQPError(f"DQP quantizes bfloat16, float16 or float32 states, got {x.dtype}")
    if exponents is not None and tuple(exponents.shape) != tuple(x.shape[1:]):
        raise DQPError(f"scale exponents of shape {tuple(exponents.shape)} do not fit a state of shape {tuple(x.shape)}")


def inverse_scales(exponents: np.ndarray) -> np.ndarray:
    """Exact float32 2**-e for integer exponents (what the kernels multiply by)."""
    e = np.asarray(exponents, dtype=np.int32)
    if e.size and (e.min() < EXP_MIN or e.max() > EXP_MAX):
        raise DQPError(f"scale exponents must lie in [{EXP_MIN}, {EXP_MAX}], got [{e.min()}, {e.max()}]")
    return np.ldexp(np.float32(1.0), -e).astype(np.float32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**e for integer e in [-126, 127], built from its bits (no math library)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def row_exponents(x: torch.Tensor) -> torch.Tensor:
    """int8 exponents [..., H] of x [..., H, D]: per row the smallest e with 127 * 2**e >= max |row|.

    max |row| = m * 2**E with m in [0.5, 1) (frexp, exact); 127 * 2**(E-7) >= m * 2**E exactly when
    m <= 127/128, else E-6 is the answer. Integer arithmetic after an exact max: every device
    agrees. A zero row gets EXP_MIN; exponents clamp to [EXP_MIN, EXP_MAX] as the profile's do.
    """
    amax = x.abs().amax(-1).to(torch.float32)
    m, e = torch.frexp(amax)
    e = torch.where(m <= 127.0 / 128.0, e - 7, e - 6)
    e = torch.where(amax > 0, e, EXP_MIN).clamp(EXP_MIN, EXP_MAX)
    return e.to(torch.int8)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Row layout [..., H, D + 1] int8 of x [..., H, D] on x's device: each row's codes, then its exponent.

    The same arithmetic as quantize_codes with the row's own exponent (x * 2**-e is exact, clamp,
    round half to even); torch's round is half-to-even on every device. The caller checks that x
    is finite (check_finite, or a device-side count): a NaN/Inf row has no canonical codes.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in SOURCE_DTYPES or x.dim() < 2:
        raise DQPError(f"quantize_rows wants a bfloat16/float16/float32 [..., H, D] tensor, got {getattr(x, 'dtype', type(x))}")
    e = row_exponents(x)
    y = torch.clamp(x.to(torch.float32) * _pow2(-e.to(torch.int32))[..., None], -127.0, 127.0)
    return torch.cat([torch.round(y).to(torch.int8), e[..., None]], dim=-1)


def dequantize_rows(packed: torch.Tensor) -> torch.Tensor:
    """Exact float32 values of a row-layout state [..., H, D + 1]."""
    if packed.dtype != torch.int8 or packed.dim() < 2 or packed.shape[-1] < 2:
        raise DQPError(f"a row-layout state is int8 [..., H, D + 1], got {packed.dtype} {tuple(packed.shape)}")
    e = packed[..., -1].to(torch.int32)
    if bool(((e < EXP_MIN) | (e > EXP_MAX)).any()):
        raise DQPError(f"row exponents must lie in [{EXP_MIN}, {EXP_MAX}]")
    return packed[..., :-1].to(torch.float32) * _pow2(e)[..., None]


def quantize_codes(x: torch.Tensor, exponents: np.ndarray) -> torch.Tensor:
    """CPU reference: int8 codes [T, H, D] of `x` under per-(head, channel) exponents [H, D]."""
    exponents = np.asarray(exponents)
    _check_state(x, exponents)
    xf = x.detach().to("cpu", torch.float32)
    check_finite(xf, "K/V state")
    inv = torch.from_numpy(inverse_scales(exponents))
    # x * 2**-e is exact; clamping before rounding keeps every value inside int8 and then
    # torch.round rounds half to even, the IEEE default that the GPU kernel reproduces.
    y = torch.clamp(xf * inv, -127.0, 127.0)
    return torch.round(y).to(torch.int8).contiguous()


def dequantize(codes: torch.Tensor, exponents: np.ndarray | None) -> torch.Tensor:
    """Exact float32 values code * 2**e of int8 codes [T, H, D] (exponents None: the row layout)."""
    if exponents is None:
        return dequantize_rows(codes)
    if codes.dtype != torch.int8 or codes.dim() != 3:
        raise DQPError(f"codes must be an int8 [T, H, D] tensor, got {codes.dtype} {tuple(codes.shape)}")
    scale = torch.from_numpy(np.ldexp(np.float32(1.0), np.asarray(exponents, dtype=np.int32)).astype(np.float32))
    return codes.to(torch.float32) * scale.to(codes.device)


def state_header(
    source_dtype: str, layer: int, kind: str, block_size: int, shape: tuple[int, int, int], exponents: np.ndarray | None
) -> bytes:
    """Canonical header bytes: version, source dtype, layer, K|V, block size, shape (T, H, D), exponents.

    exponents None: the row layout (version byte ROW_LAYOUT, no exponents: they are in the rows).
    """
    if source_dtype not in _NAME_TO_DTYPE:
        raise DQPError(f"source dtype {source_dtype!r} is not one of {sorted(_NAME_TO_DTYPE)}")
    kind_code = _kind_code(kind)
    if len(shape) != 3:
        raise DQPError(f"a state shape is (T, H_kv, D), got {tuple(shape)!r}")
    t, h, d = (_check_u32(n, f"state shape {name}") for n, name in zip(shape, "THD"))
    layer, block_size = _check_u32(layer, "layer"), _check_u32(block_size, "block size")
    dtype_code = SOURCE_DTYPES[_NAME_TO_DTYPE[source_dtype]]
    if exponents is None:
        return _HEADER.pack(HEADER_MAGIC, ROW_LAYOUT, dtype_code, kind_code, layer, block_size, t, h, d)
    e = np.asarray(exponents, dtype=np.int32)
    if e.shape != (h, d):
        raise DQPError(f"scale exponents of shape {e.shape} do not fit a state of shape {(t, h, d)}")
    fixed = _HEADER.pack(HEADER_MAGIC, DQP_VERSION, dtype_code, kind_code, layer, block_size, t, h, d)
    return fixed + e.astype(np.int8).tobytes()


def _code_bytes(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        if codes.device.type != "cpu":
            raise DQPError("codes must be on the host to be digested; copy them first")
        codes = codes.numpy()
    if codes.dtype != np.int8 or codes.ndim != 3:
        raise DQPError(f"codes must be int8 [T, H, D], got {codes.dtype} with shape {codes.shape}")
    return np.ascontiguousarray(codes)


def block_digests(codes: torch.Tensor | np.ndarray, block_size: int) -> list[bytes]:
    """BLAKE3 of each run of `block_size` tokens of the codes (the last block may be partial)."""
    arr = _code_bytes(codes)
    if block_size < 1:
        raise DQPError(f"block size must be >= 1, got {block_size}")
    stride = arr.shape[1] * arr.shape[2] * block_size
    view = memoryview(arr.reshape(-1).view(np.uint8))
    # One call per block, on one thread: handing the GIL between threads per 16 KB block costs
    # more than the hashing (measured in benchmarks/quant_bench.py).
    return [blake3.blake3(view[lo : lo + stride]).digest() for lo in range(0, arr.size, stride)]


def state_digest(header: bytes, codes: torch.Tensor | np.ndarray, threads: int = 1) -> str:
    """Tagged digest of one state: BLAKE3(header || codes), on up to `threads` threads (same value)."""
    arr = _code_bytes(codes)
    h = blake3.blake3(header, max_threads=max(1, threads))
    h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    return tag_digest("blake3", h.digest())


def stack_digest(parts: list[tuple[int, str, str]]) -> str:
    """Tagged digest of a K/V stack from its (layer, kind, state digest) parts, order-independent."""
    if not parts:
        raise DQPError("a K/V stack needs at least one (layer, kind) state")
    checked = []  # (layer, kind code, kind, raw state digest), all checked before anything is hashed
    for part in parts:
        if not isinstance(part, tuple) or len(part) != 3:
            raise DQPError(f"stack parts are (layer, kind, state digest) tuples, got {part!r}")
        layer, kind, digest = part
        layer = _check_u32(layer, f"layer of stack part {part!r}")
        try:
            algorithm, raw = parse_digest(digest)
        except EntryError as e:
            raise DQPError(f"state digest of layer {layer} {kind!r}: {e}") from None
        if algorithm != "blake3":
            raise DQPError(f"state digest of layer {layer} {kind!r} is {algorithm}; DQP state digests are blake3 (state_digest)")
        checked.append((layer, _kind_code(kind), kind, raw))
    checked.sort(key=lambda p: p[:2])
    h = blake3.blake3(_STACK_MAGIC)
    h.update(struct.pack("<BI", DQP_VERSION, len(checked)))
    for i, (layer, code, kind, raw) in enumerate(checked):
        if i and checked[i - 1][:2] == (layer, code):
            raise DQPError(f"layer {layer} {kind} appears twice in one stack")
        h.update(struct.pack("<IB", layer, code) + raw)
    return tag_digest("blake3", h.digest())


@dataclass(slots=True)
class QuantizedState:
    """Canonical INT8 codes of one (layer, K|V) state plus everything needed to re-derive its digest."""

    codes: torch.Tensor  # int8 [T, H, D], host, contiguous; the row layout: [T, H, D + 1]
    exponents: np.ndarray | None  # int [H, D]: scale = 2**e per (head, channel); None: the row layout
    source_dtype: str
    layer: int
    kind: str
    block_size: int
    blocks: list[bytes] = field(default_factory=list)  # per-block BLAKE3, filled by digest(blocks=True)

    def header(self) -> bytes:
        """Canonical header bytes of this state."""
        t, h, d = self.codes.shape
        return state_header(self.source_dtype, self.layer, self.kind, self.block_size,
                            (t, h, d - (self.exponents is None)), self.exponents)

    def digest(self, blocks: bool = True, threads: int = 1) -> str:
        """Tagged BLAKE3 digest of header + codes; with `blocks`, also records the per-block digests."""
        if blocks:
            self.blocks = block_digests(self.codes, self.block_size)
        return state_digest(self.header(), self.codes, threads)

    def dequantize(self) -> torch.Tensor:
        """Exact float32 values the codes stand for."""
        return dequantize(self.codes, self.exponents)


def quantize(x: torch.Tensor, profile: DQPProfile, layer: int, kind: str) -> QuantizedState:
    """Quantize one [T, H, D] K or V state of `layer` with `profile` (CPU reference path)."""
    exponents = profile.fixed(layer, kind)
    if exponents is None:
        _check_state(x, None)
        xf = x.detach().to("cpu")
        check_finite(xf, "K/V state")
        codes = quantize_rows(xf).contiguous()
    else:
        codes = quantize_codes(x, exponents)
    return QuantizedState(codes, exponents, DTYPE_NAMES[x.dtype], layer, kind, profile.block_size)


def differing_blocks(a: list[bytes], b: list[bytes]) -> list[int]:
    """Indices of blocks whose digests differ (a length mismatch makes the extra blocks differ)."""
    n = max(len(a), len(b))
    return [i for i in range(n) if i >= len(a) or i >= len(b) or a[i] != b[i]]


@dataclass(frozen=True, slots=True)
class AuditThresholds:
    """When a recomputed state still counts as the committed one (docs/reproducibility.md says why)."""

    max_code_distance: int = 3  # no code may move further: recomputation noise moved codes by <= 2
    max_block_fraction: float = 0.50  # share of one block's codes that may differ (grows with depth)
    max_fraction: float = 0.35  # share of all codes of the state that may differ


@dataclass(slots=True)
class AuditReport:
    """Outcome of comparing recomputed codes against committed ones, block by block."""

    total: int
    differing: int
    fraction: float
    max_distance: int
    block_fractions: list[float]
    block_max_distance: list[int]
    blocks_over: list[int]  # blocks failing a per-block threshold
    thresholds: AuditThresholds
    passed: bool

    def summary(self) -> str:
        """One line for logs and receipts."""
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{verdict}: {self.differing}/{self.total} codes differ ({self.fraction:.4%}), "
            f"max distance {self.max_distance}, blocks over threshold {self.blocks_over}"
        )


def audit(
    recomputed: torch.Tensor,
    committed: QuantizedState,
    profile: DQPProfile,
    thresholds: AuditThresholds = AuditThresholds(),
) -> AuditReport:
    """Quantize a recomputed float state with `profile` and compare its codes with committed ones.

    The distance is in steps of the committed scale: code distance where the exponents agree (a
    row-layout row whose exponent moved is measured by its values).
    """
    expected = profile.fixed(committed.layer, committed.kind)
    same = (expected is None) == (committed.exponents is None) and (
        expected is None or np.array_equal(expected, committed.exponents))
    if not same or committed.block_size != profile.block_size:
        raise DQPError(
            f"committed layer {committed.layer} {committed.kind} was not made with this profile "
            "(scale exponents, layout or block size differ): audit with the profile named in its ledger entry"
        )
    mine = quantize(recomputed, profile, committed.layer, committed.kind)
    if tuple(mine.codes.shape) != tuple(committed.codes.shape):
        raise DQPError(f"recomputed state has shape {tuple(recomputed.shape)}, committed {tuple(committed.codes.shape)}")
    if expected is None:
        step = _pow2(committed.codes[..., -1].to(torch.int32))[..., None]
        delta = (mine.dequantize() - committed.dequantize()).abs() / step
        dist = torch.ceil(delta).to(torch.int32)
    else:
        dist = (mine.codes.to(torch.int16) - committed.codes.to(torch.int16)).abs()
    t, h, d = dist.shape
    bs = profile.block_size
    nblocks = (t + bs - 1) // bs
    fractions, maxima, over = [], [], []
    for i in range(nblocks):
        blk = dist[i * bs : (i + 1) * bs]
        frac = float((blk != 0).sum()) / blk.numel()
        mx = int(blk.max()) if blk.numel() else 0
        fractions.append(frac)
        maxima.append(mx)
        if frac > thresholds.max_block_fraction or mx > thresholds.max_code_distance:
            over.append(i)
    differing = int((dist != 0).sum())
    total = dist.numel()
    fraction = differing / total if total else 0.0
    max_distance = int(dist.max()) if total else 0
    passed = not over and fraction <= thresholds.max_fraction
    return AuditReport(total, differing, fraction, max_distance, fractions, maxima, over, thresholds, passed)
