"""ZeRO offload on a memory-capped GPU: the largest model a stage trains, with and without.

The cap emulates a small device: the allocator refuses past it, and DeepSpeed's query of
the device's free memory answers what is left under it (as a real small GPU would).

One stage (the whole Llama-style model: embedding, N blocks, head) runs in splitlearn's own
stage worker on one GPU whose memory is capped with
``torch.cuda.set_per_process_memory_fraction``. For each mode (``none``: AdamW on the GPU;
``optimizer``: DeepSpeed ZeRO-2 with the optimizer state and step on the host CPU) the
number of blocks grows until a step runs out of memory. Each trial is its own process (a
fresh allocator and cap); it trains ``--steps`` steps and records the peak allocation and
the median step time.

    python bench/offload_gpu.py --cap-gib 6        # writes bench/results/offload-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = 2048
MODEL = {
    "hidden_size": HIDDEN,
    "intermediate_size": 5504,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
}


def trial(blocks: int, offload: str, cap_gib: float, steps: int, seq: int, batch: int, dtype: str = "fp32") -> dict:
    """One process: build the stage, cap the GPU, train ``steps`` steps."""
    import torch

    from partitioners.plan import Plan, Stage
    from splitlearn.config import config_from_container
    from splitlearn.stage import StageWorker

    total = torch.cuda.get_device_properties(0).total_memory
    cap = cap_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    # A real device of `cap` bytes reports its free memory as what is left of `cap`; DeepSpeed
    # asks (to decide where to flatten the weights), so the emulated device must answer too.
    os.environ["DS_ACCELERATOR"] = "cuda"
    from deepspeed.accelerator import get_accelerator

    get_accelerator().available_memory = lambda device_index=None: max(0, int(cap - torch.cuda.memory_reserved()))
    raw = {
        "name": "offload-bench",
        "model": {"family": "llama", "config": {**MODEL, "num_hidden_layers": blocks}},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": seq},
        "topology": {
            "inline": {
                "devices": [
                    {
                        "name": "gpu",
                        "tier": "cloud",
                        "accelerator": "cuda",
                        "memory_gb": cap_gib * 2**30 / 1e9,
                        "tflops": 400.0,
                        "owns_data": True,
                        "cpu_threads": 8,
                    }
                ]
            }
        },
        "train": {"steps": steps, "batch_size": batch, "micro_batches": 1, "lr": 1e-4, "seed": 0, "dtype": dtype},
        "runtime": {"timeout_s": 600},
    }
    cfg = config_from_container(raw, [], "bench", ROOT)
    n = blocks + 2
    plan = Plan(
        stages=[Stage(index=0, start=0, stop=n, devices=["gpu"], offload=offload)],
        partitioner="manual",
        schedule="sequential",
    )
    worker = StageWorker(0, cfg.resolved_dict(), plan.to_dict(), str(ROOT))
    t0 = time.perf_counter()
    info = worker.prepare()
    _, port = worker.rendezvous_address()
    worker.init_dist("127.0.0.1", port)
    setup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = worker.run_step(step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(out["loss"])
    worker.close()
    return {
        "blocks": blocks,
        "offload": offload,
        "params": info["params"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "setup_s": setup_s,
        "losses": losses,
    }


def run_trial(args, blocks: int, offload: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--trial",
        f"{blocks}:{offload}",
        "--cap-gib",
        str(args.cap_gib),
        "--steps",
        str(args.steps),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--dtype",
        args.dtype,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.trial_timeout)
    wall = time.perf_counter() - t0
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res.update(ok=True, wall_s=wall)
            return res
    tail = (out.stderr or out.stdout).strip().splitlines()
    oom = any("out of memory" in line.lower() or "OutOfMemoryError" in line for line in tail)
    return {
        "blocks": blocks,
        "offload": offload,
        "ok": False,
        "oom": oom,
        "error": next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "?")[:300],
        "wall_s": wall,
    }


def sweep(args, offload: str, grid: list[int]) -> list[dict]:
    rows = []
    for blocks in grid:
        res = run_trial(args, blocks, offload)
        rows.append(res)
        state = (
            f"{res['params'] / 1e6:.0f}M params, peak {res['peak_gib']:.2f} GiB, step {res['step_s']:.3f} s"
            if res["ok"]
            else f"failed: {res['error']}"
        )
        print(f"  offload={offload:9s} blocks={blocks:3d}: {state}", flush=True)
        if not res["ok"]:
            break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gib", type=float, default=6.0, help="GPU memory the stage may use")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--plain-grid", default="1,2,3,4,5,6,8")
    ap.add_argument("--offload-grid", default="8,12,16,20,24,28,32")
    ap.add_argument("--params-grid", default="", help="blocks for offload: params (ZeRO-3); empty: skip")
    ap.add_argument("--dtype", default="fp32", help="train.dtype (bf16: autocast, fp32 weights)")
    ap.add_argument("--trial-timeout", type=float, default=300)
    ap.add_argument("--trial", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "offload-gpu.json"))
    args = ap.parse_args()
    if args.trial:
        blocks, offload = args.trial.split(":")
        res = trial(int(blocks), offload, args.cap_gib, args.steps, args.seq, args.batch, args.dtype)
        print("RESULT " + json.dumps(res), flush=True)
        return

    import torch

    print(
        f"GPU {torch.cuda.get_device_name(0)}, capped at {args.cap_gib} GiB; batch {args.batch}x{args.seq}, "
        f"train.dtype={args.dtype}",
        flush=True,
    )

    def grid(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    plain = sweep(args, "none", grid(args.plain_grid))
    off = sweep(args, "optimizer", grid(args.offload_grid))
    params = sweep(args, "params", grid(args.params_grid))
    best_plain = max((r for r in plain if r["ok"]), key=lambda r: r["params"], default=None)
    best_off = max((r for r in off if r["ok"]), key=lambda r: r["params"], default=None)
    best_params = max((r for r in params if r["ok"]), key=lambda r: r["params"], default=None)
    same = None
    if best_plain is not None and off:  # the step-time cost at one size: the largest that fits without offload
        same = run_trial(args, best_plain["blocks"], "optimizer")
    summary = {
        "largest_params_no_offload": best_plain and best_plain["params"],
        "largest_params_offload": best_off and best_off["params"],
        "ratio": (best_off["params"] / best_plain["params"]) if best_plain and best_off else None,
        "largest_params_offload_params": best_params and best_params["params"],
        "ratio_params": (best_params["params"] / best_plain["params"]) if best_plain and best_params else None,
        "same_size_step_s": {"none": best_plain and best_plain["step_s"], "optimizer": same and same.get("step_s")},
        "same_size_peak_gib": {
            "none": best_plain and best_plain["peak_gib"],
            "optimizer": same and same.get("peak_gib"),
        },
    }
    print("\nmode       largest model  peak GiB  step s")
    for name, best in (("none", best_plain), ("optimizer", best_off), ("params", best_params)):
        if best:
            print(f"{name:10s} {best['params'] / 1e6:10.0f}M  {best['peak_gib']:8.2f}  {best['step_s']:6.3f}")
    if summary["ratio"]:
        print(f"offload trains a {summary['ratio']:.2f}x larger model on the capped GPU")
    if summary["ratio_params"]:
        print(f"params offload (ZeRO-3) trains a {summary['ratio_params']:.2f}x larger model (largest tried)")
    if same and same.get("ok"):
        print(
            f"at {best_plain['params'] / 1e6:.0f}M params: step {best_plain['step_s']:.3f} s without offload, "
            f"{same['step_s']:.3f} s with ({same['step_s'] / best_plain['step_s']:.2f}x); "
            f"peak {best_plain['peak_gib']:.2f} vs {same['peak_gib']:.2f} GiB"
        )
    result = {
        "bench": "offload_gpu",
        "gpu": torch.cuda.get_device_name(0),
        "cap_gib": args.cap_gib,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "model": {**MODEL, "family": "llama"},
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "plain": plain,
        "offload": off,
        "offload_params": params,
        "same_size_offload": same,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
