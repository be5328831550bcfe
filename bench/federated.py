"""Split-federated bench on this machine (CPU, real Ray, gloo, emulated heterogeneous links).

2, 4 and 8 emulated clients, each its own kind of text (non-IID, ``bench/client_texts.py``),
sharing one cloud stage, FedAvg of the gradients every step (``rounds_every: 1``); against
sequential split learning on the same clients and links (``federation.mode: sequential``: the
clients take turns, one client's batch a step, the front handed on through the cloud), one
client alone, and centralised split training of the same model on the union of the clients'
texts with the same global batch. Every client holds the same rows per step, so N
split-federated clients train on N x one client's batch per step.

    python bench/federated.py      # writes bench/results/federated-cpu.json and federated-loss.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from client_texts import write_clients  # noqa: E402
from common import machine, runtime_section, write_record  # noqa: E402

ROWS_PER_CLIENT = 2
MODEL = {
    "vocab_size": 258,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def topology(num_clients: int) -> dict[str, Any]:
    """``num_clients`` CPU clients, each its own uplink to the cloud (20 to 500 Mbit/s in turn)."""
    uplinks = [(500, 5), (40, 15), (20, 30), (100, 10)]
    devices = [
        {"name": f"client-{i}", "memory_gb": 2.0, "tflops": 0.08, "zone": f"z{i}", "owns_data": True}
        for i in range(num_clients)
    ]
    devices.append({"name": "cloud", "tier": "cloud", "memory_gb": 8.0, "tflops": 0.08, "zone": "cloud"})
    zones = [
        {"a": f"z{i}", "b": "cloud", "bandwidth_mbps": uplinks[i % 4][0], "latency_ms": uplinks[i % 4][1]}
        for i in range(num_clients)
    ]
    return {"devices": devices, "links": {"default": {"bandwidth_mbps": 1000, "latency_ms": 0.5}, "zones": zones}}


def run_config(name: str, out: Path, paths: list[Path], steps: int, mode: str = "none") -> dict[str, Any]:
    """``mode``: none (one data owner: ``paths`` may repeat one file), splitfed or sequential
    (one client's batch a step, the clients in turn)."""
    federated = mode != "none"
    n = len(paths) if federated else 1
    rows, mbs = (ROWS_PER_CLIENT, 1) if mode == "sequential" else (ROWS_PER_CLIENT * len(paths), len(paths))
    raw: dict[str, Any] = {
        "name": name,
        "model": {"family": "llama", "config": MODEL},
        "data": {"seq_len": 64, "path": str(paths[0])},
        "topology": {"inline": topology(n)},
        "train": {"steps": steps, "batch_size": rows, "micro_batches": mbs},
        "plan": {"partitioner": "manual", "cuts": [2]},
        "privacy": {"measure": "off"},
        "runtime": runtime_section(out, name, "none", emulate_links=True, timeout_s=120),
    }
    raw["train"].update(lr=3e-3, seed=0)
    if federated:
        raw["plan"]["devices"] = ["+".join(f"client-{i}" for i in range(n)), "cloud"]
        raw["federation"] = {
            "mode": mode,
            "clients": [{"device": f"client-{i}", "data": {"path": str(p)}} for i, p in enumerate(paths)],
        }
    else:
        raw["plan"]["devices"] = ["client-0", "cloud"]
    return raw


def measure(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    result = train(config_from_container(raw, [], "bench", out), progress="none")
    warm = result.step_times[2:] or result.step_times
    tps = result.tokens_per_s[2:] or result.tokens_per_s
    return {
        "name": raw["name"],
        "median_step_s": statistics.median(warm),
        "median_tokens_per_s": statistics.median(tps),
        "predicted_step_ms": result.plan.step_ms,
        "losses": result.losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "federated-cpu.json"))
    args = ap.parse_args()
    rows = []
    one: dict[str, Any] | None = None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for n in args.clients:
            paths = write_clients(base / f"data{n}", n, num_bytes=8_000)
            fed = measure(run_config(f"fed{n}", base, paths, args.steps, "splitfed"), base)
            seq = measure(run_config(f"seq{n}", base, paths, args.steps, "sequential"), base)
            union = base / f"union{n}.txt"
            union.write_text("\n\n".join(p.read_text() for p in paths))
            cen = measure(run_config(f"central{n}", base, [union] * n, args.steps), base)
            if one is None:  # client-0 alone on its own link: the same run for every N
                one = measure(run_config("one", base, paths[:1], args.steps), base)
            rows.append({"clients": n, "federated": fed, "sequential": seq, "centralised": cen, "one_client": one})
            print(
                f"{n} clients: {fed['median_tokens_per_s']:.0f} tok/s split-federated, "
                f"{seq['median_tokens_per_s']:.0f} sequential split learning, "
                f"{one['median_tokens_per_s']:.0f} one client, {cen['median_tokens_per_s']:.0f} centralised; "
                f"final loss {fed['losses'][-1]:.3f} split-federated, {seq['losses'][-1]:.3f} sequential, "
                f"{cen['losses'][-1]:.3f} centralised"
            )
    wall_s = time.perf_counter() - t0
    print(f"bench wall time {wall_s:.0f} s")
    record = {
        "machine": machine(),
        "steps": args.steps,
        "rows_per_client": ROWS_PER_CLIENT,
        "wall_s": round(wall_s, 1),
        "rows": rows,
    }
    write_record(args.out, record)
    plot(rows, Path(args.out).with_name("federated-loss.png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), sharey=True)
    for ax, row in zip(axes if len(rows) > 1 else [axes], rows, strict=True):
        ax.plot(row["federated"]["losses"], label="split-federated")
        ax.plot(row["centralised"]["losses"], label="centralised", linestyle="--")
        ax.plot(row["sequential"]["losses"], label="sequential (1 client/step)", linestyle=":")
        ax.set_title(f"{row['clients']} clients (non-IID)")
        ax.set_xlabel("step")
    axes_list = axes if len(rows) > 1 else [axes]
    axes_list[0].set_ylabel("training loss")
    axes_list[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
