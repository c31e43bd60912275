"""DQP on the GPU: identical codes to the CPU reference (bf16, fp16, fp32), and quantize + digest throughput.

1. Identity: random states (with exact ties, saturating and tiny values) quantized by the Triton
   kernel and by the CPU reference must give the same codes and digests.
2. Throughput: the kernel alone (GB/s of bf16 input, fraction of the copy bandwidth floor), the
   digest stage alone in one process, and end to end through the Committer (quantize on a side
   stream, pinned D2H, the state and per-block BLAKE3 digests in `digest_workers` child
   processes over shared memory, one log append) for a Llama-3-8B-shaped sequence of K/V.
Prints a table, writes benchmarks/results/quant_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.dqp import DQPProfile, QuantizedState, quantize_codes  # noqa: E402
from fieldprint.engine.commit import Committer, default_digest_workers  # noqa: E402
from fieldprint.kernels.quant import quantize_async, stack_inverse_scales  # noqa: E402


def identity_check(dev: str, layers: int, h: int, d: int) -> list[dict]:
    """Kernel vs CPU reference on varied states; returns one row per case with the mismatch count."""
    g = torch.Generator().manual_seed(7)
    sample = {(l, k): torch.randn(256, h, d, generator=g) * (1 + l) for l in range(layers) for k in "KV"}
    prof = DQPProfile.calibrate([sample], name="identity", num_layers=layers, num_kv_heads=h, head_dim=d)
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for t in (1, 17, 1000, 4096):
            for layer in (0, layers - 1):
                for kind in "KV":
                    e = prof.exponents(layer, kind)
                    x = torch.randn(t, h, d, generator=g) * (1 + layer) * 1.5
                    scale = torch.from_numpy(np.ldexp(np.float32(1), e))
                    x[:: max(1, t // 7)] = (torch.randint(-140, 140, (len(range(0, t, max(1, t // 7))), h, d), generator=g) + 0.5) * scale
                    if t > 2:
                        x[1, 0, :4] = torch.tensor([1e-30, -1e-38, 6e4, -6e4])  # tiny and saturating values
                    x = x.to(dtype)
                    ref = quantize_codes(x, e)
                    got, bad = quantize_async(x.to(dev), stack_inverse_scales(prof, [layer], kind, dev)[0])
                    got = got.cpu()
                    same_digest = QuantizedState(got, e, str(dtype)[6:], layer, kind, 16).digest() == \
                        QuantizedState(ref, e, str(dtype)[6:], layer, kind, 16).digest()
                    rows.append(dict(dtype=str(dtype)[6:], T=t, layer=layer, kind=kind, elements=x.numel(),
                                     mismatches=int((got != ref).sum()), bad=int(bad.item()), same_digest=same_digest))
    return rows


def paged_commit_cost(k: torch.Tensor, v: torch.Tensor, inv: torch.Tensor, page: int = 16) -> dict:
    """What committing one sequence costs the forward stream: before, a gathered copy of its K and V out of
    the paged cache (the quantizer then read the copy on the side stream); now, the wait for the
    block-table quantizer reading the blocks in place (K per channel, V per row). Codes must agree."""
    import triton.testing

    from fieldprint.kernels.quant import quantize_paged

    L, T, h, d = k.shape
    nb = T // page
    order = torch.randperm(2 * nb, device=k.device)[:nb]  # the sequence's blocks, scattered over a pool twice its size
    pools = []
    for x in (k, v):
        pool = torch.zeros(L, 2 * nb, page, h, d, dtype=x.dtype, device=x.device)
        pool[:, order] = x.view(L, nb, page, h, d)
        pools.append(pool)
    table = order.to(torch.int32)
    gather_ms = triton.testing.do_bench(lambda: [p[:, order].flatten(1, 2)[:, :T] for p in pools], warmup=20, rep=200,
                                        return_mode="median")
    paged_ms = triton.testing.do_bench(lambda: (quantize_paged(pools[0], table, T, inv), quantize_paged(pools[1], table, T, None)),
                                       warmup=20, rep=200, return_mode="median")
    same = (torch.equal(quantize_paged(pools[0], table, T, inv)[0], quantize_async(k, inv)[0])
            and torch.equal(quantize_paged(pools[1], table, T, None)[0], quantize_async(v, None)[0]))
    parts = {  # each launch alone, us: fixed per-channel K and per-row V, contiguous and paged
        name: triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median") * 1e3 for name, fn in [
            ("k_contiguous", lambda: quantize_async(k, inv)), ("v_rows_contiguous", lambda: quantize_async(v, None)),
            ("k_paged", lambda: quantize_paged(pools[0], table, T, inv)),
            ("v_rows_paged", lambda: quantize_paged(pools[1], table, T, None))]}
    return dict(gather_copy_us=gather_ms * 1e3, paged_quantize_us=paged_ms * 1e3, ratio=paged_ms / gather_ms,
                codes_equal_contiguous=same, launches_us=parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="1,2,4,8", help="digest worker processes to measure, with block digests on")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quant_bench.json"))
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    h, d = (8, 128) if not a.small else (2, 64)
    L, T = a.layers, a.tokens
    ident = identity_check(dev, 4, h, d)
    ident_ok = all(r["mismatches"] == 0 and r["same_digest"] for r in ident)

    g = torch.Generator(device=dev).manual_seed(3)
    k = torch.randn(L, T, h, d, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(L, T, h, d, generator=g, device=dev).to(torch.bfloat16)
    prof = DQPProfile.calibrate([{(l, kind): (k if kind == "K" else v)[l, :256].cpu() for l in range(L) for kind in "KV"}],
                                name="llama-3-8b-quant", num_layers=L, num_kv_heads=h, head_dim=d, block_size=16)
    inv = stack_inverse_scales(prof, list(range(L)), "K", dev)
    in_bytes = k.numel() * 2

    kernel = {}
    if cuda:
        import triton.testing

        out = torch.empty(k.shape, dtype=torch.int8, device=dev)
        ms = triton.testing.do_bench(lambda: quantize_async(k, inv, out=out), warmup=50, rep=300, return_mode="median")
        buf = torch.empty_like(k)
        copy_ms = triton.testing.do_bench(lambda: buf.copy_(k), warmup=50, rep=300, return_mode="median")
        copy_bw = 2 * in_bytes / copy_ms / 1e6  # GB/s, read + write
        floor_ms = k.numel() * 3 / copy_bw / 1e6  # the quantizer moves 2 bytes in + 1 byte out per element
        kernel = dict(ms=ms, input_GBps=in_bytes / ms / 1e6, moved_GBps=k.numel() * 3 / ms / 1e6,
                      copy_GBps=copy_bw, floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
        kernel["paged"] = paged_commit_cost(k, v, inv)

    # Stages on their own: pinned D2H of the codes and BLAKE3 block digests by thread count.
    codes, _ = quantize_async(k, inv)
    host = torch.empty(codes.shape, dtype=torch.int8, pin_memory=cuda)
    d2h = []
    for _ in range(a.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.copy_(codes, non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
        d2h.append(time.perf_counter() - t0)
    # Digest stage alone, in this process: state + block digests, and the state digest only on 1 or 4 BLAKE3 threads.
    digest = {}
    for label, blocks, n in [("top+blocks/1t", True, 1), ("top-only/1t", False, 1), ("top-only/4t", False, 4)]:
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for l in range(L):
                QuantizedState(host[l], prof.exponents(l, "K"), "bfloat16", l, "K", 16).digest(blocks=blocks, threads=n)
            times.append(time.perf_counter() - t0)
        digest[label] = dict(blocks=blocks, threads=n, s=statistics.median(times), codes_GBps=host.numel() / statistics.median(times) / 1e9)

    # End to end through the committer: K and V of one sequence, submit_stack + flush.
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.note import generate_key

    signer, _ = generate_key("bench.example/fieldprint-log")
    log = TransparencyLog.open(os.path.join(tempfile.mkdtemp(), "log.sqlite"), signer, batch_size=16, batch_wait_ms=1)
    # (label, block digests, worker processes, BLAKE3 threads per state digest)
    configs = [(f"top+blocks/{w}w", True, w, 1) for w in [int(x) for x in a.workers.split(",")]]
    configs += [("top-only/1w", False, 1, 1), ("top-only/1w4t", False, 1, 4)]
    e2e = {}
    for label, blocks, w, n in configs:
        committer = Committer(log, prof, max_pending=4, digest_threads=n, block_digests=blocks, digest_process=True,
                              digest_workers=w)
        committer.submit_stack(k, v, session="warm")
        committer.flush()
        times = []
        for r in range(a.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            committer.submit_stack(k, v, session=f"e2e-{label}-{r}")
            committer.flush()
            times.append(time.perf_counter() - t0)
        committer.close()
        med = statistics.median(times)
        gbps = 2 * in_bytes / med / 1e9
        e2e[label] = dict(blocks=blocks, workers=w, threads=n, shm_fallbacks=committer.shm_fallbacks, s=med,
                          bf16_input_GBps=gbps, ratio_to_goal=gbps / 5.0)
    # The committer's GPU path against the CPU reference: same per-state digests and block digests;
    # a NaN in one state fails that commit (CommitError on flush) and logs nothing.
    from fieldprint.dqp import quantize as quantize_ref
    from fieldprint.errors import CommitError

    # The parallel path (4 workers, blocks of one state split between them) against the reference.
    committer = Committer(log, prof, max_pending=4, digest_process=True, digest_workers=4)
    kk, vv = k[:, :300].clone(), v[:, :300].clone()
    ticket = committer.submit_stack(kk, vv, session="check")
    receipt = committer.flush()[0]
    same = all(
        receipt.states[(l, kind)] == (ref := quantize_ref((kk if kind == "K" else vv)[l].cpu(), prof, l, kind)).digest()
        and receipt.blocks[(l, kind)] == ref.blocks
        for l in range(L) for kind in "KV"
    )
    same = same and ticket.future.result() is receipt
    size_before = log.size
    vv[-1, 17, 1, 5] = float("nan")
    committer.submit_stack(kk, vv, session="nan")
    try:
        committer.flush()
        nan_refused = False
    except CommitError as e:
        nan_refused = "NaN" in str(e) and log.size == size_before
    committer.close()
    log.close()
    out = dict(
        bench="quant_bench", device=torch.cuda.get_device_name() if cuda else "cpu-only smoke run",
        cpu_count=os.cpu_count(), torch=torch.__version__, triton=__import__("triton").__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        stack_shape=[L, T, h, d], bf16_bytes_per_stack=in_bytes, identity_ok=ident_ok, identity=ident,
        kernel=kernel, d2h=dict(s=statistics.median(d2h), GBps=host.numel() / statistics.median(d2h) / 1e9),
        digest_by_config=digest, end_to_end_by_config=e2e, goal_GBps=5.0,
        default_digest_workers=default_digest_workers(),
        committer_gpu_digests_equal_cpu_reference=same, committer_refuses_nan=nan_refused,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    n_cases = len(ident)
    print(f"quant_bench on {out['device']}: stack [L={L}, T={T}, H={h}, D={d}] bf16, {in_bytes / 1e6:.0f} MB per K or V")
    print(f"identity CPU reference vs kernel: {sum(r['mismatches'] == 0 and r['same_digest'] for r in ident)}/{n_cases} cases identical "
          f"({sum(r['elements'] for r in ident)} elements, bf16/fp16/fp32)")
    print(f"committer GPU path = CPU reference digests: {same}; NaN refused, nothing logged: {nan_refused}")
    if kernel:
        print(f"kernel: {kernel['ms'] * 1e3:.0f} us, {kernel['input_GBps']:.0f} GB/s bf16 in, {kernel['moved_GBps']:.0f} GB/s moved; "
              f"copy floor {kernel['floor_ms'] * 1e3:.0f} us ({kernel['fraction_of_floor']:.2f} of floor)")
    if kernel:
        pg = kernel["paged"]
        print(f"forward-stream cost of one sequence's commit (K+V): gathered copy {pg['gather_copy_us']:.0f} us before, "
              f"block-table quantizer {pg['paged_quantize_us']:.0f} us now ({pg['ratio']:.2f}x); codes equal: "
              f"{pg['codes_equal_contiguous']}; alone, us: " + ", ".join(f"{n} {t:.0f}" for n, t in pg["launches_us"].items()))
    print(f"pinned D2H of codes: {out['d2h']['GBps']:.1f} GB/s; digest stage in one process, GB/s of codes: "
          + ", ".join(f"{n} {r['codes_GBps']:.2f}" for n, r in digest.items()))
    print(f"end to end through the committer, K+V {2 * in_bytes / 1e6:.0f} MB bf16, goal 5 GB/s; {os.cpu_count()} host cores")
    print(f"{'config':>16s} {'workers':>7s} {'threads':>7s} {'ms':>7s} {'GB/s bf16':>9s} {'x goal':>6s}")
    for n, r in e2e.items():
        print(f"{n:>16s} {r['workers']:7d} {r['threads']:7d} {r['s'] * 1e3:7.1f} {r['bf16_input_GBps']:9.2f} {r['ratio_to_goal']:6.2f}"
              + (f"  ({r['shm_fallbacks']} commits hashed in-process: /dev/shm full)" if r["shm_fallbacks"] else ""))


if __name__ == "__main__":
    main()
