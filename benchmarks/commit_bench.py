"""Does hashing K/V state slow decoding? A Llama-3-8B-shaped decode loop under five commit regimes.

(a) no hashing; (b) synchronous per layer: after every layer, copy that layer's K/V state to the
host and SHA-256 it (the original v2.5 design; "full" = the layer's whole K/V so far, "new" =
only this token's rows); (c) synchronous per token: the same once per decode step, for all
layers; (d) asynchronous per-session commit: fieldprint.engine.commit.Committer (side stream,
pinned copies, BLAKE3 in a child process, log append on a background thread) at the end of each
session; variants without per-block digests and with the hashing on a thread of this process.
Random weights, real shapes. Prints a table, writes benchmarks/results/commit_bench.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.dqp import DQPProfile  # noqa: E402
from fieldprint.engine.commit import Committer  # noqa: E402

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, layers=32, vocab=128256)


class DecodeStack:
    """A Llama-family decode step over a static [L, B, H_kv, T_max, D] cache, eager PyTorch."""

    def __init__(self, cfg: dict, batch: int, max_len: int, device: str, dtype: torch.dtype) -> None:
        self.cfg, self.batch, self.device, self.dtype = cfg, batch, device, dtype
        h, d, hk, f, L = cfg["hidden"], cfg["head_dim"], cfg["kv_heads"], cfg["ffn"], cfg["layers"]
        g = torch.Generator(device=device).manual_seed(0)

        def w(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

        self.wqkv = [w(h, (cfg["heads"] + 2 * hk) * d) for _ in range(L)]
        self.wo = [w(cfg["heads"] * d, h) for _ in range(L)]
        self.wgu = [w(h, 2 * f) for _ in range(L)]
        self.wd = [w(f, h) for _ in range(L)]
        self.norm = torch.ones(h, device=device, dtype=dtype)
        self.lm_head = w(h, cfg["vocab"])
        self.k = torch.randn(L, batch, hk, max_len, d, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.v = torch.randn(L, batch, hk, max_len, d, generator=g, device=device, dtype=torch.float32).to(dtype)
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = self.cos[pos], self.sin[pos]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)

    def layer(self, l: int, x: torch.Tensor, pos: int) -> torch.Tensor:
        cfg, b = self.cfg, self.batch
        nh, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        hn = F.rms_norm(x, (cfg["hidden"],), self.norm)
        q, k, v = (hn @ self.wqkv[l]).split((nh * d, hk * d, hk * d), dim=-1)
        q = self._rope(q.view(b, nh, d), pos)
        self.k[l, :, :, pos] = self._rope(k.view(b, hk, d), pos)
        self.v[l, :, :, pos] = v.view(b, hk, d)
        att = F.scaled_dot_product_attention(
            q.unsqueeze(2), self.k[l, :, :, : pos + 1], self.v[l, :, :, : pos + 1], enable_gqa=True
        )
        x = x + att.reshape(b, nh * d) @ self.wo[l]
        hn = F.rms_norm(x, (cfg["hidden"],), self.norm)
        gate, up = (hn @ self.wgu[l]).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.wd[l]

    def step(self, x: torch.Tensor, pos: int, after_layer=None) -> torch.Tensor:
        for l in range(self.cfg["layers"]):
            x = self.layer(l, x, pos)
            if after_layer is not None:
                after_layer(l, pos)
        logits = F.rms_norm(x, (self.cfg["hidden"],), self.norm) @ self.lm_head
        return logits.argmax(-1)


class GraphedDecode:
    """The same decode step captured once as a CUDA graph (gpt-fast style): the host only replays it.

    Static shapes: the position lives in a device tensor, attention covers the whole cache with
    keys past the position masked, and the query heads of one kv head attend as a group.
    """

    def __init__(self, m: DecodeStack) -> None:
        self.m = m
        dev = m.device
        self.x = torch.randn(m.batch, m.cfg["hidden"], device=dev, dtype=m.dtype) * 0.1
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.keys = torch.arange(m.k.shape[3], device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def _rope(self, z: torch.Tensor) -> torch.Tensor:
        c = self.m.cos.index_select(0, self.pos)
        s = self.m.sin.index_select(0, self.pos)
        z1, z2 = z[..., 0::2], z[..., 1::2]
        return torch.stack((z1 * c - z2 * s, z1 * s + z2 * c), dim=-1).flatten(-2)

    def _step(self) -> torch.Tensor:
        m, cfg, b = self.m, self.m.cfg, self.m.batch
        nh, hk, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        x = self.x
        mask = (self.keys <= self.pos).view(1, 1, 1, -1)
        for l in range(cfg["layers"]):
            hn = F.rms_norm(x, (cfg["hidden"],), m.norm)
            q, k, v = (hn @ m.wqkv[l]).split((nh * d, hk * d, hk * d), dim=-1)
            q = self._rope(q.view(b, nh, d))
            m.k[l].index_copy_(2, self.pos, self._rope(k.view(b, hk, d)).unsqueeze(2))
            m.v[l].index_copy_(2, self.pos, v.view(b, hk, d).unsqueeze(2))
            att = F.scaled_dot_product_attention(q.view(b, hk, nh // hk, d), m.k[l], m.v[l], attn_mask=mask)
            x = x + att.reshape(b, nh * d) @ m.wo[l]
            hn = F.rms_norm(x, (cfg["hidden"],), m.norm)
            gate, up = (hn @ m.wgu[l]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ m.wd[l]
        return (F.rms_norm(x, (cfg["hidden"],), m.norm) @ m.lm_head).argmax(-1)

    def session(self, prompt: int, steps: int) -> None:
        for i in range(steps):
            self.pos.fill_(prompt + i)
            self.graph.replay()


def sha256_host(t: torch.Tensor) -> bytes:
    """Synchronous device-to-host copy and SHA-256, the strawman."""
    return hashlib.sha256(t.contiguous().view(torch.int16).cpu().numpy().tobytes()).digest()


def run_session(m: DecodeStack, prompt: int, steps: int, hook=None, per_token=None) -> None:
    x = torch.randn(m.batch, m.cfg["hidden"], device=m.device, dtype=m.dtype) * 0.1
    for i in range(steps):
        pos = prompt + i
        m.step(x, pos, hook)
        if per_token is not None:
            per_token(pos)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128, help="decode steps per session")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--sync-steps", type=int, default=4, help="decode steps timed for the slow synchronous regimes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny dims for a CPU smoke run")
    ap.add_argument("--graphs", action="store_true", help="CUDA-graph decode; only (a) and the (d) variants")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "commit_bench.json"))
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.bfloat16 if a.small else torch.float32)
    cfg = dict(LLAMA3_8B, layers=a.layers)
    if a.small:
        cfg = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, layers=a.layers, vocab=1000)
    max_len = a.prompt + a.steps + 1
    m = DecodeStack(cfg, a.batch, max_len, dev, dtype)
    L, B, hk, d = cfg["layers"], a.batch, cfg["kv_heads"], cfg["head_dim"]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return B * steps / (time.perf_counter() - t0)

    # DQP profile from a calibration pass over the random cache (the same ranges the commits see).
    prof = DQPProfile.calibrate(
        [{(l, kind): (m.k if kind == "K" else m.v)[l, 0, :, : a.prompt].transpose(0, 1) for l in range(L) for kind in "KV"}],
        name="llama-3-8b-bench", num_layers=L, num_kv_heads=hk, head_dim=d, block_size=16,
    )

    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.note import generate_key

    tmp = tempfile.mkdtemp()
    signer, _ = generate_key("bench.example/fieldprint-log")
    log = TransparencyLog.open(os.path.join(tmp, "log.sqlite"), signer, batch_size=64, batch_wait_ms=5)
    committer = Committer(log, prof, max_pending=2 * B, digest_threads=1, block_digests=True, digest_process=True)
    lean = Committer(log, prof, max_pending=2 * B, digest_threads=1, block_digests=False, digest_process=True)
    in_thread = Committer(log, prof, max_pending=2 * B, digest_threads=1, block_digests=True, digest_process=False)
    committers = {"d_async_session": committer, "d_async_session_no_block_digests": lean,
                  "d_async_session_digest_in_thread": in_thread}

    def commit_session(session: int, c: Committer = committer) -> None:
        t = a.prompt + a.steps
        tickets = [c.submit_stack(m.k[:, b, :, :t].transpose(1, 2), m.v[:, b, :, :t].transpose(1, 2),
                                  session=f"bench-{session}-{b}") for b in range(B)]  # one entry per sequence
        for ticket in tickets:  # the next session overwrites the cache: order it after the quantizer's reads
            ticket.wait_quantized()

    graphed = GraphedDecode(m) if a.graphs else None

    def decode(steps: int) -> None:
        if graphed is not None:
            graphed.session(a.prompt, steps)
        else:
            run_session(m, a.prompt, steps)

    def regime_a() -> None:
        for _ in range(a.sessions):
            decode(a.steps)

    counter = [0]

    def regime_d(c: Committer = committer) -> None:
        for _ in range(a.sessions):
            decode(a.steps)
            counter[0] += 1
            commit_session(counter[0], c)

    def hook_full(l: int, pos: int) -> None:
        sha256_host(torch.stack((m.k[l, :, :, : pos + 1], m.v[l, :, :, : pos + 1])))

    def hook_new(l: int, pos: int) -> None:
        sha256_host(torch.stack((m.k[l, :, :, pos], m.v[l, :, :, pos])))

    def token_full(pos: int) -> None:
        sha256_host(torch.stack((m.k[:, :, :, : pos + 1], m.v[:, :, :, : pos + 1])))

    def token_new(pos: int) -> None:
        sha256_host(torch.stack((m.k[:, :, :, pos], m.v[:, :, :, pos])))

    n_fast = a.sessions * a.steps
    regimes = {
        "a_no_hash": (lambda: regime_a(), n_fast),
        "b_sync_layer_full": (lambda: run_session(m, a.prompt, a.sync_steps, hook=hook_full), a.sync_steps),
        "b_sync_layer_new": (lambda: run_session(m, a.prompt, a.sync_steps * 4, hook=hook_new), a.sync_steps * 4),
        "c_sync_token_full": (lambda: run_session(m, a.prompt, a.sync_steps, per_token=token_full), a.sync_steps),
        "c_sync_token_new": (lambda: run_session(m, a.prompt, a.sync_steps * 4, per_token=token_new), a.sync_steps * 4),
        "d_async_session": (lambda: regime_d(), n_fast),
        "d_async_session_no_block_digests": (lambda: regime_d(lean), n_fast),
        "d_async_session_digest_in_thread": (lambda: regime_d(in_thread), n_fast),
    }
    if graphed is not None:  # the synchronous strawmen are measured eagerly; see the eager run
        regimes = {k: v for k, v in regimes.items() if k.startswith(("a_", "d_"))}
    # warm up: kernels, cuBLAS handles, the quantizer's compile, pinned buffers, the log
    decode(2)
    for c in committers.values():
        regime_d(c)
        c.flush()
    results = {name: [] for name in regimes}
    flush_s = {name: [] for name in committers}
    for _ in range(a.repeats):
        for name, (fn, steps) in regimes.items():  # interleaved, so drift hits every regime alike
            results[name].append(timed(fn, steps))
            if name in flush_s:
                t0 = time.perf_counter()
                receipts = committers[name].flush()
                flush_s[name].append(time.perf_counter() - t0)
                assert len(receipts) == a.sessions * B
    for c in committers.values():
        c.close()
    log.close()
    base = statistics.median(results["a_no_hash"])
    rows = {}
    for name, vals in results.items():
        med = statistics.median(vals)
        rows[name] = dict(tokens_per_s=med, all=vals, ratio_to_a=med / base, slowdown_x=base / med)
    session_s = B * n_fast / base
    for name, fl in flush_s.items():
        run_s = B * n_fast / statistics.median(results[name])
        rows[name]["tail_flush_s_median"] = statistics.median(fl)
        rows[name]["ratio_to_a_including_tail_flush"] = (B * n_fast / (run_s + statistics.median(fl))) / base
    state_bytes = L * 2 * B * hk * (a.prompt + a.steps) * d * 2
    out = dict(
        bench="commit_bench", device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__, triton=__import__("triton").__version__, python=platform.python_version(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), dtype=str(dtype), config=cfg, batch=B,
        decode_loop="cuda_graph" if graphed is not None else "eager",
        prompt=a.prompt, steps_per_session=a.steps, sessions=a.sessions, repeats=a.repeats,
        session_state_bytes_bf16=state_bytes, timed_seconds_a=session_s, results=rows,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"commit_bench ({out['decode_loop']}) on {out['device']}: L={L} B={B} prompt={a.prompt} steps={a.steps}x{a.sessions} sessions")
    print(f"{'regime':22s} {'tokens/s':>10s} {'vs (a)':>8s} {'slowdown':>9s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['tokens_per_s']:10.1f} {r['ratio_to_a']:8.3f} {r['slowdown_x']:8.1f}x")
    for name in flush_s:
        print(f"{name}: tail flush after the last session {rows[name]['tail_flush_s_median'] * 1e3:.1f} ms; "
              f"ratio incl. tail flush {rows[name]['ratio_to_a_including_tail_flush']:.3f}")


if __name__ == "__main__":
    main()
