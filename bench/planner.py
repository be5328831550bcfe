"""Planner benchmark: how good are ``optimal``'s plans against honest baselines, and how long
does planning take.

Topology families: the example files (home lab, hospital, phones, 8+4) and generated
topologies of 4-64 devices (mixed edge/cloud sites, slow uplinks: "random"). Models:
Llama-like chains of 14-130 layers counted on the meta device (no weights). Every plan's
step is the simulator's (the planner's objective). Baselines, each given the best it can
do without the planner's search:

- ``balanced``: the cuts that minimise the largest stage, over the best of three natural
  device orders (as listed with the data owner first; the owner then the others by link
  from the owner and speed; the owner then the others by speed) and every device count;
- ``deepspeed``: DeepSpeed's own ``partition_balanced`` (deepspeed.runtime.utils, layers
  weighted by FLOPs) over the same orders and counts;
- ``greedy``: the owner, then the fastest devices one at a time while the step drops
  (balanced cuts);
- ``brute``: every plan (``exhaustive``), where it runs in seconds (<= 4 devices).

Prints per-family geomean and worst ratios (baseline step / optimal step; above 1: optimal
is faster), the cases where optimal gains nothing, and planning times; writes JSON.

    python bench/planner.py            # writes bench/results/planner.json
    python bench/planner.py --quick    # fewer cases
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitlearn.config import ModelConfig  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cluster.topology import load_topology, topology_from_container  # noqa: E402
from partitioners import Plan, PlanError, PlanRequest, partition  # noqa: E402
from partitioners.planner import CostTables, build_plan  # noqa: E402
from partitioners.planner.optimal import natural_orders  # noqa: E402
from partitioners.profile import LayerProfile  # noqa: E402

MODELS = {  # layers: (hidden, intermediate)
    12: (768, 3072),
    30: (2048, 5632),
    126: (1024, 4096),
    254: (1024, 4096),
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


def orders(req: PlanRequest) -> dict[str, list[str]]:
    """The natural device orders optimal also seeds from, the data owner first."""
    return natural_orders(req, req.topology.data_owner.name)


COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


def _plan_on(req: PlanRequest, devices: list[str], how: str) -> Plan | None:
    r = dataclasses.replace(req, devices=devices)
    try:
        if how == "deepspeed":
            from deepspeed.runtime.utils import partition_balanced

            weights = [max(1, layer.fwd_flops + layer.bwd_flops) for layer in r.layers]
            bounds = list(partition_balanced(weights, len(devices)))
            return build_plan(r, CostTables(r), devices, bounds, "deepspeed")
        return partition("balanced", r)
    except PlanError:
        return None


def best_over_orders(req: PlanRequest, how: str) -> Plan | None:
    """The best plan of ``how`` over the natural orders and device counts."""
    best = None
    for order in orders(req).values():
        for k in COUNTS:
            if k > len(order) or k > req.n:
                break
            plan = _plan_on(req, order[:k], how)
            if plan and (best is None or plan.step_ms < best.step_ms):
                best = plan
    return best


def greedy(req: PlanRequest) -> Plan | None:
    """The owner, then the fastest devices one at a time while the step drops."""
    order = orders(req)["speed"]
    best = None
    for k in range(1, min(len(order), req.n) + 1):
        plan = _plan_on(req, order[:k], "balanced")
        if plan is None:
            if best is None:
                continue  # the owner alone may not fit: keep adding
            break
        if best is not None and plan.step_ms >= best.step_ms:
            break
        best = plan
    return best


def run_case(family: str, topo, layers, M: int, schedule: str, brute: bool) -> dict[str, Any]:
    req = PlanRequest(layers=layers, topology=topo, num_micro_batches=M, schedule=schedule, precision="bf16-master")
    row: dict[str, Any] = {
        "family": family,
        "topology": topo.name,
        "devices": len(topo.devices),
        "layers": len(layers),
        "M": M,
        "schedule": schedule,
    }
    t0 = time.perf_counter()
    try:
        plan = partition("optimal", req)
    except PlanError as e:
        row["optimal"] = None
        row["error"] = str(e)
        return row
    row["optimal_plan_s"] = time.perf_counter() - t0
    row["optimal"] = plan.step_ms
    row["optimal_stages"] = plan.num_stages
    row["lower_bound"] = plan.predicted.get("lower_bound_ms")
    for name, fn in (
        ("balanced", lambda: best_over_orders(req, "balanced")),
        ("deepspeed", lambda: best_over_orders(req, "deepspeed")),
        ("greedy", lambda: greedy(req)),
        ("brute", (lambda: partition("exhaustive", req)) if brute else None),
    ):
        if fn is None:
            continue
        try:
            other = fn()
        except PlanError:
            other = None
        row[name] = other.step_ms if other else None
    return row


def geomean(xs: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def timing(rng: random.Random, reps: int) -> list[dict[str, Any]]:
    """``optimal``'s planning time (median of ``reps``) on large generated topologies."""
    out = []
    for blocks, devices in ((126, 64), (254, 128)):
        layers = model_layers(blocks)
        topo = generated_topology(rng, devices)
        req = PlanRequest(layers=layers, topology=topo, num_micro_batches=8, schedule="1f1b", precision="bf16-master")
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            plan = partition("optimal", req)
            times.append(time.perf_counter() - t0)
        out.append(
            {
                "layers": len(layers),
                "devices": devices,
                "median_s": statistics.median(times),
                "runs_s": times,
                "step_ms": plan.step_ms,
                "lower_bound_ms": plan.predicted.get("lower_bound_ms"),
            }
        )
        print(
            f"plan time {len(layers)} layers x {devices} devices: median {statistics.median(times):.3f} s", flush=True
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3, help="planning-time repetitions per large case")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    named = {"home-lab": "home lab", "hospital": "hospital", "phones": "phones", "edge8-cloud4": "8+4"}
    cases = [
        (named[p.stem], load_topology(p))
        for p in sorted((ROOT / "configs" / "topologies").glob("*.yaml"))
        if p.stem in named
    ]
    sizes = (4, 8, 16, 32, 64) if not args.quick else (4, 16)
    cases += [("random", generated_topology(rng, k)) for k in sizes]
    blocks = (12, 30, 126) if not args.quick else (12, 30)
    profiles = {b: model_layers(b) for b in blocks}
    rows = []
    print(
        f"{'family':9} {'topology':13} {'dev':>3} {'lay':>4} {'sched':5} {'optimal':>9} {'bound':>6} {'balanced':>9} {'deepspeed':>9} {'greedy':>9} {'brute':>9} {'plan s':>7}"
    )
    for family, topo in cases:
        for b in blocks:
            for schedule in ("1f1b", "gpipe"):
                brute = len(topo.devices) <= 4 and b <= 12
                r = run_case(family, topo, profiles[b], 8, schedule, brute)
                rows.append(r)

                def f(v: float | None) -> str:
                    return f"{v:9.1f}" if v else f"{'-':>9}"

                gap = f"{r['optimal'] / r['lower_bound'] - 1:6.1%}" if r.get("lower_bound") else f"{'-':>6}"
                print(
                    f"{family:9} {topo.name:13} {r['devices']:>3} {r['layers']:>4} {schedule:5} {f(r['optimal'])} {gap} "
                    f"{f(r.get('balanced'))} {f(r.get('deepspeed'))} {f(r.get('greedy'))} {f(r.get('brute'))} "
                    f"{r.get('optimal_plan_s', 0):7.3f}",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    print(f"\n{'family':9} {'baseline':9} {'cases':>5} {'geomean':>8} {'worst':>7} {'best':>7} {'no gain':>7}")
    for family in dict.fromkeys(r["family"] for r in rows):
        for base in ("balanced", "deepspeed", "greedy", "brute"):
            ratios = [
                r[base] / r["optimal"] for r in rows if r["family"] == family and r.get(base) and r.get("optimal")
            ]
            if not ratios:
                continue
            entry = {
                "cases": len(ratios),
                "geomean": geomean(ratios),
                "worst": min(ratios),
                "best": max(ratios),
                "no_gain": sum(x < 1.01 for x in ratios),
            }
            summary.setdefault(family, {})[base] = entry
            print(
                f"{family:9} {base:9} {entry['cases']:>5} {entry['geomean']:8.3f} {entry['worst']:7.3f} "
                f"{entry['best']:7.3f} {entry['no_gain']:>7}"
            )
    print("(ratio = baseline step / optimal step; 'no gain': cases within 1% of optimal or better)")
    times = timing(rng, args.reps) if not args.quick else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": platform.node(), "summary": summary, "timing": times, "rows": rows}, indent=2)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
