"""Planner benchmark: how fast are the plans, and how long does planning take.

A suite of heterogeneous topologies (the example files in configs/topologies/ and generated
ones of 2-64 devices: mixed edge/cloud, slow uplinks) times Llama-like models of 12-128
layers (counted on the meta device: no weights). For each case it plans with ``uniform``,
``balanced``, ``optimal`` and DeepSpeed's own ``partition_balanced`` (the real function from
deepspeed.runtime.utils, over the same device order as uniform and balanced, weighting each
layer by its FLOPs), and compares each plan's predicted step time with a lower bound: the
larger of (all the work spread over every device at its full speed) and (the cheapest link
the data owner must use when the model does not fit on it). Prints a table; writes JSON.

    python bench/planner.py            # writes bench/results/planner.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitlearn.config import ModelConfig  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cluster.topology import load_topology, topology_from_container  # noqa: E402
from partitioners import PlanError, PlanRequest, partition  # noqa: E402
from partitioners.planner import CostTables, build_plan, default_device_order  # noqa: E402
from partitioners.profile import LayerProfile  # noqa: E402

MODELS = {  # layers: (hidden, intermediate)
    12: (768, 3072),
    24: (1024, 4096),
    32: (2048, 5632),
    64: (2048, 5632),
    128: (1024, 4096),
}


def model_layers(num_blocks: int, micro_batch: int = 4, seq: int = 512) -> list[LayerProfile]:
    """Counted costs of a Llama-like model on the meta device."""
    from splitlearn.models.costs import meta_profile

    h, i = MODELS[num_blocks]
    cfg = ModelConfig(
        family="llama",
        config=dict(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=num_blocks,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    )
    return meta_profile(cfg, micro_batch, seq)


# A menu of real devices (figures as in configs/topologies/, see the comments there).
EDGE = [
    ("pi5", 5.5, 0.03, "cpu"),
    ("orin-nano", 5.0, 10.0, "cuda"),
    ("orin-nx", 10.0, 15.0, "cuda"),
    ("orin-agx", 40.0, 42.5, "cuda"),
    ("laptop", 12.0, 0.2, "cpu"),
    ("rtx4090", 24.0, 165.0, "cuda"),
]
CLOUD = [("a100", 80.0, 312.0), ("h100", 80.0, 989.0), ("l4", 24.0, 121.0), ("a10g", 24.0, 70.0)]


def generated_topology(rng: random.Random, num_devices: int):
    num_edge = max(1, int(num_devices * rng.uniform(0.4, 0.8)))
    sites = [f"site{j}" for j in range(max(1, num_edge // 6))]
    devices = []
    for k in range(num_edge):
        name, mem, tf, acc = rng.choice(EDGE)
        devices.append(
            {
                "name": f"{name}-{k}",
                "tier": "edge",
                "accelerator": acc,
                "memory_gb": mem,
                "tflops": tf,
                "zone": rng.choice(sites),
                "owns_data": k == 0,
            }
        )
    for k in range(num_devices - num_edge):
        name, mem, tf = rng.choice(CLOUD)
        devices.append(
            {
                "name": f"{name}-{k}",
                "tier": "cloud",
                "accelerator": "cuda",
                "memory_gb": mem,
                "tflops": tf,
                "zone": "cloud",
                "gpus": 1,
            }
        )
    rng.shuffle(devices)  # the order given is not a good order: the planners must find one
    zones = [{"a": a, "b": a, "bandwidth_mbps": rng.choice([300, 940]), "latency_ms": 1} for a in sites]
    zones += [
        {
            "a": a,
            "b": "cloud",
            "bandwidth_mbps": rng.choice([10, 20, 50, 100]),
            "reverse_bandwidth_mbps": 300,
            "latency_ms": rng.choice([10, 20, 40]),
        }
        for a in sites
    ]
    if num_devices - num_edge:
        zones.append({"a": "cloud", "b": "cloud", "bandwidth_mbps": 100_000, "latency_ms": 0.05})
    zone_names = {d["zone"] for d in devices}
    zones = [z for z in zones if z["a"] in zone_names and z["b"] in zone_names]
    return topology_from_container(
        {
            "name": f"gen{num_devices}",
            "devices": devices,
            "links": {"default": {"bandwidth_mbps": 20, "latency_ms": 30}, "zones": zones},
        }
    )


def deepspeed_plan(req: PlanRequest):
    """DeepSpeed's partition_balanced over the same device order, weighting layers by FLOPs."""
    from deepspeed.runtime.utils import partition_balanced

    devices = list(req.devices or default_device_order(req.topology))[: req.n]
    weights = [max(1, layer.fwd_flops + layer.bwd_flops) for layer in req.layers]
    bounds = partition_balanced(weights, len(devices))
    tables = CostTables(req)
    return build_plan(req, tables, devices, list(bounds), "deepspeed")


