"""Shared fixtures of the engine tests: SmolLM2 (loaded once per session), tiny random models in HF
safetensors folders with their transformers twins, runners, a log, and step helpers.

Every comparison runs our forward and transformers' on the very same weights in fp32 with eager
attention, so what is left between them is floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import blake3
import pytest
import torch

from fieldprint.canon import tag_digest
from fieldprint.engine import loader
from fieldprint.engine.loader import LoadedModel, load_model
from fieldprint.engine.runner import ModelRunner, RunnerConfig
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.note import generate_key

# Tiny architectures: (transformers config class name, its arguments). The SmolLM2 tokenizer is
# saved beside each, so the vocabulary is its 49152 tokens.
TINY = {
    # 4 query heads over 2 KV heads (group 2), untied LM head
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)),
    # group 3 (not a power of two) and head_dim * heads != hidden_size
    "llama-gqa3": ("LlamaConfig", dict(hidden_size=96, intermediate_size=128, num_attention_heads=6,
                                       num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Llama 3 long-context RoPE: positions past original_max_position_embeddings take the scaled path
    "llama3-rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=32, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Mistral without a sliding window (v0.2 on)
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=1, sliding_window=None)),
    # q/k/v biases
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, use_sliding_window=False)),
    # q/k RMSNorm per head, explicit head_dim
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, use_sliding_window=False)),
}


@dataclass
class SmolLM2:
    """SmolLM2-135M-Instruct as our engine loaded it, and the HF-named tensors it was built from."""

    lm: LoadedModel
    tensors: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    """The offline default model, loaded once per session (de-quantizing the GGUF takes ~20 s).

    The HF reference needs the same tensors; `read_tensors` is wrapped for the duration of the one
    load so that its result is kept instead of de-quantizing the file a second time.
    """
    kept = {}
    real = loader.read_tensors

    def keep(*args):
        kept["tensors"] = real(*args)
        return kept["tensors"]

    loader.read_tensors = keep
    try:
        lm = load_model(loader.SMOLLM2, device="cpu")
    finally:
        loader.read_tensors = real
    return SmolLM2(lm, kept["tensors"])


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' LlamaForCausalLM on SmolLM2's tensors: fp32, eager attention."""
    from transformers import AutoModelForCausalLM

    folder, gguf = loader.resolve_source(loader.SMOLLM2)
    config = loader._hf_config(folder, gguf)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    result = hf.load_state_dict(smollm2.tensors, strict=False)
    # lm_head is tied to the embeddings: the only key a GGUF does not carry
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    hf.tie_weights()
    return hf.eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is peaked and every term matters (HF's init is near-uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (3.0 if "embed" not in name else 1.0))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (the loader's cached conversion): the tiny models need no weights from it."""
    folder, gguf = loader.resolve_source(loader.SMOLLM2)
    return loader.load_tokenizer(folder, gguf, loader._cache_dir(folder, gguf))


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer, tmp_path_factory):
    """tiny_model(name) -> (our LoadedModel, the transformers model it was saved from), built once per name."""
    import transformers

    built = {}

    def make(name: str):
        if name not in built:
            cls_name, kwargs = TINY[name]
            config = getattr(transformers, cls_name)(
                vocab_size=len(smollm2_tokenizer), num_hidden_layers=2, max_position_embeddings=1024,
                rms_norm_eps=1e-5, **{"tie_word_embeddings": False, **kwargs})
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
            _randomize(hf, seed=len(name))
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder, safe_serialization=True)
            smollm2_tokenizer.save_pretrained(folder)
            built[name] = (load_model(str(folder), device="cpu"), hf.eval())
        return built[name]

    return make


@pytest.fixture
def make_runner():
    """A CPU ModelRunner with small pools (overrides by keyword)."""

    def make(lm: LoadedModel, **overrides) -> ModelRunner:
        cfg = dict(block_size=4, cpu_cache_tokens=2048, max_model_len=1024, anchor_blocks=128, max_anchor_len=256,
                   anchor_dtype="model", cuda_graphs=False)
        return ModelRunner(lm, RunnerConfig(**{**cfg, **overrides}))

    return make


@pytest.fixture
def log(tmp_path):
    """A transparency log in tmp_path with its verifier key; closed at the end of the test."""
    signer, verifier = generate_key("test.example/engine")
    lg = TransparencyLog.open(tmp_path / "log.sqlite", signer, batch_size=8, batch_wait_ms=1, checkpoint_interval_s=None)
    lg.verifier = verifier
    yield lg
    lg.close()


def state_id(text: str) -> str:
    """A content-addressed state id for test anchors."""
    return tag_digest("blake3", blake3.blake3(text.encode()).digest())


def step(runner: ModelRunner, seqs: list[Sequence], counts: list[int]) -> torch.Tensor:
    """Run `counts[i]` new tokens of each sequence; fp32 logits [sum(counts), vocab] at EVERY new token."""
    for s, n in zip(seqs, counts):
        runner.blocks.grow(s.block_table, s.num_cached + n)
    with torch.inference_mode():
        ids, pos, ctx = runner.prepare(seqs, counts)
        logits = runner.model.logits(runner.model(ids, pos, ctx))
    for s, n in zip(seqs, counts):
        s.num_cached += n
    return logits


def greedy(runner: ModelRunner, seqs: list[Sequence], new_tokens: int) -> list[torch.Tensor]:
    """Prefill then decode `new_tokens` greedy tokens for every sequence in one batch (runner.forward/sample).

    Returns each step's logits [B, vocab]; the tokens land in each sequence's output_ids.
    """
    out = []
    for _ in range(new_tokens):
        counts = [len(s) - s.num_cached for s in seqs]
        for s in seqs:
            runner.blocks.grow(s.block_table, len(s))
        logits = runner.forward(seqs, counts)
        for s, n in zip(seqs, counts):
            s.num_cached += n
        for s, tok in zip(seqs, runner.sample(seqs, logits)):
            s.output_ids.append(tok)
        out.append(logits)
    return out


def new_seq(ids: list[int], max_tokens: int = 64, **kw) -> Sequence:
    return Sequence(list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)


@pytest.fixture
def engine_ops():
    """The step helpers above, for the test modules (conftest modules are not importable by name)."""
    return SimpleNamespace(step=step, greedy=greedy, new_seq=new_seq, state_id=state_id)


@pytest.fixture
def one_thread():
    """One intra-op thread for long CPU decodes: on a small, shared machine more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
