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


FACTS = ["The user's name is Ada.", "Ada is allergic to peanuts.", "Ada lives in Lisbon."]


def _serve(path: str, data_dir: str, tp_size: int, anchor_dtype: str, session: str = "t", ids: list | None = None) -> dict:
    """One engine's answers (with the anchors, and a session turn) and what it committed; closed after.
    `ids`: anchor states already in its memory (a restart), else the facts are added."""
    from fieldprint.engine.engine import Engine, EngineConfig
    from fieldprint.engine.receipt import verify_receipt
    from fieldprint.engine.runner import RunnerConfig
    from fieldprint.engine.sequence import SamplingParams

    config = EngineConfig(runner=RunnerConfig(block_size=4, cpu_cache_tokens=1024, max_model_len=512, anchor_blocks=128,
                                              max_anchor_len=256, anchor_dtype=anchor_dtype, cuda_graphs=False))
    engine = Engine(path, data_dir=data_dir, config=config, device="cpu", tp_size=tp_size)
    try:
        pm = engine.memory.pacemaker
        ids = ids or [pm.add("belief", session="s", creator="agent", sources=["agent"], text=t).state_id for t in FACTS]
        greedy = SamplingParams(max_tokens=8, ignore_eos=True)
        outs = engine.generate(["Where do I live?", "What should I not eat?"], greedy, anchors=ids)
        engine.new_session(session)
        turn = engine.generate("Hello, I am Ada.", greedy, session=session)[0]
        kv = engine.memory.kv_commit(engine.memory.session(session).turns[0])
        for out in [*outs, turn]:
            engine.bind(out.receipt)
            verify_receipt(out.receipt, engine.memory.log_key)
        anchor = outs[0].receipt["anchors"]
        assert engine.runner.tp_size == tp_size and engine.runner.cache.k.shape[3] == 2 // tp_size
        # the other ranks take each step's input ids from the host: split, the engine steps in order
        assert engine.stepper.overlap is (tp_size == 1)
        blocks = engine.runner.blocks
        assert blocks.num_free == blocks.num_blocks - 1  # every block back, on rank 0 as on the mirror
        return {"tokens": [o.token_ids for o in outs] + [turn.token_ids], "anchor_tokens": anchor["set"]["manifest"]["tokens"],
                "kv_commit": engine.log.entry(kv), "anchor_entry": anchor["set"]["entry"], "ids": ids}
    finally:
        engine.close()


@pytest.mark.parametrize("anchor_dtype", ["int8", "model"])
def test_an_engine_split_over_two_ranks_serves_what_one_device_serves(tiny_model, tmp_path, anchor_dtype):
    """Rank 0 schedules and commits; rank 1 mirrors every step, holds its KV heads and its heads of the anchor
    pool. Answers, anchors and receipts match one device's; a set file reloads into a restarted split engine,
    and one compiled on one device loads into a split one."""
    from fieldprint.ledger.entry import StateEntry

    lm, _ = tiny_model("llama")  # 2 KV heads: one per rank
    one = _serve(lm.source, str(tmp_path / "one"), 1, anchor_dtype)
    two = _serve(lm.source, str(tmp_path / "two"), 2, anchor_dtype)
    assert two["tokens"] == one["tokens"] and two["anchor_tokens"] == one["anchor_tokens"]
    kv = StateEntry.decode(two["kv_commit"])
    assert kv.state_type == "session_kv" and kv.digest == StateEntry.decode(one["kv_commit"]).digest  # all heads, once
    again = _serve(lm.source, str(tmp_path / "two"), 2, anchor_dtype, "u", two["ids"])  # the set file, not a new compile
    assert again["tokens"] == two["tokens"] and again["anchor_entry"] == two["anchor_entry"]
    moved = _serve(lm.source, str(tmp_path / "one"), 2, anchor_dtype, "u", one["ids"])  # one device's set file, split
    assert moved["tokens"] == one["tokens"] and moved["anchor_entry"] == one["anchor_entry"]


