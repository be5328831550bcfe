"""Predicted vs measured step time and memory per stage, through the product's own CLI
(``python -m splitlearn train CONFIG``), with the devices' own timings (``plan.profile:
on_cluster``) and without (FLOPs over the topology's ``tflops``).

Cases (``NAME:ON_CLUSTER``, ``--cases``), each on every shape of ``--shapes``:

- ``E1``: one CUDA stage (the GPU owns the data);
- ``E2``: an edge stage on the host CPU (the data owner) and the GPU, ``optimal`` plan, on
  free links, and ``E2-links`` on emulated links (``--link-mbps``, ``--link-ms``);
- ``C2`` / ``C3``: two / three CPU stages (``--cpu-threads`` each), the chain cut evenly, on
  this machine's loopback (no GPU needed).

Each run writes its run directory; the script reads the prediction (``plan.yaml``,
``summary.json``: the simulator's step for the plan), the measured median step, each
stage's predicted and measured forward, backward and optimizer step (``metrics.jsonl``),
and memory held against the plan. Prints a table and writes JSON. ``--repeat N`` runs each
case N times and prints the median ratio (the profile is measured in the first run and
cached, as a user's runs cache it; each repeat trains again): on a shared machine one run's
ratio moves by 15-20%.

    python bench/costmodel.py --shapes 1.1b 8b-8 --out bench/results/costmodel-h200.json   # the lent H200
    python bench/costmodel.py --cases C2:1 C2:0 C3:1 --shapes small medium --seq 128 --batch 4 \\
        --out bench/results/costmodel-cpu.json                                       # CPU stages here
    python bench/costmodel.py --cases E1:1 --trace      # each step's actions against the driver's step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, runtime_section, write_record  # noqa: E402
from shapes import LLAMA_SHAPES  # noqa: E402
from stage_speed import SHAPE, TINY, gpu_device  # noqa: E402

SHAPES = {
    **LLAMA_SHAPES,
    "1.1b": SHAPE,  # bench/stage_speed.py's 1.1B shape (untied embeddings)
    "8b-8": {**LLAMA_SHAPES["8b"], "num_hidden_layers": 8},  # Llama-3-8B's layers, 8 of them (2.8B)
    "tiny": TINY,
}


def devices(args: argparse.Namespace, edge: bool) -> list[dict]:
    gpu = gpu_device(args.accelerator, args.peak_tflops, owns_data=not edge)
    if not edge:
        return [gpu]
    host = {"name": "edge", "tier": "edge", "accelerator": "cpu", "memory_gb": 60.0, "tflops": 1.0,
            "owns_data": True, "cpu_threads": args.edge_threads, "zone": "edge"}  # fmt: skip
    return [host, gpu]


def cpu_devices(args: argparse.Namespace, count: int) -> list[dict]:
    return [
        {"name": f"cpu-{k}", "tier": "edge" if k == 0 else "cloud", "accelerator": "cpu", "memory_gb": 12.0,
         "tflops": 1.0, "owns_data": k == 0, "cpu_threads": args.cpu_threads, "zone": "here"}
        for k in range(count)
    ]  # fmt: skip


def run_config(
    args: argparse.Namespace, name: str, shape: dict, out_dir: Path, run_name: str, on_cluster: bool, prepost: bool
):
    """The run config of one case, as a user writes it."""
    edge = name.startswith("E2")
    cpus = int(name[1:]) if name.startswith("C") else 0
    chain = shape["num_hidden_layers"] + 2
    return {
        "name": name,
        "model": {"family": "llama", "config": shape},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {
            "inline": {
                "devices": cpu_devices(args, cpus) if cpus else devices(args, edge),
                "links": {
                    # E2: a free link (what a run gets without emulation); E2-links: the emulated one
                    "zones": [
                        {
                            "a": "edge",
                            "b": "cloud",
                            "bandwidth_mbps": args.link_mbps if name == "E2-links" else 1e6,
                            "latency_ms": args.link_ms if name == "E2-links" else 0.01,
                        }
                    ]
                }
                if edge
                else {"default": {"bandwidth_mbps": 1e6, "latency_ms": 0.01}},  # CPU stages: this host's loopback
            }
        },  # fmt: skip
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "micro_batches": 2 if edge or cpus else 1,
            "lr": 1e-4,
            "dtype": "fp32" if cpus else "bf16",
        },  # fmt: skip
        "plan": {
            "partitioner": "optimal" if edge else "manual",
            "devices": [f"cpu-{k}" for k in range(cpus)] if cpus else [] if edge else ["gpu"],
            "cuts": [round(chain * k / cpus) for k in range(1, cpus)] if cpus else [],
            "profile": "on_cluster" if on_cluster else None,
            "search_seconds": 5,
        },  # fmt: skip
        "finetune": {"method": args.method},
        "runtime": runtime_section(
            out_dir,
            run_name,
            "none",
            emulate_links=name == "E2-links",
            schedule="1f1b",
            trace=args.trace,
            prepost_receives=prepost,
            **({} if args.malloc_kb is None else {"malloc_mmap_threshold_kb": args.malloc_kb}),
            **({} if args.arena_max is None else {"malloc_arena_max": args.arena_max}),
            **({} if args.huge_pages is None else {"huge_pages": args.huge_pages == "on"}),
        ),
    }


def stage_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """Per stage, the plan's and the run's forward, backward and optimizer ms; per traced step,
    the driver's step against the workers' actions."""
    from partitioners.plan import Plan
    from splitlearn.replay import measured_stage_costs

    plan = Plan.from_yaml((run_dir / "plan.yaml").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in steps if "stages" in rec]
    measured = measured_stage_costs(plan, [rec["stages"] for rec in steps]) or []
    stages = [
        {
            "stage": s.index,
            "device": s.device,
            "predicted_ms": {"fwd": s.fwd_ms, "bwd": s.bwd_ms, "opt": s.opt_ms},
            "measured_ms": {"fwd": m.fwd_ms, "bwd": m.bwd_ms, "opt": m.step_ms},
        }
        for s, m in zip(plan.stages, measured, strict=False)
    ]
    spans = []
    for rec in steps[1:]:  # the first step warms up
        marks = [t for st in rec["stages"] for t in st.get("trace") or []]
        slow = max(rec["stages"], key=lambda st: st.get("run_s", 0))
        row = {
            "step_ms": rec["step_s"] * 1e3,
            "worker_exec_ms": slow.get("exec_s", 0) * 1e3,  # the slowest worker's step: actions, batch, metrics
            "worker_run_ms": slow.get("run_s", 0) * 1e3,  # and its whole call, memory readings too
        }
        if marks:
            row["actions_span_ms"] = max(t[3] for t in marks) - min(t[2] for t in marks)
            row["actions_ms"] = sum(t[3] - t[2] for t in marks if t[0] in ("F", "B", "STEP"))
            # per stage, the ms of each kind of action (transfers too)
            row["by_kind_ms"] = [
                {k: sum(t[3] - t[2] for t in st.get("trace") or [] if t[0] == k)
                 for k in dict.fromkeys(t[0] for t in st.get("trace") or [])}
                for st in rec["stages"]
            ]  # fmt: skip
        spans.append(row)
    for rec, row in zip(steps[-2:], spans[-2:], strict=False):  # the last steps' timelines, whole
        if any(st.get("trace") for st in rec["stages"]):
            row["trace"] = [st.get("trace") for st in rec["stages"]]
    return stages, spans


def run_case(
    args: argparse.Namespace, name: str, shape_name: str, out_dir: Path, on_cluster: bool, prepost: bool
) -> dict:
    run_name = f"{name}-{shape_name}-{int(on_cluster)}-{'pre' if prepost else 'late'}"
    raw = run_config(args, name, SHAPES[shape_name], out_dir, run_name, on_cluster, prepost)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "splitlearn", "train", str(path), "--progress", "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    found = sorted(out_dir.glob(f"**/{run_name}/summary.json"))
    if proc.returncode != 0 or not found:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{run_name}: splitlearn train exited {proc.returncode}")
    run_dir = found[0].parent
    summary = json.loads(found[0].read_text())
    plan_text = (run_dir / "plan.yaml").read_text()
    stages, spans = stage_rows(run_dir)
    return {
        "case": name,
        "shape": shape_name,
        "on_cluster": on_cluster,
        "prepost_receives": prepost,
        "plan": summary["stages"],
        "predicted_ms": summary.get("simulated_step_ms"),
        "measured_ms": summary.get("measured_step_ms"),
        "ratio": (summary.get("measured_step_ms") or 0) / (summary.get("simulated_step_ms") or 1),
        "replayed_ms": summary.get("replayed_step_ms"),
        "replayed_free_links_ms": summary.get("replayed_free_links_step_ms"),
        "step_overhead_ms": yaml.safe_load(plan_text).get("predicted", {}).get("step_overhead_ms"),
        "stages": stages,
        "steps": spans,
        "memory": summary.get("memory"),
        "mfu": summary.get("mfu"),
        "plan_table": proc.stdout[proc.stdout.find("stage  device") :].split("\nrun directory")[0],
        "wall_s": wall,
    }


def show(r: dict) -> None:
    print(f"{r['case']:9s} {r['shape']:6s} on_cluster={r['on_cluster']!s:5s} "
          f"receives={'pre' if r['prepost_receives'] else 'late'} predicted {r['predicted_ms']:9.1f} ms  "
          f"measured {r['measured_ms']:9.1f} ms  x{r['ratio']:.3f}  replayed {r['replayed_ms'] or 0:9.1f} ms", flush=True)  # fmt: skip
    if r["steps"]:
        keys = [k for k in r["steps"][0] if k not in ("by_kind_ms", "trace")]
        med = {k: statistics.median(t[k] for t in r["steps"]) for k in keys}
        print("    per step: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()), flush=True)
        for i, kinds in enumerate(r["steps"][-1].get("by_kind_ms") or []):
            print(f"    stage {i} last step: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()), flush=True)
    for st in r["stages"]:
        p, m = st["predicted_ms"], st["measured_ms"]
        print(f"    stage {st['stage']} {st['device']}: fwd/bwd/opt ms predicted "
              f"{p['fwd']:.1f}/{p['bwd']:.1f}/{p['opt']:.1f}, measured {m['fwd']:.1f}/{m['bwd']:.1f}/{m['opt']:.1f}",
              flush=True)  # fmt: skip
    for m in r["memory"] or []:
        print(f"    stage {m['stage']} {m['device']}: planned {m['planned_gb']:.2f} GB, "
              f"held {m['measured_gb']:.2f} GB ({m['measured_gb'] / m['planned_gb']:.2f}x)", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--method", default="full", help="finetune.method of every run")
    ap.add_argument("--edge-threads", type=int, default=12)
    ap.add_argument("--link-mbps", type=float, default=1000.0)
    ap.add_argument("--link-ms", type=float, default=5.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--accelerator", default="cuda")
    ap.add_argument("--trace", action="store_true", help="runtime.trace: each step's actions against the step")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["1.1b"])
    ap.add_argument("--cpu-threads", type=int, default=1, help="threads of each CPU stage (C2, C3)")
    ap.add_argument("--cases", nargs="*", default=["E1:0", "E1:1", "E2:1", "E2-links:1"],
                    help="NAME:ON_CLUSTER (0 or 1)")  # fmt: skip
    ap.add_argument("--receives", choices=["pre", "late", "both"], default="pre",
                    help="runtime.prepost_receives: posted when the step starts (pre), at their actions (late)")  # fmt: skip
    ap.add_argument("--malloc-kb", type=int, default=None,
                    help="runtime.malloc_mmap_threshold_kb of every run (0: glibc's default malloc)")  # fmt: skip
    ap.add_argument("--arena-max", type=int, default=None,
                    help="runtime.malloc_arena_max of every run (0: glibc's default, 8 arenas per core)")  # fmt: skip
    ap.add_argument("--huge-pages", choices=["on", "off"], default=None, help="runtime.huge_pages of every run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each case this many times (the machine's noise between runs; medians printed)")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "costmodel-h200.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sl-costmodel-") as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # measured here, now
        for shape in args.shapes:
            for case in args.cases:
                name, flag = case.split(":")
                for prepost in {"pre": [True], "late": [False], "both": [True, False]}[args.receives]:
                    for k in range(args.repeat):
                        rows.append(run_case(args, name, shape, Path(tmp) / f"r{k}", flag == "1", prepost))
                        rows[-1]["repeat"] = k
                        show(rows[-1])
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "splitlearn" / "profiles"
        profiles = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    print(
        f"\n{'case':9s} {'shape':6s} {'profile':9s} {'receives':8s} {'predicted':>10s} {'measured':>10s} {'ratio':>6s} {'memory held/planned'}"
    )
    for r in rows:
        mem = ", ".join(f"{m['measured_gb'] / m['planned_gb']:.2f}" for m in r["memory"] or [])
        print(f"{r['case']:9s} {r['shape']:6s} {'on_cluster' if r['on_cluster'] else 'prior':9s} "
              f"{'pre' if r['prepost_receives'] else 'late':8s} "
              f"{r['predicted_ms']:10.1f} {r['measured_ms']:10.1f} {r['ratio']:6.3f} {mem}")  # fmt: skip
    medians = []
    if args.repeat > 1:
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            groups.setdefault((r["case"], r["shape"], r["on_cluster"], r["prepost_receives"]), []).append(r["ratio"])
        print(f"\nmedian of {args.repeat} runs, measured / predicted:")
        for (case, shape, on, pre), ratios in groups.items():
            med = statistics.median(ratios)
            medians.append({"case": case, "shape": shape, "on_cluster": on, "prepost_receives": pre,
                            "ratios": ratios, "median_ratio": med})  # fmt: skip
            print(f"{case:9s} {shape:6s} {'on_cluster' if on else 'prior':9s} {med:6.3f}  "
                  f"(runs: {', '.join(f'{x:.3f}' for x in ratios)})")  # fmt: skip
    record = {"machine": machine(), "args": vars(args), "rows": rows, "device_profiles": profiles}
    if medians:
        record["medians"] = medians
    write_record(args.out, record)


if __name__ == "__main__":
    main()
