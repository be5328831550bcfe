"""Runtime benchmark on this machine (CPU, real Ray, gloo).

(a) overhead: the whole model as one stage in a Ray worker vs a plain single-process
    PyTorch loop over the same model, batch and micro-batches (one thread each): tokens/s,
    the two stepped in turns (see :func:`overhead_pairs`).
(b) schedules: sequential vs GPipe vs 1F1B on a 3-stage plan co-located here: tokens/s and
    each stage's peak memory (measured in the worker with torch's allocation events).
(c) rehearsal: a 2-stage plan with emulated links (LAN, 100 Mbit/s, 20 Mbit/s) and codecs
    (none, int8): measured step time vs the simulator for the same plan, schedule and links,
    twice: "replayed", on the compute the workers measured in the same steps (each stage's
    forward and backward per micro-batch and its STEP, medians; ``splitlearn.replay``), which
    checks the schedule and link model the rehearsal stands for; and "profile", on a
    measured, calibrated per-layer profile of the model taken in this process before the
    runs, which adds the compute cost model's error on this machine (its noise, and stages
    slowing each other when they compute at once on two cores). Each row also records both
    compute figures per stage and the 1-minute load average when it ended.
    The prediction also counts the costs the stages' action lists do not hold, each MEASURED
    here first (``host_costs`` in the JSON, :func:`measure_host_costs`): the driver's Ray
    round trip and the grad-norm all-reduce per step, and the host CPU that each end of a
    transfer spends in gloo (a gloo stream between two processes at a few sizes).

    python bench/runtime.py          # writes bench/results/runtime-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import torch  # noqa: E402

from cluster.ray_cluster import connect  # noqa: E402
from partitioners.planner import simulate_plan  # noqa: E402
from partitioners.profile import calibrate_tflops  # noqa: E402
from partitioners.simulator import HostCost  # noqa: E402
from splitlearn.config import config_from_container  # noqa: E402
from splitlearn.data import BatchSource, load_dataset  # noqa: E402
from splitlearn.models import build_model  # noqa: E402
from splitlearn.optim import make_optimizer, reference_step  # noqa: E402
from splitlearn.planning import make_plan, plan_request  # noqa: E402
from splitlearn.profile_report import profile_model  # noqa: E402
from splitlearn.replay import measured_stage_costs  # noqa: E402
from splitlearn.runtime import StageGroup  # noqa: E402

DEVICES = ["edge", "mid", "cloud"]
MODEL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 258,
    "max_position_embeddings": 256,
}


def topology(tflops: float, link: dict | None = None) -> dict:
    return {
        "name": "bench",
        "devices": [
            {
                "name": d,
                "tier": "edge" if d != "cloud" else "cloud",
                "memory_gb": 4.0,
                "tflops": tflops,
                "owns_data": d == "edge",
                "cpu_threads": 1,
                "zone": d,
            }
            for d in DEVICES
        ],
        "links": {"default": link or {"bandwidth_mbps": 100_000, "latency_ms": 0.0}},
    }


def run_config(tflops, devices, cuts, schedule, m, link=None, codec="none", **runtime):
    raw = {
        "name": "bench",
        "model": {"family": "llama", "config": MODEL},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 128},
        "topology": {"inline": topology(tflops, link)},
        "train": {"steps": 1, "batch_size": 16, "micro_batches": m, "lr": 1e-3, "seed": 0},
        "plan": {"partitioner": "manual", "devices": devices, "cuts": cuts, "codec": codec},
        "runtime": {"schedule": schedule, "timeout_s": 120, "progress": "none", **runtime},
    }
    return config_from_container(raw, [], "bench", ROOT)


def measure_runtime(cfg, steps: int, profile=None, before_step=None):
    """Run ``steps`` timed steps (after one untimed: it allocates gradients and optimizer
    state) of the config's plan; returns the plan, the step times and each step's stage
    metrics. ``before_step(step)``, when given, runs before each step, outside its time."""
    req = plan_request(cfg, profile)
    plan = make_plan(cfg, request=req)
    group = StageGroup(plan, cfg.topology, cfg.resolved_dict(), str(ROOT), cfg.run.runtime.timeout_s, 60)
    try:
        group.start(prepare_timeout_s=180)
        times, metrics = [], []
        for step in range(steps + 1):
            if before_step is not None:
                before_step(step)
            t0 = time.perf_counter()
            last = group.step(step)
            if step:
                times.append(time.perf_counter() - t0)
                metrics.append(last)
    finally:
        group.shutdown()
    return plan, times, metrics


def overhead_pairs(cfg, steps: int) -> dict:
    """The whole model as one stage in a Ray worker vs a plain single-process loop of the
    same model, batch and micro-batches, stepped in turns (a plain step, then a worker step,
    ...) so that both see the same state of a shared machine: its speed moves by 10-20 %
    between windows of a few seconds. The ratio is the median of the per-pair ratios."""
    run = cfg.run
    model = build_model(run.model, run.train.seed)
    model.train()
    opt = make_optimizer(model.parameters(), run.train)
    ds, _ = load_dataset(run.data)
    batches = BatchSource(ds, run.train.batch_size, run.train.seed)
    plain = []

    def plain_step(step: int) -> None:
        t0 = time.perf_counter()
        reference_step(model, batches.batch(step), run.train, opt, step)
        if step:
            plain.append(time.perf_counter() - t0)

    _, ours, _ = measure_runtime(cfg, steps, before_step=plain_step)
    return {
        "plain_step_s": statistics.median(plain),
        "runtime_1stage_step_s": statistics.median(ours),
        "tokens_per_s_ratio": statistics.median(a / b for a, b in zip(plain, ours, strict=True)),
        "pairs_s": [[round(a, 4), round(b, 4)] for a, b in zip(plain, ours, strict=True)],
    }


# -- costs outside the stages' action lists, measured on this machine -----------------------

HEADER_BYTES = 8 * 8  # the runtime's per-tensor header: int64[8], sent before the payload
TRANSFER_SIZES = (16 * 1024, 128 * 1024, 512 * 1024, 1024 * 1024)  # labels, int8 / fp32 activations


def _cpu_s() -> float:
    """CPU seconds of this process, every thread (gloo's network threads included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


LATE_S = 0.005  # a late receiver reaches its receive this long after the data was sent


def _gloo_bench(rank: int, port: int, reps: int, q) -> None:
    """Rank 0 streams ``reps`` transfers of each size to rank 1 the way the runtime does (a
    header, then the payload; isend and wait at the end; the receiver blocks in recv), and
    each rank reports its CPU seconds per transfer; twice: with the receiver waiting in its
    receive ("posted"), and with the receiver reaching each receive ``LATE_S`` after the data
    was sent ("late", it sleeps, which costs no CPU), as a stage does when the transfer comes
    in while it computes: gloo then holds the message until it is asked for, at a higher CPU
    cost. Then the grad-norm all-reduce (one fp32 scalar over both ranks), wall time per call."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out: dict = {"posted": {}, "late": {}, "allreduce_ms": None}
    header = torch.zeros(HEADER_BYTES // 8, dtype=torch.int64)
    for mode in ("posted", "late"):
        n = reps if mode == "posted" else max(reps // 3, 10)
        for nbytes in TRANSFER_SIZES:
            payload = torch.zeros(nbytes // 4)
            rounds = []
            for r in range(4):  # round 0 warms up (connections, allocations)
                dist.barrier()
                c0 = _cpu_s()
                if rank == 0:
                    works = []
                    for _ in range(n):
                        works += [dist.isend(header, 1), dist.isend(payload, 1)]
                    for w in works:
                        w.wait()
                else:
                    for _ in range(n):
                        if mode == "late":
                            time.sleep(LATE_S)
                        dist.recv(header, 0)
                        dist.recv(payload, 0)
                if r:
                    rounds.append((_cpu_s() - c0) / n * 1e3)
            out[mode][nbytes] = statistics.median(rounds)
    x = torch.ones(())
    times = []
    for i in range(220):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if i >= 20:
            times.append((time.perf_counter() - t0) * 1e3)
    out["allreduce_ms"] = statistics.median(times)
    dist.destroy_process_group()
    q.put((rank, out))


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; a cost cannot fall with the bytes, so when the fitted
    slope is negative (noise larger than the size effect) the cost is the median, flat."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if b < 0:
        return statistics.median(ys), 0.0
    return my - b * mx, b


def measure_host_costs(reps: int = 100, pings: int = 300) -> dict:
    """The costs a step pays outside its stages' action lists, measured here.

    Per transfer, host CPU on each end: CPU time (``getrusage`` of the whole process, so gloo's
    own network threads count) of a sender and a receiver process, per transfer, fitted as
    ``fixed + per MB`` over a few sizes, for a receiver waiting in its receive and for a late
    one (see :func:`_gloo_bench`); the sender's cost is the late case's, the common one in the
    compute-bound rows (a stage computes while its neighbour's transfer comes in). CPU time rather than the wall time of a ping-pong
    pinned to one core: what the simulator needs is how long a transfer keeps a core from the
    stage's compute. In the rehearsal the two workers' single-threaded compute already fills
    the two cores, so every CPU millisecond gloo spends is taken from a stage; the wall time of
    a pinned ping-pong would add the loopback latency and the scheduler's hand-offs between
    the two processes, which the link emulation and the stage's own waits already count.

    Per step: the driver's Ray round trip (median wall time of an empty call to two actors
    at once, as ``StageGroup.step`` calls its workers) and the grad-norm all-reduce (median
    wall time of a one-scalar gloo all-reduce between two processes)."""
    import ray

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_gloo_bench, args=(r, port, reps, q)) for r in range(2)]
    for pr in procs:
        pr.start()
    res = dict(q.get(timeout=300) for _ in procs)
    for pr in procs:
        pr.join(60)
    sizes = list(TRANSFER_SIZES)
    xs = [n + HEADER_BYTES for n in sizes]
    send = _fit(xs, [res[0]["late"][n] for n in sizes])
    recv = _fit(xs, [res[1]["posted"][n] for n in sizes])
    recv_late = _fit(xs, [res[1]["late"][n] for n in sizes])

    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self, step: int) -> dict:
            return {"step": step}

    actors = [Pinger.remote(), Pinger.remote()]
    ray.get([a.ping.remote(-1) for a in actors])
    rtt = []
    for i in range(pings):
        t0 = time.perf_counter()
        ray.get([a.ping.remote(i) for a in actors])
        rtt.append((time.perf_counter() - t0) * 1e3)
    for a in actors:
        ray.kill(a)
    return {
        "transfer_cpu_ms": {
            "bytes": xs,
            **{
                f"{who}_{mode}": [res[rank][mode][n] for n in sizes]
                for rank, who in enumerate(("sender", "receiver"))
                for mode in ("posted", "late")
            },
        },
        "send_host": {"fixed_ms": send[0], "ms_per_mb": send[1] * 1e6},
        "recv_host": {"fixed_ms": recv[0], "ms_per_mb": recv[1] * 1e6},
        "recv_late_host": {"fixed_ms": recv_late[0], "ms_per_mb": recv_late[1] * 1e6},
        "ray_round_trip_ms": statistics.median(rtt),
        "grad_norm_allreduce_ms": res[0]["allreduce_ms"],
        "step_overhead_ms": statistics.median(rtt) + res[0]["allreduce_ms"],
        "load_1min": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime-cpu.json"))
    ap.add_argument("--parts", default="abc", help="which parts to run (default: abc)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tflops = calibrate_tflops("cpu", size=512)
    print(f"calibrated: {tflops * 1e3:.1f} GFLOP/s on one thread")
    tokens = 16 * 128
    results: dict = {"host": platform.node(), "torch": torch.__version__, "calibrated_tflops": tflops}
    handle = connect(
        config_from_container(
            {
                "model": {"family": "llama"},
                "data": {"path": str(ROOT / "data/quickstart.txt")},
                "topology": {"inline": topology(tflops)},
            },
            [],
            "bench",
            ROOT,
        ).topology
    )
    try:
        if "a" in args.parts:
            # (a) overhead
            cfg = run_config(tflops, ["edge"], [], "sequential", 2)
            over = overhead_pairs(cfg, 2 * args.steps)
            results["overhead"] = over
            plain, ours = over["plain_step_s"], over["runtime_1stage_step_s"]
            print(
                f"(a) one stage in a Ray worker vs plain loop, stepped in turns: {tokens / ours:.0f} vs "
                f"{tokens / plain:.0f} tokens/s (medians), ratio {over['tokens_per_s_ratio']:.3f} (median of pairs)"
            )

        if "b" in args.parts:
            # (b) schedules on 3 co-located stages
            rows = []
            print("(b) schedule     tokens/s   peak MB per stage")
            for sched in ("sequential", "gpipe", "1f1b"):
                cfg = run_config(tflops, DEVICES, [3, 5], sched, 4)
                _, times, _ = measure_runtime(cfg, args.steps)
                step_s = statistics.median(times)
                cfg_mem = run_config(tflops, DEVICES, [3, 5], sched, 4, measure_memory=True)
                _, _, metrics = measure_runtime(cfg_mem, 2)
                peaks = [s["peak_bytes"] / 1e6 for s in metrics[-1]]
                rows.append({"schedule": sched, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_mb": peaks})
                print(f"    {sched:10} {tokens / step_s:9.0f}   {', '.join(f'{p:.1f}' for p in peaks)}")
            results["schedules"] = rows

        if "c" in args.parts:
            # (c) rehearsal: measured vs predicted with emulated links
            cfg = run_config(tflops, ["edge", "cloud"], [4], "1f1b", 4)
            prof, _ = profile_model(cfg, repeats=5)
            prof.calibrated_tflops = tflops  # the topology's devices are this machine, one thread each
            host = measure_host_costs()
            results["host_costs"] = host
            send_host, recv_host = HostCost(**host["send_host"]), HostCost(**host["recv_host"])
            recv_late_host = HostCost(**host["recv_late_host"])
            print(
                f"    measured: Ray round trip {host['ray_round_trip_ms']:.2f} ms, grad-norm all-reduce "
                f"{host['grad_norm_allreduce_ms']:.2f} ms; host CPU per transfer: send "
                f"{send_host.fixed_ms:.3f} + {send_host.ms_per_mb:.2f}/MB ms, receive "
                f"{recv_host.fixed_ms:.3f} + {recv_host.ms_per_mb:.2f}/MB ms (late "
                f"{recv_late_host.fixed_ms:.3f} + {recv_late_host.ms_per_mb:.2f}/MB ms)"
            )
            # the step's labels, int64, one header: the emulator sends them to the last stage
            # on the same emulated wire as the activations (first, at the step's start); the
            # simulator gives them their own line, which here gives the same times (they are
            # done long before the first activation leaves, after a forward)
            labels_bytes = 16 * 128 * 8 + HEADER_BYTES
            links = {
                "LAN 1 Gbit/s": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
                "100 Mbit/s": {"bandwidth_mbps": 100, "latency_ms": 5},
                "20 Mbit/s uplink": {"bandwidth_mbps": 20, "latency_ms": 20},
            }
            rows = []
            print(
                "(c) link              codec  measured ms  replayed ms  ratio  free links  profile ms  ratio\n"
                "    (replayed: the simulator on the compute the workers measured in these steps and the\n"
                "    emulated links; free links: the same compute, instant transfers; profile: the\n"
                "    simulator on the per-layer profile measured in this process before the runs)"
            )
            for lname, link in links.items():
                for codec in ("none", "int8"):
                    cfg = run_config(
                        tflops, ["edge", "cloud"], [4], "1f1b", 4, link=link, codec=codec, emulate_links=True
                    )
                    plan, times, metrics = measure_runtime(cfg, args.steps, profile=prof)
                    step_s = statistics.median(times)
                    stages_only = plan.predicted["simulated_step_ms"]
                    extras = {
                        "labels_ms": cfg.topology.transfer_ms("edge", "cloud", labels_bytes),
                        "step_overhead_ms": host["step_overhead_ms"],
                        "send_host": send_host,
                        "recv_host": recv_host,
                        "recv_late_host": recv_late_host,
                        "labels_bytes": labels_bytes,
                    }
                    pred = simulate_plan(plan, **extras).step_ms
                    # the same simulation on the compute the workers measured in these steps
                    measured_costs = measured_stage_costs(plan, metrics, skip_first=False)
                    replayed = simulate_plan(plan, stage_costs=measured_costs, **extras).step_ms
                    free = simulate_plan(plan, stage_costs=measured_costs, free_links=True, **extras).step_ms
                    ms = step_s * 1e3
                    rows.append(
                        {
                            "link": lname,
                            "codec": codec,
                            "measured_ms": ms,
                            "replayed_ms": replayed,
                            "ratio": ms / replayed,
                            "replayed_free_links_ms": free,
                            "predicted_ms": pred,
                            "ratio_profile": ms / pred,
                            "predicted_stages_only_ms": stages_only,
                            "ratio_stages_only": ms / stages_only,
                            "predicted_fwd_bwd_opt_ms": [
                                [round(st.fwd_ms, 2), round(st.bwd_ms, 2), round(st.opt_ms, 2)] for st in plan.stages
                            ],
                            "measured_fwd_bwd_opt_ms": [
                                [round(c.fwd_ms, 2), round(c.bwd_ms, 2), round(c.step_ms, 2)] for c in measured_costs
                            ],
                            "load_1min": os.getloadavg()[0],
                        }
                    )
                    print(
                        f"    {lname:17} {codec:5} {ms:12.1f} {replayed:12.1f} {ms / replayed:6.3f}"
                        f" {free:10.1f} {pred:11.1f} {ms / pred:6.3f}"
                    )
            results["rehearsal"] = rows
            results["rehearsal_within_15pct"] = all(0.85 <= r["ratio"] <= 1.15 for r in rows)
            results["rehearsal_profile_within_15pct"] = all(0.85 <= r["ratio_profile"] <= 1.15 for r in rows)
        if "schedules" in results:
            sched = {r["schedule"]: r for r in results["schedules"]}
            results["one_f_one_b_lower_peak_than_gpipe"] = all(
                a < b for a, b in zip(sched["1f1b"]["peak_mb"][:-1], sched["gpipe"]["peak_mb"][:-1], strict=True)
            )
    finally:
        handle.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("pct") or k.startswith("one_f")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
