"""A CUDA worker's transfers through host memory (gloo): the runtime's Transport between a
CUDA end and a CPU end, an E2 cut's activation and gradient each way, checked equal after a
round trip (every codec), and timed: the copy between the GPU and host memory alone,
pageable (``Tensor.cpu()``, what the Transport did before) against pinned (what it does now),
and one transfer of the Transport in each direction (median of ``--repeats``).

    python bench/transport_gpu.py --out bench/results/transport-gpu.json     # the lent H200
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, write_record  # noqa: E402

CODECS = ["none", "bf16", "int8"]


def copy_ms(t: torch.Tensor, pinned: bool, repeats: int) -> float:
    """Milliseconds of one copy of CUDA ``t`` to host memory, waited for."""
    runs = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if pinned:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream().synchronize()
        else:
            host = t.cpu()
        runs.append((time.perf_counter() - start) * 1e3)
        del host
    return statistics.median(runs[1:])


def end(rank: int, port: int, shape: list[int], repeats: int, out: dict) -> None:
    """Rank 0 computes on the GPU, rank 1 on the CPU; rank 0 sends, rank 1 sends it back."""
    from splitlearn.stage.fabric import Group, store_for
    from splitlearn.stage.transport import Transport

    timeout = timedelta(seconds=120)
    group = Group(store_for("127.0.0.1", port, rank, 2, timeout), "link", [0, 1], rank, timeout)
    device = torch.device("cuda" if rank == 0 else "cpu")
    transport = Transport(device, None)
    torch.manual_seed(0)
    t = torch.randn(shape, device=device)
    result: dict = {"codecs": {}}
    for codec in CODECS:
        runs = {"to_cpu": [], "round_trip": []}
        for _ in range(repeats + 1):
            if rank == 0:
                torch.cuda.synchronize()
                start = time.perf_counter()
                transport.send(t, 1, group, codec)
                transport.wait_sends()
                sent = time.perf_counter()
                back, _ = transport.recv(1, group)
                torch.cuda.synchronize()
                runs["to_cpu"].append((sent - start) * 1e3)
                runs["round_trip"].append((time.perf_counter() - start) * 1e3)
            else:
                got, _ = transport.recv(0, group)
                transport.send(got, 0, group, "none")  # back as it arrived (decoded)
                transport.wait_sends()
        if rank == 0:
            tol = {"none": 0.0, "bf16": 1e-2, "int8": 5e-2}[codec]
            err = ((back - t).abs().max() / t.abs().max()).item()
            assert back.device.type == "cuda" and back.dtype == t.dtype and back.shape == t.shape
            assert err <= tol, f"{codec}: relative error {err} over {tol}"
            result["codecs"][codec] = {
                "send_ms": statistics.median(runs["to_cpu"][1:]),
                "round_trip_ms": statistics.median(runs["round_trip"][1:]),
                "max_rel_error": err,
            }
    if rank == 0:
        result["copy_to_host_ms"] = {"pageable": copy_ms(t, False, repeats), "pinned": copy_ms(t, True, repeats)}
        out.update(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 512, 2048], help="the cut's activation")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="bench/results/transport-gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("transport_gpu.py: no CUDA device here; run it on the lent GPU machine")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(end, args=(port, args.shape, args.repeats, out), nprocs=2, join=True)
        result = dict(out)
    mb = torch.Size(args.shape).numel() * 4 / 1e6
    print(f"{mb:.1f} MB fp32, GPU end <-> CPU end through gloo, medians of {args.repeats}")
    copies = result["copy_to_host_ms"]
    print(f"copy to host: pageable {copies['pageable']:.2f} ms, pinned {copies['pinned']:.2f} ms")
    for codec, r in result["codecs"].items():
        print(f"{codec:5s} send {r['send_ms']:.2f} ms  round trip {r['round_trip_ms']:.2f} ms  "
              f"max rel error {r['max_rel_error']:.2g}")  # fmt: skip
    write_record(args.out, {"machine": machine(), "args": vars(args), "megabytes": mb, **result})


if __name__ == "__main__":
    main()
