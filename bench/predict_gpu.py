"""Predicted vs measured step time and memory, through ``splitlearn.trainer.train``, with the
devices' own timings (``plan.profile: on_cluster``) and without (FLOPs over ``tflops``).

- ``E1``: one CUDA stage (the GPU owns the data);
- ``E2``: an edge stage on the host CPU (the data owner) and the GPU, ``optimal`` plan, on
  free links, and ``E2-links`` on emulated links (``--link-mbps``, ``--link-ms``);
- ``C2``: two CPU stages (``--cpu-threads`` each), the chain cut in half, on this machine's
  links (no GPU needed).

Each run's summary gives the simulator's prediction for its plan and the median measured
step; memory per stage against the plan as ``bench/memory.py`` reads it.

    python bench/predict_gpu.py --out bench/results/predict-h200.json      # the lent H200
    python bench/predict_gpu.py --cases C2:1 C2:0 --shape small --seq 128 --batch 4 \
        --out bench/results/predict-cpu.json                                # two CPU stages here

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, runtime_section, write_record  # noqa: E402
from shapes import LLAMA_SHAPES  # noqa: E402
from stage_speed import SHAPE, TINY, gpu_device  # noqa: E402


def devices(args: argparse.Namespace, edge: bool) -> list[dict]:
    gpu = gpu_device(args.accelerator, args.peak_tflops, owns_data=not edge)
    if not edge:
        return [gpu]
    host = {"name": "edge", "tier": "edge", "accelerator": "cpu", "memory_gb": 60.0, "tflops": 1.0,
            "owns_data": True, "cpu_threads": args.edge_threads, "zone": "edge"}  # fmt: skip
    return [host, gpu]


def cpu_devices(args: argparse.Namespace) -> list[dict]:
    return [
        {"name": f"cpu-{x}", "tier": t, "accelerator": "cpu", "memory_gb": 12.0, "tflops": 1.0,
         "owns_data": x == "a", "cpu_threads": args.cpu_threads, "zone": "here"}
        for x, t in (("a", "edge"), ("b", "cloud"))
    ]  # fmt: skip


def run_case(args: argparse.Namespace, name: str, out_dir: Path, on_cluster: bool) -> dict:
    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    edge = name.startswith("E2")
    cpus = name == "C2"
    half = SHAPE["num_hidden_layers"] // 2 + 1
    raw = {
        "name": name,
        "model": {"family": "llama", "config": SHAPE},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {
            "inline": {
                "devices": cpu_devices(args) if cpus else devices(args, edge),
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
                else {"default": {"bandwidth_mbps": 1e6, "latency_ms": 0.01}},  # C2: free (this host's loopback)
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
            "devices": ["cpu-a", "cpu-b"] if cpus else [] if edge else ["gpu"],
            "cuts": [half] if cpus else [],
            "profile": "on_cluster" if on_cluster else None,
            "search_seconds": 5,
        },  # fmt: skip
        "finetune": {"method": "full"},
        "runtime": runtime_section(
            out_dir,
            f"{name}-{on_cluster}",
            "none",
            emulate_links=name == "E2-links",
            schedule="1f1b",
            trace=args.trace,
        ),  # fmt: skip
    }
    cfg = config_from_container(raw, [], "predict_gpu", ROOT)
    t0 = time.perf_counter()
    result = train(cfg, progress="none")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    from splitlearn.replay import measured_stage_costs

    measured = measured_stage_costs(result.plan, result.stage_metrics) or []
    stages = [
        {
            "stage": s.index,
            "device": s.device,
            "predicted_ms": {"fwd": s.fwd_ms, "bwd": s.bwd_ms, "opt": s.opt_ms},
            "measured_ms": {"fwd": m.fwd_ms, "bwd": m.bwd_ms, "opt": m.step_ms},
        }
        for s, m in zip(result.plan.stages, measured, strict=False)
    ]
    spans = []  # per traced step: the step as the driver timed it vs its first action's start to last action's end
    for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()[1:]:
        rec = json.loads(line)
        marks = [t for st in rec.get("stages", []) for t in st.get("trace") or []]
        if marks:
            span = max(t[3] for t in marks) - min(t[2] for t in marks)
            busy = sum(t[3] - t[2] for t in marks if t[0] in ("F", "B", "STEP"))
            slow = max(rec["stages"], key=lambda st: st.get("run_s", 0))
            spans.append(
                {
                    "step_ms": rec["step_s"] * 1e3,
                    "actions_span_ms": span,
                    "actions_ms": busy,
                    "worker_exec_ms": slow.get("exec_s", 0) * 1e3,  # the slowest worker's step call
                    "worker_run_ms": slow.get("run_s", 0) * 1e3,
                    # per stage, the ms of each kind of action (transfers too)
                    "by_kind_ms": [
                        {
                            k: sum(t[3] - t[2] for t in st.get("trace") or [] if t[0] == k)
                            for k in dict.fromkeys(t[0] for t in st.get("trace") or [])
                        }
                        for st in rec["stages"]
                    ],  # fmt: skip
                }
            )
    return {
        "case": name,
        "traced_steps": spans,
        "on_cluster": on_cluster,
        "plan": [(s.index, s.devices, s.start, s.stop) for s in result.plan.stages],
        "predicted_ms": summary.get("simulated_step_ms"),
        "measured_ms": summary.get("measured_step_ms"),
        "ratio": (summary.get("measured_step_ms") or 0) / (summary.get("simulated_step_ms") or 1),
        "replayed_ms": summary.get("replayed_step_ms"),
        "replayed_free_links_ms": summary.get("replayed_free_links_step_ms"),
        "stages": stages,
        "links_measured": result.plan.predicted.get("links_measured"),
        "memory": summary.get("memory"),
        "mfu": summary.get("mfu"),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--edge-threads", type=int, default=12)
    ap.add_argument("--link-mbps", type=float, default=1000.0)
    ap.add_argument("--link-ms", type=float, default=5.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--accelerator", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script")
    ap.add_argument("--trace", action="store_true", help="runtime.trace: each step's actions against the step")
    ap.add_argument("--shape", choices=sorted(LLAMA_SHAPES), help="a shape of bench/shapes.py instead")
    ap.add_argument("--cpu-threads", type=int, default=1, help="threads of each C2 stage")
    ap.add_argument("--cases", nargs="*", default=["E1:0", "E1:1", "E2:1", "E2-links:1"],
                    help="NAME:ON_CLUSTER (0 or 1)")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "predict-h200.json"))
    args = ap.parse_args()
    if args.tiny:
        SHAPE.update(TINY)
    if args.shape:
        SHAPE.clear()
        SHAPE.update(LLAMA_SHAPES[args.shape])
    rows = []
    with tempfile.TemporaryDirectory(prefix="sl-predict-") as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")  # measured here, now
        for case in args.cases:
            name, flag = case.split(":")
            rows.append(run_case(args, name, Path(tmp), flag == "1"))
            r = rows[-1]
            print(f"{name:9s} on_cluster={r['on_cluster']!s:5s} predicted {r['predicted_ms']:9.1f} ms  "
                  f"measured {r['measured_ms']:9.1f} ms  x{r['ratio']:.3f}  plan {r['plan']}", flush=True)  # fmt: skip
            if r["traced_steps"]:
                import statistics

                med = {k: statistics.median(t[k] for t in r["traced_steps"]) for k in r["traced_steps"][0]
                       if k != "by_kind_ms"}  # fmt: skip
                print("    traced: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()), flush=True)
                for i, kinds in enumerate(r["traced_steps"][-1]["by_kind_ms"]):
                    print(
                        f"    stage {i} last step: " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items()), flush=True
                    )
            for st in r["stages"]:
                p, m = st["predicted_ms"], st["measured_ms"]
                print(f"    stage {st['stage']} {st['device']}: fwd/bwd/opt ms predicted "
                      f"{p['fwd']:.1f}/{p['bwd']:.1f}/{p['opt']:.1f}, measured {m['fwd']:.1f}/{m['bwd']:.1f}/{m['opt']:.1f}",
                      flush=True)  # fmt: skip
            for m in r["memory"] or []:
                print(f"    stage {m['stage']} {m['device']}: planned {m['planned_gb']:.2f} GB, "
                      f"held {m['measured_gb']:.2f} GB", flush=True)  # fmt: skip
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "splitlearn" / "profiles"
        profiles = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    write_record(
        args.out, {"machine": machine(), "args": vars(args), "shape": SHAPE, "rows": rows, "device_profiles": profiles}
    )


if __name__ == "__main__":
    main()
