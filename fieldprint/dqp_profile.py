"""DQP profiles: the static, calibrated, hashed range bounds that fix every scale exponent.

A profile says, for every layer and for K and V, which power-of-two scale each (head, channel)
uses, or (V only, profile format 3) that V is scaled per token and head: each row's exponent is
then derived from the row itself and stored beside its codes (the row layout, fieldprint/dqp.py). It is calibrated once from sample states (max |x| times a documented headroom), encoded
canonically (the leaf-entry JSON rules: sorted keys, no whitespace, integers only) and hashed
with BLAKE3; that tagged digest is what a StateEntry's `profile` field holds, so a verifier
knows exactly which scales produced the committed codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from fieldprint.canon import canonical_json, check_label, is_int, tag_digest
from fieldprint.errors import DQPError

DQP_VERSION = 1
# Format 1: V per head (no v_granularity field); 2: V per channel; 3: V per token (no V exponents).
# Every format is still read and verified, and each keeps its exact bytes (so its digest).
PROFILE_FORMATS = {"head": 1, "channel": 2, "token": 3}
KINDS = ("K", "V")
GRANULARITIES = ("channel", "head")  # fixed exponents per (head, channel) or per head, for K and V
V_GRANULARITIES = (*GRANULARITIES, "token")  # V may also be scaled per (token, head) row
# Exponent range: |x| * 2**-e stays a normal float32 for every finite bf16/fp16/fp32 input that
# is not already below the smallest code step, so the scaling is exact (docs/formats.md).
EXP_MIN, EXP_MAX = -64, 63
DEFAULT_HEADROOM_PCT = 125
MAX_PROFILE_BYTES = 16 << 20


def exponent_for_bound(bound: np.ndarray | float) -> np.ndarray:
    """Smallest integer e with 127 * 2**e >= bound, clamped to [EXP_MIN, EXP_MAX] (0 -> EXP_MIN)."""
    b = np.asarray(bound, dtype=np.float64)
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise DQPError("range bounds must be finite and non-negative")
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(np.where(b > 0, b, 1.0) / 127.0))
    e = np.clip(e, EXP_MIN - 1, EXP_MAX + 1)
    # log2 may be off by one ulp; settle the exact smallest e with float64 products (exact here).
    e = np.where(127.0 * np.ldexp(1.0, e.astype(np.int64)) < b, e + 1, e)
    e = np.where(127.0 * np.ldexp(1.0, (e - 1).astype(np.int64)) >= b, e - 1, e)
    e = np.where(b > 0, e, EXP_MIN)
    return np.clip(e, EXP_MIN, EXP_MAX).astype(np.int32)


def _check_granularities(k: object, v: object) -> None:
    if k not in GRANULARITIES:
        raise DQPError(f"k_granularity must be one of {GRANULARITIES}, got {k!r}")
    if v not in V_GRANULARITIES:
        raise DQPError(f"v_granularity must be one of {V_GRANULARITIES}, got {v!r}")


@dataclass(slots=True)
class DQPProfile:
    """Per-layer K/V scale exponents, calibrated from sample data, versioned and hashed."""

    name: str
    revision: int  # bumped on every recalibration of the same model
    num_layers: int
    num_kv_heads: int
    head_dim: int
    k_granularity: str  # "channel" or "head"
    block_size: int  # tokens per digest block: the paged-cache block
    headroom_pct: int  # bound = calibrated max |x| * headroom_pct / 100
    samples: int  # tokens seen in calibration (provenance, not used in quantization)
    k_exp: np.ndarray  # int32 [L, H, D] (channel) or [L, H] (head)
    v_exp: np.ndarray  # int32 [L, H, D] (channel), [L, H] (head) or [0] (token: the rows carry them)
    v_granularity: str = "head"  # see PROFILE_FORMATS

    def __post_init__(self) -> None:
        check_label(self.name, "profile name")
        for what, value, lo in (
            ("revision", self.revision, 0), ("num_layers", self.num_layers, 1), ("num_kv_heads", self.num_kv_heads, 1),
            ("head_dim", self.head_dim, 1), ("block_size", self.block_size, 1), ("headroom_pct", self.headroom_pct, 100),
            ("samples", self.samples, 0),
        ):
            if not is_int(value) or value < lo:
                raise DQPError(f"profile {what} must be an integer >= {lo}, got {value!r}")
        _check_granularities(self.k_granularity, self.v_granularity)
        l, h, d = self.num_layers, self.num_kv_heads, self.head_dim
        shape = {"channel": (l, h, d), "head": (l, h), "token": (0,)}
        self.k_exp = self._check_exp(self.k_exp, shape[self.k_granularity], "k_exp")
        self.v_exp = self._check_exp(self.v_exp, shape[self.v_granularity], "v_exp")

    @staticmethod
    def _check_exp(e: object, shape: tuple[int, ...], what: str) -> np.ndarray:
        arr = np.asarray(e)
        if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer):
            raise DQPError(f"profile {what} must be integers of shape {shape}, got {arr.dtype} {arr.shape}")
        if arr.size and (arr.min() < EXP_MIN or arr.max() > EXP_MAX):
            raise DQPError(f"profile {what} exponents must lie in [{EXP_MIN}, {EXP_MAX}]")
        arr = arr.astype(np.int32)
        arr.setflags(write=False)
        return arr

    def per_row(self, layer: int, kind: str) -> bool:
        """Whether this layer's K or V is scaled per (token, head) row (no fixed exponents)."""
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise DQPError(f"layer {layer!r} is outside this profile's {self.num_layers} layers")
        if kind not in KINDS:
            raise DQPError(f"kind must be 'K' or 'V', got {kind!r}")
        return kind == "V" and self.v_granularity == "token"

    def fixed(self, layer: int, kind: str) -> np.ndarray | None:
        """The fixed exponents [H, D] of one layer's K or V, or None where rows carry their own."""
        return None if self.per_row(layer, kind) else self.exponents(layer, kind)

    def exponents(self, layer: int, kind: str) -> np.ndarray:
        """Scale exponents [H, D] for one layer's K or V (per-head values repeated along D)."""
        if self.per_row(layer, kind):
            raise DQPError(f"profile {self.name!r} scales V per token: layer {layer} V has no fixed exponents "
                           "(each row's exponent is stored with its codes)")
        e = self.k_exp[layer] if kind == "K" else self.v_exp[layer]
        if e.ndim == 1:
            e = np.repeat(e[:, None], self.head_dim, axis=1)
        return np.ascontiguousarray(e, dtype=np.int32)

    def scales(self, layer: int, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [H, D] scales 2**e, the form the attention kernel dequantizes anchors with."""
        e = self.exponents(layer, kind)
        return torch.from_numpy(np.ldexp(np.float32(1.0), e).astype(np.float32)).to(device)

    def encode(self) -> bytes:
        """Canonical bytes: sorted-key JSON, no whitespace, integers only."""
        # Per-head V keeps format 1's exact bytes, so every format-1 profile keeps its digest.
        fmt = PROFILE_FORMATS[self.v_granularity]
        record = {
            "dqp": DQP_VERSION,
            "format": fmt,
            "name": self.name,
            "revision": self.revision,
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "k_granularity": self.k_granularity,
            "block_size": self.block_size,
            "headroom_pct": self.headroom_pct,
            "samples": self.samples,
            "k_exp": self.k_exp.tolist(),
            "v_exp": self.v_exp.tolist(),
        }
        if fmt > 1:
            record["v_granularity"] = self.v_granularity
        return canonical_json(record)

    @property
    def digest(self) -> str:
        """Tagged BLAKE3 of the canonical encoding: the value of StateEntry.profile."""
        return tag_digest("blake3", blake3.blake3(self.encode()).digest())

    @classmethod
    def decode(cls, data: bytes) -> DQPProfile:
        """Parse a profile, refusing anything that is not the canonical encoding of a known format."""
        if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_PROFILE_BYTES:
            raise DQPError(f"a profile is at most {MAX_PROFILE_BYTES} bytes of canonical JSON")
        try:
            r = json.loads(bytes(data).decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DQPError(f"profile is not ASCII JSON: {e}") from None
        keys = {"dqp", "format", "name", "revision", "layers", "kv_heads", "head_dim", "k_granularity",
                "block_size", "headroom_pct", "samples", "k_exp", "v_exp"}
        if isinstance(r, dict) and r.get("format") != 1:
            keys = keys | {"v_granularity"}
        if not isinstance(r, dict) or set(r) != keys:
            raise DQPError(f"profile fields must be exactly {sorted(keys)}")
        formats = sorted(PROFILE_FORMATS.values())
        if r["dqp"] != DQP_VERSION or r["format"] not in formats or isinstance(r["format"], bool):
            raise DQPError(f"profile is DQP v{r['dqp']} format {r['format']}; this code reads v{DQP_VERSION} formats {formats}")
        if r.get("v_granularity", "head") not in PROFILE_FORMATS or PROFILE_FORMATS[r.get("v_granularity", "head")] != r["format"]:
            raise DQPError(f"profile format {r['format']} does not go with v_granularity {r.get('v_granularity')!r}")
        try:
            k_exp, v_exp = np.array(r["k_exp"], dtype=np.int64), np.array(r["v_exp"], dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise DQPError("profile exponents must be nested lists of integers") from None
        profile = cls(r["name"], r["revision"], r["layers"], r["kv_heads"], r["head_dim"], r["k_granularity"],
                      r["block_size"], r["headroom_pct"], r["samples"], k_exp, v_exp, r.get("v_granularity", "head"))
        if profile.encode() != bytes(data):
            raise DQPError("profile is not in canonical form (key order, whitespace or number format differs)")
        return profile

    @classmethod
    def calibrate(
        cls,
        samples: Iterable[Mapping[tuple[int, str], torch.Tensor]],
        *,
        name: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        k_granularity: str = "channel",
        v_granularity: str = "head",
        block_size: int = 16,
        headroom_pct: int = DEFAULT_HEADROOM_PCT,
        revision: int = 1,
    ) -> DQPProfile:
        """Calibrate from sample states {(layer, 'K'|'V'): [T, H, D]}: bound = max |x| * headroom.

        v_granularity "token" records no V exponents (each row gets its own when quantized).
        """
        _check_granularities(k_granularity, v_granularity)
        kmax = np.zeros((num_layers, num_kv_heads, head_dim), np.float64)
        vmax = np.zeros((num_layers, num_kv_heads, head_dim), np.float64)
        seen_k, seen_v, tokens = set(), set(), 0
        for sample in samples:
            for (layer, kind), x in sample.items():
                if kind not in KINDS or not isinstance(layer, int) or not 0 <= layer < num_layers:
                    raise DQPError(f"calibration sample key {(layer, kind)!r} is not (layer in [0, {num_layers}), 'K'|'V')")
                if x.dim() != 3 or tuple(x.shape[1:]) != (num_kv_heads, head_dim):
                    raise DQPError(f"calibration sample {(layer, kind)} has shape {tuple(x.shape)}, expected [T, {num_kv_heads}, {head_dim}]")
                xf = x.detach().to("cpu", torch.float32)
                if not bool(torch.isfinite(xf).all()):
                    raise DQPError(f"calibration sample {(layer, kind)} holds NaN/Inf; calibrate on finite states")
                m = xf.abs().amax(dim=0).double().numpy() if xf.shape[0] else np.zeros((num_kv_heads, head_dim))
                target = kmax if kind == "K" else vmax
                np.maximum(target[layer], m, out=target[layer])
                (seen_k if kind == "K" else seen_v).add(layer)
                if kind == "K" and layer == 0:
                    tokens += int(x.shape[0])
        missing = [(l, k) for l in range(num_layers) for k, seen in (("K", seen_k), ("V", seen_v)) if l not in seen]
        if missing:
            raise DQPError(f"calibration saw no samples for {missing[:4]}{'...' if len(missing) > 4 else ''}; every layer needs K and V")
        scale = headroom_pct / 100.0
        if k_granularity == "head":
            kmax = kmax.max(axis=2)
        k_exp = exponent_for_bound(kmax * scale)
        if v_granularity == "token":
            v_exp = np.zeros((0,), np.int32)
        else:
            v_exp = exponent_for_bound((vmax.max(axis=2) if v_granularity == "head" else vmax) * scale)
        return cls(name, revision, num_layers, num_kv_heads, head_dim, k_granularity, block_size,
                   headroom_pct, tokens, k_exp, v_exp, v_granularity)