def test_a_split_engine_refuses_bad_sizes_and_a_dead_rank_with_clear_errors(tiny_model, tmp_path):
    from fieldprint.engine.engine import Engine, EngineConfig
    from fieldprint.engine.runner import RunnerConfig
    from fieldprint.errors import EngineError, ModelError

    config = EngineConfig(runner=RunnerConfig(block_size=4, cpu_cache_tokens=1024, max_model_len=512, anchor_blocks=16,
                                              cuda_graphs=False))
    for bad in (0, 1.5, True):
        with pytest.raises(EngineError, match="tp_size must be a positive int"):
            Engine(tiny_model("llama")[0].source, data_dir=str(tmp_path / "bad"), config=config, device="cpu", tp_size=bad)
    one_kv_head = tiny_model("llama3-rope")[0].source
    with pytest.raises(ModelError, match="do not split over 2 ranks"):
        Engine(one_kv_head, data_dir=str(tmp_path / "split"), config=config, device="cpu", tp_size=2)
    assert not mp.active_children()  # the other rank is gone too
    small = EngineConfig(runner=RunnerConfig(block_size=4, cpu_cache_tokens=64, max_model_len=32, cuda_graphs=False))
    with pytest.raises(EngineError, match="the KV cache is full"):  # the profile's calibration passage does not fit
        Engine(tiny_model("llama")[0].source, data_dir=str(tmp_path / "small"), config=small, device="cpu", tp_size=2)
    assert not mp.active_children() and not torch.distributed.is_initialized()

    engine = Engine(tiny_model("llama")[0].source, data_dir=str(tmp_path / "dead"), config=config, device="cpu", tp_size=2)
    from fieldprint.engine.sequence import SamplingParams

    assert engine.generate("Hello.", SamplingParams(max_tokens=2))[0].token_ids
    engine.tp.procs[0].kill()
    engine.tp.procs[0].join()
    with pytest.raises(EngineError, match=r"rank process\(es\) \['fieldprint-tp-1'\] died"):
        engine.generate("Hello again.", SamplingParams(max_tokens=2))
    engine.close()
    assert not mp.active_children()


SERVE_AND_WAIT = """
import sys, time
from fieldprint.engine.engine import Engine, EngineConfig
from fieldprint.engine.runner import RunnerConfig
config = EngineConfig(runner=RunnerConfig(block_size=4, cpu_cache_tokens=1024, max_model_len=512, anchor_blocks=16, cuda_graphs=False))
engine = Engine(sys.argv[1], data_dir=sys.argv[2], config=config, device="cpu", tp_size=2)
print(engine.tp.procs[0].pid, flush=True)
time.sleep(600)
"""


def test_the_other_ranks_exit_when_rank_0_is_killed(tiny_model, tmp_path):
    """SIGKILL of the serving process runs no cleanup: the mirror rank must notice and exit on its own."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-c", SERVE_AND_WAIT, tiny_model("llama")[0].source, str(tmp_path / "d")],
                            stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("rank 1 outlived the killed rank 0 by a minute")
    finally:
        proc.kill()


def test_a_split_engine_refuses_a_set_file_flipped_in_the_other_ranks_heads(tiny_model, tmp_path):
    """The byte lies in KV head 1, which only rank 1's pool holds: the check before use gathers every rank's
    heads and names the block."""
    import glob

    from fieldprint.engine.engine import Engine, EngineConfig
    from fieldprint.engine.runner import RunnerConfig
    from fieldprint.engine.sequence import SamplingParams
    from fieldprint.errors import AnchorError

    lm = tiny_model("llama")[0]
    folder = str(tmp_path / "two")
    first = _serve(lm.source, folder, 2, "int8")
    (path,) = glob.glob(os.path.join(folder, "anchor-sets", "*.fpas"))
    data = bytearray(open(path, "rb").read())
    body = data.index(b"\n", data.index(b"\n") + 1) + 1
    h, d, length = lm.args.num_kv_heads, lm.args.head_dim, first["anchor_tokens"]
    k_token, v_token = h * d, h * (d + 1)  # int8: V rows carry their exponent
    layer, token = 1, 20  # block 5 of 4-token blocks
    data[body + layer * length * (k_token + v_token) + length * k_token + token * v_token + (d + 1) + 3] ^= 0x10
    open(path, "wb").write(data)
    config = EngineConfig(runner=RunnerConfig(block_size=4, cpu_cache_tokens=1024, max_model_len=512, anchor_blocks=128,
                                              max_anchor_len=256, cuda_graphs=False))
    engine = Engine(lm.source, data_dir=folder, config=config, device="cpu", tp_size=2)
    try:
        with pytest.raises(AnchorError, match=f"layer {layer} V block 5 differs from what was committed"):
            engine.generate("Where do I live?", SamplingParams(max_tokens=2), anchors=first["ids"])
        assert not engine.runner.anchor_pool.sets
        assert engine.generate("Hello.", SamplingParams(max_tokens=2))[0].token_ids  # both ranks still serve
    finally:
        engine.close()
