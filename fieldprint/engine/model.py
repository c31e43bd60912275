"""A Llama-family decoder over the paged KV cache: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3.

The forward is ours (transformers supplies only the configuration and the tokenizer). It takes a
flat batch of new tokens, their positions and one `AttentionContext` that every layer shares
(fieldprint/engine/attention.py), writes each layer's K and V into the paged pool and attends over
[anchor blocks ; the sequence's own blocks]. Linear layers are column- or row-parallel, so that
tensor parallelism splits heads and the MLP across ranks with one all-reduce after attention and
one after the MLP (as nano-vllm does); with one rank they are plain matmuls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fieldprint.engine.attention import AttentionContext, paged_attention
from fieldprint.errors import ModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """The architecture, read from an HF config; every shape below derives from it."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float], ...]  # llama3 scaling parameters, empty for plain RoPE
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3

    @classmethod
    def from_hf(cls, config) -> ModelArgs:
        """Read an HF PretrainedConfig (or its dict); ModelError for an architecture we do not run."""
        c = config if isinstance(config, dict) else config.to_dict()
        arch = c.get("model_type")
        if arch not in SUPPORTED:
            raise ModelError(f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED)} "
                             "(Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3)")
        if c.get("sliding_window") and c.get("use_sliding_window", arch == "mistral"):
            raise ModelError(f"sliding-window attention (window {c['sliding_window']}) is not supported")
        try:
            heads, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
            kv = int(c.get("num_key_value_heads") or heads)
            rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
            theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ModelError(f"RoPE type {rope_type!r} is not supported (default and llama3 are)")
            scaling = () if rope_type == "default" else tuple(sorted(
                (k, float(rope[k])) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")))
            args = cls(
                arch=arch, vocab_size=int(c["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=kv, head_dim=int(c.get("head_dim") or hidden // heads),
                rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                max_position=int(c.get("max_position_embeddings", 8192)),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)), qk_norm=arch == "qwen3",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"the model config lacks or mangles a field the forward needs: {e!r}") from None
        if heads % kv:
            raise ModelError(f"{heads} query heads are not a multiple of {kv} KV heads")
        return args


def tp_group() -> tuple[int, int]:
    """(this rank, ranks) of the tensor-parallel group: the default torch.distributed group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split across ranks: each rank holds out/tp rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_group()
        if out_features % self.tp_size:
            raise ModelError(f"{out_features} output features do not split over {self.tp_size} ranks")
        self.weight = nn.Parameter(torch.empty(out_features // self.tp_size, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features // self.tp_size), requires_grad=False) if bias else None

    def shard(self, full: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's slice of a full (unsplit) weight or bias."""
        n = full.shape[dim] // self.tp_size
        return full.narrow(dim, self.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(ColumnParallelLinear):
    """y = sum over ranks of x_r W_r^T: W's input columns split, one all-reduce joins the parts."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        nn.Module.__init__(self)
        self.tp_rank, self.tp_size = tp_group()
        if in_features % self.tp_size:
            raise ModelError(f"{in_features} input features do not split over {self.tp_size} ranks")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.tp_size), requires_grad=False)
        self.bias = None

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return super().shard(full, dim if full.dim() == 2 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In fp32 and cast back, as the reference implementations do: bf16 variance loses digits.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a sublayer's residual add and the next norm in one step."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, H, D] and k [T, H_kv, D] with cos/sin [T, 1, D/2], computed in fp32."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# The elementwise steps around the GEMMs: as written above, each is 5-10 small kernels per call
# (about fifty per layer), which bounds a batch-1 decode step even inside a CUDA graph. On CUDA,
# `fuse_elementwise()` swaps in torch.compile'd versions (one call each, the residual add inside
# the norm's kernel, q and k turned by one call; same math); the CPU keeps the eager functions.
_EAGER = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rope": rope, "silu_mul": silu_mul}
_FUSED = dict(_EAGER)


def fuse_elementwise() -> None:
    """Compile RMSNorm (alone and after the residual add), RoPE and SiLU-mul (CUDA; shapes stay dynamic)."""
    for name, fn in _EAGER.items():
        if _FUSED[name] is fn:
            _FUSED[name] = torch.compile(fn, dynamic=True, fullgraph=True)


def _fn(name: str, x: torch.Tensor):
    """The compiled version of an elementwise step for CUDA tensors, the eager one on the CPU."""
    return (_FUSED if x.is_cuda else _EAGER)[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fn("rms_norm", x)(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of x + residual, x + residual)."""
        return _fn("add_rms_norm", x)(x, residual, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2], with Llama 3's long-context scaling when configured."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))
    if not args.rope_scaling:
        return inv.float()
    s = dict(args.rope_scaling)
    factor, low, high, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


class Rotary(nn.Module):
    """cos/sin tables for every position, side by side in one table so that a step gathers them at once."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        pos = torch.arange(args.max_position, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(args))
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] of the positions: gathered once per step, applied by every layer."""
        return self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        _, tp = tp_group()
        if args.num_kv_heads % tp:
            raise ModelError(f"{args.num_kv_heads} KV heads do not split over {tp} ranks")
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = args.num_heads // tp, args.num_kv_heads // tp, args.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # q, k and v in one GEMM: the loader stacks each rank's q, k and v shards.
        self.qkv_proj = ColumnParallelLinear(args.hidden_size, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim,
                                             bias=args.qkv_bias)
        self.o_proj = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size)
        self.q_norm = RMSNorm(args.head_dim, args.rms_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.heads, self.head_dim)
        k = k.view(-1, self.kv_heads, self.head_dim)
        v = v.view(-1, self.kv_heads, self.head_dim)  # a column slice of the GEMM's output: the store reads it in place
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _fn("rope", q)(q, k, *cos_sin)
        o = paged_attention(q, k, v, self.layer, ctx)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = RowParallelLinear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        return self.down_proj(_fn("silu_mul", h)(h))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_eps)
        self.mlp = MLP(args)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream): their sum is the layer's output, left to the next norm to add
        in its own kernel. The first layer gets the embeddings as h and no residual."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm.add(h, residual)
        x, residual = self.post_attention_layernorm.add(self.self_attn(x, cos_sin, ctx), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final norm and the LM head (tied to the embeddings or not)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.rotary = Rotary(args)
        self.lm_head = None if args.tie_embeddings else nn.Parameter(
            torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of new tokens at their absolute positions."""
        h, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary(positions)
        for layer in self.layers:
            h, residual = layer(h, residual, cos_sin, ctx)
        return self.norm.add(h, residual)[0]

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [N, vocab] of the given hidden states (the last token of each sequence), into
        `out` when given (the cast to fp32 is the copy)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        y = F.linear(hidden, w)
        return y.float() if out is None else out.copy_(y)
