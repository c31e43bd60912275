"""Tensor parallelism on the CPU: two gloo ranks, heads and the MLP split, logits equal one rank's.

Each rank builds the model from the same full weights (loader.build_model takes its shard: q/k/v
and gate/up by output rows, o/down by input columns, KV heads split), keeps its own share of the
paged KV cache, and joins the partial sums with one all-reduce after attention and one after the
MLP. Rank 0 writes its logits; the test compares them with a single-process forward.
"""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two processes, each importing torch and building a model

CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=256, tie_word_embeddings=True)


def _weights() -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG), dtype=torch.float32)
    return {k: v.clone() for k, v in hf.state_dict().items()}


def _logits(tensors: dict[str, torch.Tensor], ids: list[int], tp_size: int) -> torch.Tensor:
    """One prefill of `ids` through our model on the CPU path; this rank's share of the cache."""
    from transformers import AutoConfig

    from fieldprint.engine.attention import AttentionContext
    from fieldprint.engine.kv_cache import allocate_cache
    from fieldprint.engine.loader import build_model
    from fieldprint.engine.model import ModelArgs
    from fieldprint.kernels.paged_attention import AnchorRouting

    args = ModelArgs.from_hf(AutoConfig.for_model(**CONFIG))
    model = build_model(args, tensors, torch.device("cpu"), torch.float32)
    cache = allocate_cache(args, block_size=16, num_blocks=8, num_anchor_blocks=1, dtype=torch.float32,
                           anchor_dtype=torch.float32, device=torch.device("cpu"), tp_size=tp_size)
    n = len(ids)
    empty = torch.zeros(0, dtype=torch.int32)
    ctx = AttentionContext(cache, True, torch.arange(16, 16 + n), torch.tensor([[1, 2, 3]], dtype=torch.int32),
                           torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), n,
                           AnchorRouting(torch.zeros((0, 1), dtype=torch.int32), empty, torch.tensor([-1], dtype=torch.int32)))
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(n), ctx))


def _rank(rank: int, world: int, port: int, out: str, tensors, ids) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits = _logits(tensors, ids, world)
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    tensors = _weights()
    ids = torch.randint(0, CONFIG["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    single = _logits(tensors, ids, 1)
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank, args=(2, _free_port(), out, tensors, ids), nprocs=2, join=True, start_method="spawn")
    split = torch.load(out)
    d = (split - single).abs().max().item()
    assert split.shape == single.shape and d < 1e-4, f"TP=2 logits differ from TP=1 by {d:.3g}"
    assert (split.argmax(-1) == single.argmax(-1)).all()
