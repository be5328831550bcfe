"""Predicted vs measured peak memory per stage, for several models and ways to train.

Each case is a real run (``splitlearn.trainer.train`` on a local Ray cluster, random init from
a Llama-shaped config, no downloads) cut in two stages; the summary's memory table holds what
each stage's worker measured in any step (CPU: resident memory above the runtime's, i.e. above
what the process held before it built its segment; GPU: torch's peak allocated) next to what
the plan predicted for it. The table prints measured / planned per stage; the JSON keeps
every figure.

    python bench/memory.py --out bench/results/memory-cpu.json                   # CPU, ~100M-1B shapes
    python bench/memory.py --accelerator cuda --cases gpu --out bench/results/memory-cuda.json
    python bench/memory.py --replan bench/results/memory-cuda.json    # today's plan vs what was held then

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, runtime_section, write_record  # noqa: E402
from shapes import LLAMA_SHAPES  # noqa: E402

# (name, shape, method, train.dtype, recompute, schedule)
CASES = {
    "cpu": [
        ("small full fp32", "small", "full", "fp32", False, "1f1b"),
        ("small lora fp32", "small", "lora", "fp32", False, "1f1b"),
        ("small full recompute", "small", "full", "fp32", True, "1f1b"),
        ("small full bf16-master", "small", "full", "bf16-master", False, "1f1b"),
        ("small lora bf16-pure", "small", "lora", "bf16-pure", False, "gpipe"),
        ("small full bf16 autocast", "small", "full", "bf16", False, "1f1b"),
        ("medium full fp32", "medium", "full", "fp32", False, "1f1b"),
        ("1b lora bf16-master", "1b", "lora", "bf16-master", False, "1f1b"),
    ],
    "gpu": [
        ("medium full fp32", "medium", "full", "fp32", False, "1f1b"),
        ("medium lora fp32", "medium", "lora", "fp32", False, "1f1b"),
        ("medium full recompute", "medium", "full", "fp32", True, "1f1b"),
        ("1b full bf16-master", "1b", "full", "bf16-master", False, "1f1b"),
        ("1b lora bf16-pure", "1b", "lora", "bf16-pure", False, "gpipe"),
        ("8b lora bf16-master", "8b", "lora", "bf16-master", False, "1f1b"),
    ],
}


def case_config(case: tuple, args: argparse.Namespace, out_dir: Path) -> dict:
    name, shape, method, dtype, recompute, schedule = case
    cfg = dict(LLAMA_SHAPES[shape])
    # on a GPU the first stage is an edge stage on the host CPU (embedding and the first block):
    # two stages cannot share one GPU over NCCL
    cut = 2 if args.accelerator == "cuda" else cfg["num_hidden_layers"] // 2 + 1
    device = {
        "tier": "cloud",
        "accelerator": args.accelerator,
        "memory_gb": args.memory_gb,
        "tflops": 1.0,
        "cpu_threads": args.threads,
        "zone": "z",
        "gpus": 1.0 if args.accelerator == "cuda" else 0.0,
    }
    return {
        "name": name.replace(" ", "-"),
        "model": {"family": "llama", "config": cfg},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {
            "inline": {
                "devices": [
                    {**device, "name": "a", "owns_data": True, "accelerator": "cpu", "gpus": 0.0, "tier": "edge"},
                    {**device, "name": "b"},
                ],
                "links": {"default": {"bandwidth_mbps": 10000.0, "latency_ms": 0.1}},
            }
        },
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batches": 2, "lr": 1e-4, "dtype": dtype},
        "plan": {"partitioner": "manual", "devices": ["a", "b"], "cuts": [cut]},
        "finetune": {"method": method, "recompute": recompute},
        "runtime": runtime_section(
            out_dir,
            name.replace(" ", "-"),
            "none",
            schedule=schedule,
            malloc_mmap_threshold_kb=args.malloc_kb,
            **({} if args.arena_max is None else {"malloc_arena_max": args.arena_max}),
        ),
    }


def replan(path: Path) -> None:
    """Each case of a results file planned again with the current cost model (planning needs no
    accelerator), against the memory its run held: what a change to the cost model does to
    figures measured on a machine that is not at hand."""
    from splitlearn.config import config_from_container
    from splitlearn.planning import make_plan

    record = json.loads(path.read_text())
    args = argparse.Namespace(**record["args"])
    args.malloc_kb = getattr(args, "malloc_kb", 128)
    args.arena_max = getattr(args, "arena_max", 0)
    cases = {c[0]: c for group in CASES.values() for c in group}
    ratios, rows = [], []
    with tempfile.TemporaryDirectory(prefix="sl-replan-") as tmp:
        planned: dict[str, Any] = {}
        for row in record["rows"]:
            if row["case"] not in planned:
                raw = case_config(cases[row["case"]], args, Path(tmp))
                planned[row["case"]] = make_plan(config_from_container(raw, [], "bench/memory.py", ROOT))
            now = planned[row["case"]].stages[row["stage"]].memory_gb
            ratios.append(row["measured_gb"] / now)
            rows.append({**row, "planned_then_gb": row["planned_gb"], "planned_gb": now, "ratio": ratios[-1]})
            print(
                f"{row['case']:28s} stage {row['stage']}  held {row['measured_gb']:6.3f} GB  planned then "
                f"{row['planned_gb']:6.3f} (x{row['ratio']:.3f})  now {now:6.3f} (x{ratios[-1]:.3f})"
            )
    within = sum(abs(x - 1) <= 0.10 for x in ratios)
    print(f"\nnow: held/planned {min(ratios):.3f}-{max(ratios):.3f}, within 10%: {within}/{len(ratios)}")
    write_record(
        path.with_name(path.stem + "-replan.json"), {"measured_in": str(path), "machine": machine(), "rows": rows}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", choices=sorted(CASES), default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--memory-gb", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--malloc-kb", type=int, default=128, help="runtime.malloc_mmap_threshold_kb (0: glibc's adaptive default)"
    )
    ap.add_argument(
        "--arena-max", type=int, default=None, help="runtime.malloc_arena_max (default: the runtime's; 0: glibc's)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory-cpu.json"))
    ap.add_argument(
        "--replan",
        default=None,
        help="a results JSON: plan its cases again with the current cost model (no run) and print the new "
        "prediction against the memory that run held (writes <results>-replan.json)",
    )
    args = ap.parse_args()
    if args.replan:
        replan(Path(args.replan))
        return

    import ray

    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    cases = [c for c in CASES[args.cases] if not args.only or any(o in c[0] for o in args.only)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sl-memory-") as tmp:
        for case in cases:
            raw = case_config(case, args, Path(tmp) / "runs")
            cfg = config_from_container(raw, [], "bench/memory.py", ROOT)
            t0 = time.perf_counter()
            result = train(cfg, progress="none")
            wall = time.perf_counter() - t0
            for m in result.summary.get("memory", []):
                st = result.plan.stages[m["stage"]]
                row = {
                    "case": case[0],
                    "shape": case[1],
                    "method": case[2],
                    "dtype": case[3],
                    "recompute": case[4],
                    "schedule": case[5],
                    "stage": m["stage"],
                    "params": st.params,
                    "planned_parts_gb": st.memory,
                    "wall_s": wall,
                    "median_step_s": result.summary["median_step_s"],
                    **m,
                    "ratio": m["measured_gb"] / m["planned_gb"],
                }
                rows.append(row)
                print(
                    f"{case[0]:28s} stage {m['stage']}  {st.params / 1e6:7.1f}M  planned {m['planned_gb']:6.3f} GB  "
                    f"measured {m['measured_gb']:6.3f} GB  x{row['ratio']:.3f}  step {row['median_step_s']:.3f} s",
                    flush=True,
                )
    ray.shutdown()
    ratios = [r["ratio"] for r in rows]
    print(
        f"\n{len(rows)} stages: measured/planned median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}; within 10%: {sum(abs(x - 1) <= 0.10 for x in ratios)}/{len(rows)}"
    )
    record = {
        "machine": machine(),
        "args": vars(args),
        "shapes": {c[1]: LLAMA_SHAPES[c[1]] for c in cases},
        "rows": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
