"""Fidelity of the cost model: predicted vs measured peak memory and step time of a stage.

For each case (model size, micro-batch size, sequence length, schedule) the script cuts a
middle stage out of a Llama-family model, profiles its layers one by one (the profiler the
planner uses), predicts the stage's peak memory and step time with the cost model, then
runs that stage for real in this process: its schedule's forwards and backwards over M
micro-batches (inputs and incoming gradients are random tensors standing in for its
neighbours), and the AdamW step. Peak memory is measured with torch's own accounting
(CPU: the profiler's allocation events; CUDA: max_memory_allocated) above the weights,
gradients and optimizer state that exist between steps, which are counted exactly.

    python bench/costmodel_stage.py             # CPU, writes bench/results/costmodel-stage-cpu.json
    python bench/costmodel_stage.py --device cuda   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster.topology import Device  # noqa: E402
from partitioners import schedule as S  # noqa: E402
from partitioners.costmodel import stage_memory, stage_time  # noqa: E402
from partitioners.profile import peak_allocated_bytes, profile_chain  # noqa: E402
from splitlearn.config import ModelConfig  # noqa: E402
from splitlearn.models.build import build_model  # noqa: E402
from splitlearn.models.chain import Segment, layer_views  # noqa: E402

SIZES = {  # name: (hidden, intermediate, layers, heads)
    "S": (128, 352, 8, 4),
    "M": (256, 704, 8, 8),
    "L": (512, 1376, 8, 8),
    "XL": (1024, 2816, 8, 16),  # GPU cases
    "XXL": (2048, 5632, 8, 16),
}
CPU_CASES = [(s, mb, seq) for s in ("S", "M", "L") for mb, seq in ((1, 128), (4, 64), (4, 256))]
GPU_CASES = [(s, mb, seq) for s in ("L", "XL", "XXL") for mb, seq in ((1, 512), (4, 256), (8, 1024))]
NUM_STAGES, STAGE = 4, 1  # the stage measured: blocks 2..3 of 8, the second of four


def model_cfg(size: str) -> ModelConfig:
    h, i, n, heads = SIZES[size]
    return ModelConfig(
        family="llama",
        config=dict(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=512,
            max_position_embeddings=1024,
        ),
    )


def stage_range() -> tuple[int, int]:
    # chain of 10 (embed, 8 blocks, head); a middle stage of two blocks
    return 3, 5


def order(schedule: str, m: int) -> list[S.Action]:
    acts = S.build(schedule, NUM_STAGES, m)[STAGE]
    return [a for a in acts if a.kind in (S.F, S.B, S.STEP)]


def run_stage(seg, opt, acts, mb, seq, hidden, device):
    """One step of the stage in its schedule's order; neighbours replaced by random tensors."""
    inputs, outputs = {}, {}
    for a in acts:
        if a.kind == S.F:
            x = torch.randn(mb, seq, hidden, device=device, requires_grad=True)
            inputs[a.mb] = x
            outputs[a.mb] = seg(x)
        elif a.kind == S.B:
            out = outputs.pop(a.mb)
            out.backward(torch.randn_like(out))
            inputs.pop(a.mb)
        else:
            opt.step()
            opt.zero_grad(set_to_none=False)


def measure(size, mb, seq, schedule, m, device, steps):
    cfg = model_cfg(size)
    hidden = cfg.config["hidden_size"]
    a, b = stage_range()
    torch.manual_seed(0)
    # profile the stage's layers one by one, as `splitlearn profile` does
    whole = build_model(cfg, 0).to(device)
    views = layer_views(whole)
    x = torch.randn(mb, seq, hidden, device=device)
    layers = profile_chain(views[a:b], x, [f"block_{i - 1}" for i in range(a, b)], repeats=7, warmup=3)
    del whole, views
    dev = Device(name="here", memory_gb=1e9, tflops=1.0)
    pred_mem = stage_memory(layers, stage=STAGE, num_stages=NUM_STAGES, schedule=schedule, num_micro_batches=m)
    pred_ms = stage_time(layers, dev, calibrated_tflops=1.0).step_ms(m)

    seg = Segment(build_model(cfg, 0), a, b).to(device)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4, foreach=False)
    acts = order(schedule, m)
    run_stage(seg, opt, acts, mb, seq, hidden, device)  # allocates gradients and AdamW state
    static = sum(p.numel() * p.element_size() for p in seg.parameters())
    static += sum(p.grad.numel() * p.grad.element_size() for p in seg.parameters() if p.grad is not None)
    static += sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    peak = static + peak_allocated_bytes(lambda: run_stage(seg, opt, acts, mb, seq, hidden, device), device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        run_stage(seg, opt, acts, mb, seq, hidden, device)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    meas_ms = statistics.median(times)
    return {
        "size": size,
        "micro_batch": mb,
        "seq_len": seq,
        "schedule": schedule,
        "micro_batches": m,
        "pred_mem_mb": pred_mem.device_total / 1e6,
        "meas_mem_mb": peak / 1e6,
        "mem_ratio": pred_mem.device_total / peak,
        "pred_ms": pred_ms,
        "meas_ms": meas_ms,
        "time_ratio": pred_ms / meas_ms,
        "pred_breakdown_mb": {k: v * 1e3 for k, v in pred_mem.as_gb().items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (median)")
    ap.add_argument("--quick", action="store_true", help="a few cases only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = GPU_CASES if args.device == "cuda" else CPU_CASES
    cases = [(s, mb, seq, sch) for s, mb, seq in base for sch in ("gpipe", "1f1b")]
    if args.quick:
        cases = cases[:4]
    rows = []
    print(
        f"{'size':4} {'mb':>3} {'seq':>4} {'sched':6} {'pred MB':>9} {'meas MB':>9} {'mem':>6} "
        f"{'pred ms':>9} {'meas ms':>9} {'time':>6}"
    )
    for size, mb, seq, sch in cases:
        r = measure(size, mb, seq, sch, args.micro_batches, args.device, args.steps)
        rows.append(r)
        print(
            f"{size:4} {mb:>3} {seq:>4} {sch:6} {r['pred_mem_mb']:9.2f} {r['meas_mem_mb']:9.2f} "
            f"{r['mem_ratio']:6.3f} {r['pred_ms']:9.2f} {r['meas_ms']:9.2f} {r['time_ratio']:6.3f}",
            flush=True,
        )
    mem_ok = all(0.9 <= r["mem_ratio"] <= 1.1 for r in rows)
    time_ok = all(0.85 <= r["time_ratio"] <= 1.15 for r in rows)
    print(f"memory within ±10%: {mem_ok}; time within ±15%: {time_ok}")
    out = Path(args.out or ROOT / "bench" / "results" / f"costmodel-stage-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": args.device,
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                "host": platform.node(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "num_stages": NUM_STAGES,
                "stage": STAGE,
                "micro_batches": args.micro_batches,
                "rows": rows,
                "memory_within_10pct": mem_ok,
                "time_within_15pct": time_ok,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
