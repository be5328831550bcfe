"""Where a stage worker's step goes: one stage (the whole model) in splitlearn's own
``StageWorker``, in this process, stepped under ``torch.profiler``; prints the top operators
by self CPU and by self device time, and the step times with and without the profiler.

    python bench/stage_trace.py --out bench/results/stage-trace-h200.json     # the lent H200

Prints tables and writes JSON (the tables as text, and the step times).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, write_record  # noqa: E402
from stage_speed import SHAPE, TINY, gpu_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--accelerator", default="cuda", help="cuda, or cpu with --tiny to check the script")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage-trace-h200.json"))
    args = ap.parse_args()

    import torch

    if args.tiny:
        SHAPE.update(TINY)
    from torch.profiler import ProfilerActivity, profile

    from partitioners.plan import Plan, Stage
    from splitlearn.config import config_from_container
    from splitlearn.stage import StageWorker

    raw = {
        "name": "trace",
        "model": {"family": "llama", "config": SHAPE},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {"inline": {"devices": [gpu_device(args.accelerator, 989.0)]}},
        "train": {"steps": args.steps * 2, "batch_size": args.batch, "micro_batches": 1, "lr": 1e-4, "dtype": "bf16"},
        "runtime": {"timeout_s": 600, "compile": args.compile},
    }
    cfg = config_from_container(raw, [], "bench", ROOT)
    n = SHAPE["num_hidden_layers"] + 2
    plan = Plan(stages=[Stage(index=0, start=0, stop=n, devices=["gpu"])], partitioner="manual", schedule="sequential")
    worker = StageWorker(0, cfg.resolved_dict(), plan.to_dict(), str(ROOT))
    worker.prepare()
    _, port = worker.rendezvous_address()
    worker.init_dist("127.0.0.1", port)

    sync = torch.cuda.synchronize if args.accelerator == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if args.accelerator == "cuda" else [ProfilerActivity.CPU]

    def step(i: int) -> float:
        sync()
        t = time.perf_counter()
        worker.run_step(i)
        sync()
        return time.perf_counter() - t

    plain = [step(i) for i in range(args.steps)]
    with profile(activities=acts) as prof:
        traced = [step(args.steps + i) for i in range(3)]
    worker.close()
    ka = prof.key_averages()
    by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    by_dev = ka.table(sort_by="self_cuda_time_total", row_limit=25) if args.accelerator == "cuda" else ""
    print(by_cpu)
    print(by_dev)
    after = plain[3:] or plain
    print(f"step {statistics.median(after) * 1e3:.1f} ms (median of {len(after)}), traced {traced}")
    write_record(
        args.out,
        {
            "machine": machine(),
            "args": vars(args),
            "steps_s": plain,
            "traced_s": traced,
            "median_step_s": statistics.median(after),
            "by_self_cpu": by_cpu,
            "by_self_device": by_dev,
        },
    )


if __name__ == "__main__":
    main()