def lower_bound(req: PlanRequest) -> float:
    """No plan can beat this: every device busy at full speed the whole step, or the owner's
    cheapest mandatory link when the model does not fit on the owner alone."""
    topo = req.topology
    M = req.num_micro_batches
    flops = sum(layer.fwd_flops + layer.bwd_flops for layer in req.layers)
    work_ms = M * flops / (sum(d.tflops for d in topo.devices) * 1e9)
    tables = CostTables(req)
    owner = topo.data_owner.name
    link_ms = 0.0
    if tables.stage_mem(0, req.n, 0, 1) > tables.capacity(owner):
        fits = [i for i in range(1, req.n) if tables.stage_mem(0, i, 0, 2) <= tables.capacity(owner)]
        others = [d.name for d in topo.devices if d.name != owner]
        # each direction of a link is a resource carrying one transfer per micro-batch
        link_ms = M * min((max(tables.link(owner, d, i)) for i in fits for d in others), default=math.inf)
    return max(work_ms, link_ms)


def run_case(topo, layers, M, schedule):
    req = PlanRequest(layers=layers, topology=topo, num_micro_batches=M, schedule=schedule, precision="bf16-master")
    row = {"topology": topo.name, "devices": len(topo.devices), "layers": len(layers), "M": M, "schedule": schedule}
    for name in ("uniform", "balanced", "optimal", "deepspeed"):
        t0 = time.perf_counter()
        try:
            plan = deepspeed_plan(req) if name == "deepspeed" else partition(name, req)
            row[name] = plan.step_ms
            row[f"{name}_stages"] = plan.num_stages
        except PlanError:
            row[name] = None
        row[f"{name}_plan_s"] = time.perf_counter() - t0
    row["lower_bound"] = lower_bound(req)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    topologies = [load_topology(p) for p in sorted((ROOT / "configs" / "topologies").glob("*.yaml"))]
    topologies = [t for t in topologies if t.name != "laptop"]
    sizes = [2, 4, 8, 16, 32, 64] if not args.quick else [4, 16, 64]
    topologies += [generated_topology(rng, k) for k in sizes]
    blocks = list(MODELS) if not args.quick else [12, 128]
    cache = {b: model_layers(b) for b in blocks}
    rows = []
    hdr = (
        f"{'topology':14} {'dev':>3} {'layers':>6} {'sched':5} {'uniform':>9} {'balanced':>9} {'deepspeed':>9} "
        f"{'optimal':>9} {'lower':>9} {'opt x':>6} {'plan s':>7}"
    )
    print(hdr)
    for topo in topologies:
        for b in blocks:
            for M, sched in ((8, "1f1b"),):
                r = run_case(topo, cache[b], M, sched)
                rows.append(r)
                best_simple = min((r[k] for k in ("uniform", "balanced") if r[k]), default=None)
                r["speedup"] = best_simple / r["optimal"] if best_simple and r["optimal"] else None

                def f(v):
                    return f"{v:9.1f}" if v else f"{'infeas.':>9}"

                print(
                    f"{topo.name:14} {r['devices']:>3} {r['layers']:>6} {sched:5} {f(r['uniform'])} "
                    f"{f(r['balanced'])} {f(r['deepspeed'])} {f(r['optimal'])} {r['lower_bound']:9.1f} "
                    f"{(r['speedup'] or 0):6.2f} {r['optimal_plan_s']:7.3f}",
                    flush=True,
                )
    speedups = [r["speedup"] for r in rows if r["speedup"]]
    geo = math.exp(statistics.fmean(math.log(s) for s in speedups)) if speedups else None
    big = [r["optimal_plan_s"] for r in rows if r["devices"] == 64 and r["layers"] >= 130]
    summary = {
        "geomean_speedup_vs_best_of_uniform_balanced": geo,
        "cases_with_a_feasible_simple_plan": len(speedups),
        "cases": len(rows),
        "max_plan_s_64_devices_128_layers": max(big) if big else None,
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
