"""A CPU stage's optimizer step: torch's AdamW one tensor at a time (the CPU stages' optimizer
until 2026-12-03) against fused AdamW (now), as a stage worker steps (the gradient norm, the
clipping scale, the step, the gradients zeroed), on Llama blocks of a benchmark shape.

Each configuration runs in its own process, with and without the stage workers' malloc
settings (``runtime.malloc_mmap_threshold_kb``: every tensor of 128 KB and up is mapped on its
own, so an optimizer's temporaries are fresh pages each step). Figures are the median of
``--repeats`` steps after two warm-up steps, per block.

    python bench/optim_cpu.py --shape medium --blocks 4 --out bench/results/optim-cpu.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, write_record  # noqa: E402
from shapes import LLAMA_SHAPES  # noqa: E402

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def child(args: argparse.Namespace) -> None:
    """In a fresh process: time one optimizer kind; print one JSON line."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaModel

    from partitioners.profile import sum_of_squares

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA_SHAPES[args.shape], "num_hidden_layers": args.blocks})
    model = LlamaModel(cfg).to(getattr(torch, args.dtype))
    model.embed_tokens = None  # blocks only: inputs_embeds below
    x = torch.randn(2, 64, cfg.hidden_size, dtype=getattr(torch, args.dtype))
    model(inputs_embeds=x).last_hidden_state.float().sum().backward()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **KINDS[args.kind])

    def step() -> None:
        grads = [p.grad for p in params]
        sum_of_squares(grads)
        for g in grads:
            g.mul_(0.5)
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"ms_per_block": statistics.median(times) / args.blocks, "times_ms": times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="medium", choices=sorted(LLAMA_SHAPES))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=["loop", "fused"], choices=sorted(KINDS))
    ap.add_argument("--malloc-kb", nargs="+", type=int, default=[0, 128], help="0: glibc's default malloc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.kind = args.child
        child(args)
        return
    rows = []
    for kb in args.malloc_kb:
        for kind in args.kinds:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if kb:
                env.update(MALLOC_MMAP_THRESHOLD_=str(kb * 1024), MALLOC_TRIM_THRESHOLD_=str(kb * 1024))
            cmd = [sys.executable, __file__, "--child", kind, "--shape", args.shape, "--blocks", str(args.blocks),
                   "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
            got = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"malloc_kb": kb, "kind": kind, **got})
            print(f"malloc {kb or 'default':>7}  {kind:8s} {got['ms_per_block']:8.1f} ms per block", flush=True)
    print()
    print(f"{'malloc':>8} " + " ".join(f"{k:>9}" for k in args.kinds) + "  loop/fused")
    for kb in args.malloc_kb:
        ms = {r["kind"]: r["ms_per_block"] for r in rows if r["malloc_kb"] == kb}
        ratio = f"{ms['loop'] / ms['fused']:.2f}x" if "loop" in ms and "fused" in ms else "-"
        print(f"{kb or 'default':>8} " + " ".join(f"{ms[k]:9.1f}" for k in args.kinds) + f"  {ratio}")
    if args.out:
        write_record(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
