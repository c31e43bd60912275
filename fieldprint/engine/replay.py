"""Replay a receipt: re-run its generation from the receipt alone and compare the output.

A receipt carries everything a replay needs besides the weights: the model id, the anchor states'
texts (checked against their logged digests by `verify_receipt`), the anchor set's manifest (its
tokens, encoding and DQP profile digest), the prompt's token ids and the sampling parameters. The
replay recompiles the anchors without a log (same texts -> same tokens -> prefill -> the profile
calibrated the same way -> codes), then decodes: greedily, or with the receipt's sampling parameters
and seed (a sampled token's draw depends on the seed and the token's index alone,
fieldprint/engine/sampling.py; the engine logs the seed a request without one drew, so only receipts
from before that lack it). Floating-point results depend on the
hardware and the kernels: the report says whether the recomputed anchor blocks are bitwise the
committed ones and where the output first differs; on the hardware that generated it, both match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fieldprint.engine.anchors import (
    AnchorCompiler,
    blocks_root,
    calibrate_profile,
    digest_blocks,
    prefill_kv,
    quantize_stack,
    token_digest,
)
from fieldprint.engine.runner import ModelRunner, RunnerConfig
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.engine.tp import put_anchor_states
from fieldprint.errors import EngineError, ReceiptError


@dataclass(slots=True)
class ReplayReport:
    output_equal: bool
    first_difference: int | None  # index of the first differing output token
    anchors_bitwise_equal: bool | None  # None: the generation had no anchors
    tokens: int

    def summary(self) -> str:
        anchors = ("" if self.anchors_bitwise_equal is None else
                   f"; recomputed anchor blocks {'bitwise equal to' if self.anchors_bitwise_equal else 'differ from'} the committed ones")
        if self.output_equal:
            return f"replay: the same {self.tokens} output tokens{anchors}"
        return f"replay: output differs from token {self.first_difference} of {self.tokens}{anchors}"


def _replay_params(sampling: dict, tokens: int) -> SamplingParams:
    """The receipt's sampling parameters, to draw exactly `tokens` tokens (stops and EOS then do not end it)."""
    try:
        params = SamplingParams(temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
                                top_k=sampling["top_k"], seed=sampling.get("seed"), max_tokens=max(1, tokens),
                                ignore_eos=True)
    except (EngineError, KeyError, TypeError, ValueError) as e:
        raise ReceiptError(f"the receipt's sampling parameters cannot be replayed: {e!r}") from None
    if not params.greedy and params.seed is None:
        raise ReceiptError("an unseeded sampled generation cannot be replayed: this receipt does not hold the seed "
                           "its draws came from (made by an engine from before drawn seeds were recorded)")
    return params


def replay_receipt(receipt: dict, model: str, device: str | None = None) -> ReplayReport:
    """Re-run a verified receipt's generation (greedy, or sampled with a seed) with `model` (a path, or 'smollm2')."""
    from fieldprint.engine.loader import load_model

    params = _replay_params(receipt["sampling"], len(receipt["output"]["token_ids"]))
    lm = load_model(model, device=device)
    if lm.model_id != receipt["model"]["id"]:
        raise ReceiptError(f"model {model} has id {lm.model_id}; the receipt's output came from {receipt['model']['id']}")
    prompt, output = list(receipt["prompt"]["token_ids"]), list(receipt["output"]["token_ids"])
    anchors = receipt.get("anchors")
    manifest = anchors["set"]["manifest"] if anchors else None
    int8 = manifest is not None and manifest["encoding"] == "int8"
    length = len(prompt) + len(output) + 1
    runner = ModelRunner(lm, RunnerConfig(block_size=manifest["block_size"] if manifest else 16,
                                          cpu_cache_tokens=length + 2048, num_blocks=None,  # + the calibration passage
                                          max_model_len=length, max_anchor_len=manifest["tokens"] if manifest else 16,
                                          anchor_blocks=-(-manifest["tokens"] // manifest["block_size"]) if manifest else 1,
                                          anchor_dtype="int8" if int8 else "model"))
    seq = Sequence(prompt, params)
    bitwise = None
    if manifest is not None:
        profile = calibrate_profile(runner, "model") if int8 else None
        if int8 and profile.digest != manifest["profile"]:
            raise ReceiptError("the DQP profile calibrated here differs from the one the anchors were compiled with "
                               "(another model build or another machine's arithmetic)")
        compiler = AnchorCompiler(runner, None, None, profile, None)
        ids = compiler.anchor_tokens([s["text"] for s in anchors["states"]])
        if token_digest(ids) != manifest["token_digest"]:
            raise ReceiptError("this tokenizer renders the anchors into other tokens than the receipt's anchor set")
        k, v = prefill_kv(runner, ids)
        if int8:
            k, v = quantize_stack(k, v, profile)
        slot = runner.anchor_pool.reserve("replay", len(ids))
        put_anchor_states(runner, slot.blocks, k, v)
        bitwise = blocks_root(digest_blocks(runner, slot.blocks, len(ids))) == manifest["blocks_root"]
        seq.anchor_key, seq.anchor_len = "replay", len(ids)
    runner.blocks.grow(seq.block_table, length)
    with torch.inference_mode():
        logits = runner.forward([seq], [len(prompt)])
        seq.num_cached = len(prompt)
        for _ in range(len(output)):
            seq.output_ids.append(runner.sample([seq], logits)[0])
            logits = runner.forward([seq], [1])
            seq.num_cached += 1
    got = seq.output_ids
    first = next((i for i, (a, b) in enumerate(zip(got, output)) if a != b), None)
    return ReplayReport(first is None and token_digest(got) == receipt["output"]["digest"], first, bitwise, len(output))
