"""Where the decode kernel's warps stall: one launch for Nsight Compute, and a summary of its report.

    python3 benchmarks/gpu/ncu_decode.py run B CTX none|bf16|int8      # what ncu profiles (see below)
    python3 benchmarks/gpu/ncu_decode.py summarize OUT.json NAME=SASS.csv[,DETAILS.txt] ...

`run` plans the engine's decode shape (Llama-3.2-1B attention: 32 query heads, 8 KV heads, D=64,
16-token pages, a 2k-token anchor set shared by the batch) and launches it six times. Profile it with

    ncu --clock-control none -k regex:_decode_kernel --launch-skip 4 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        --section SourceCounters -o REPORT python3 benchmarks/gpu/ncu_decode.py run 128 64 int8
    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > SASS.csv
    ncu -i REPORT.ncu-rep --page details > DETAILS.txt

`summarize` cuts each per-instruction table into runs of instructions executed equally often (a
loop body, a prologue, the merge), and writes each run's share of the stall samples and its top
stall reasons: with a short context (64 tokens) the anchor items' share shows what they cost.
"""

from __future__ import annotations

import csv
import json
import sys


def run(bsz: int, ctx: int, kind: str) -> None:
    import os

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    import benchmarks.attention_bench as ab
    from fieldprint.kernels.paged_attention import plan_decode

    ab.DEV = "cuda"
    k, v, bt, lens = ab.paged(bsz, ctx, 8, 64, 16, dtype=torch.bfloat16)
    q = torch.randn(bsz, 32, 64, dtype=torch.bfloat16, device="cuda")
    a = (None, None) if kind == "none" else ab.anchor_set(1, 2048, 8, 64, 16, torch.zeros(bsz, device="cuda"),
                                                          int8=kind == "int8", dtype=torch.bfloat16)
    plan = plan_decode(q, k, v, bt, lens, *a, check=False)
    out = torch.empty_like(q)
    for _ in range(6):
        plan.run(q, k, v, a[0], out=out)
    torch.cuda.synchronize()
    print({x: plan.launch.constexprs[x] for x in ("S_CTX", "S_ANC", "TILE_SEQ", "M_ANC")}, "grid", plan.launch.grid)


def regions(path: str) -> dict:
    """Runs of equally executed instructions with >= 1% of the samples: share and top stall reasons."""
    with open(path) as f:
        rows = [r for r in csv.reader(f)]
    head = next(i for i, r in enumerate(rows) if "Address" in r)
    hdr, data = rows[head], rows[head + 1:]
    col = {n: hdr.index(n) for n in ("Address", "Warp Stall Sampling (All Samples)", "Instructions Executed")}
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    base = int(data[0][col["Address"]], 16)
    runs: list[dict] = []
    for r in data:
        ex = int(r[col["Instructions Executed"]] or 0)
        if not runs or runs[-1]["executed"] != ex:
            runs.append({"offset": hex(int(r[col["Address"]], 16) - base), "executed": ex, "instructions": 0,
                         "samples": 0, "stalls": [0] * len(reasons)})
        g = runs[-1]
        g["instructions"] += 1
        g["samples"] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for j, i in enumerate(reasons):
            g["stalls"][j] += int(r[i] or 0)
    total = sum(g["samples"] for g in runs)
    out = []
    for g in runs:
        if g["samples"] >= 0.01 * total:
            top = sorted(zip(g.pop("stalls"), (hdr[i][len("stall_"):] for i in reasons)), reverse=True)[:4]
            out.append({**g, "share": round(g["samples"] / total, 4), "top_stalls": {n: c for c, n in top}})
    return {"total_samples": total, "regions": out}


def details(path: str) -> dict:
    """The launch's duration, registers and occupancy from ncu's details page."""
    want = {"Duration": "duration_us", "Registers Per Thread": "registers", "Achieved Occupancy": "achieved_occupancy_pct",
            "Theoretical Occupancy": "theoretical_occupancy_pct", "Grid Size": "grid"}
    out = {}
    with open(path) as f:
        for line in f:
            for name, key in want.items():
                if line.strip().startswith(name + " ") and key not in out:
                    out[key] = float(line.split()[-1].replace(",", ""))
    return out


def summarize(spec: str) -> dict:
    sass, _, detail = spec.partition(",")
    return {**(details(detail) if detail else {}), **regions(sass)}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "run":
        run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) >= 4 and sys.argv[1] == "summarize":
        result = {name: summarize(spec) for name, spec in (a.split("=", 1) for a in sys.argv[3:])}
        with open(sys.argv[2], "w") as f:
            json.dump(result, f, indent=1)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
