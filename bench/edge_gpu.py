"""A real-size split: an edge stage on the host CPU and the rest of the model on one GPU.

A Llama-shaped model (``--shape 8b``: Llama-3-8B's shape, 8.0B parameters) is initialised
at random on this machine and saved locally in bf16 with ``save_pretrained`` (no hub). A
two-device topology holds an edge device (the host CPU, the data owner) and a GPU; the plan
puts the embedding and the first ``--edge-blocks`` blocks on the edge and the rest on the GPU,
both fine-tuned with LoRA. ``splitlearn train`` then plans, places the two workers on a local
Ray cluster, each loading only its segment from the checkpoint, and trains ``--steps`` steps.
Each worker's load time, segment bytes and peak memory (resident above the runtime's; on the
GPU, torch's peak allocated and reserved) go next to the plan's prediction.

    python bench/edge_gpu.py --shape 8b --out bench/results/edge-gpu-8b.json     # the H200
    python bench/edge_gpu.py --shape 1b --gpu-accelerator cpu --out bench/results/edge-cpu-1b.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, runtime_section, write_record  # noqa: E402
from shapes import LLAMA_SHAPES  # noqa: E402

SHAPES = LLAMA_SHAPES


def save_checkpoint(shape: str, where: Path) -> tuple[Path, float]:
    """The shape's model with random values, in bf16, saved. The values only need to be a
    trainable model's, not splitlearn's seeded init (whose per-module CPU generators take
    minutes at 8B): on a GPU, each matrix is drawn there (std 0.02), norms are ones."""
    import torch

    from splitlearn.config import ModelConfig
    from splitlearn.models.build import build_segment, meta_model
    from splitlearn.models.materialize import init_nonpersistent

    t0 = time.perf_counter()
    cfg = ModelConfig(family="llama", config=SHAPES[shape])
    if torch.cuda.is_available():
        model = meta_model(cfg).to(torch.bfloat16)
        buffers = [n for n, _ in model.named_buffers()]
        model.to_empty(device="cuda")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)
        init_nonpersistent(model, buffers)
    else:
        model = build_segment(cfg, 0, 0, None, dtype=torch.bfloat16)
    path = where / f"llama-{shape}-bf16"
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    return path, time.perf_counter() - t0


def run_config(path: Path, args: argparse.Namespace, out_dir: Path) -> dict:
    return {
        "name": f"edge-gpu-{args.shape}",
        "model": {"path": str(path)},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {
            "inline": {
                "name": "edge-gpu",
                "devices": [
                    {
                        "name": "edge",
                        "tier": "edge",
                        "accelerator": "cpu",
                        "memory_gb": args.edge_memory_gb,
                        "tflops": 0.5,
                        "owns_data": True,
                        "cpu_threads": args.edge_threads,
                        "zone": "edge",
                    },
                    {
                        "name": "gpu",
                        "tier": "cloud",
                        "accelerator": args.gpu_accelerator,
                        "memory_gb": args.gpu_memory_gb,
                        "tflops": 400.0,
                        "cpu_threads": 4,
                        "zone": "cloud",
                    },
                ],
                "links": {"zones": [{"a": "edge", "b": "cloud", "bandwidth_mbps": 1000.0, "latency_ms": 5.0}]},
            }
        },
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batches": 2, "lr": 1e-4, "seed": 0},
        "plan": {"partitioner": "manual", "devices": ["edge", "gpu"], "cuts": [args.edge_blocks + 1]},
        "finetune": {"method": "lora"},
        "runtime": runtime_section(out_dir, "run", "log"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--edge-blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--edge-threads", type=int, default=8)
    ap.add_argument("--edge-memory-gb", type=float, default=32.0)
    ap.add_argument("--gpu-memory-gb", type=float, default=120.0)
    ap.add_argument("--gpu-accelerator", default="cuda", help="cuda, or cpu to rehearse on a CPU-only machine")
    ap.add_argument("--work", default=None, help="where to save the checkpoint (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "edge-gpu-8b.json"))
    args = ap.parse_args()

    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    with tempfile.TemporaryDirectory(prefix="sl-edge-gpu-", dir=args.work) as tmp:
        path, save_s = save_checkpoint(args.shape, Path(tmp))
        print(f"saved {path} in {save_s:.0f} s", flush=True)
        raw = run_config(path, args, Path(tmp) / "runs")
        cfg = config_from_container(raw, [], "bench/edge_gpu.py", ROOT)
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
        s = result.summary
    plan = result.plan
    workers = {w["stage"]: w for w in s["workers"]}
    rows = []
    for m in s.get("memory", []):
        st, w = plan.stages[m["stage"]], workers[m["stage"]]
        rows.append(
            {
                "stage": m["stage"],
                "device": m["device"],
                "layers": [st.start, st.stop],
                "params": w["params"],
                "trainable_params": w["trainable_params"],
                "load_s": w["load_s"],
                "segment_gb": w["segment_bytes"] / 1e9,
                "load_peak_above_runtime_gb": w["load_peak_rss_bytes"] / 1e9,
                **m,
            }
        )
    for r in rows:
        extra = (
            f"  cuda alloc {r['cuda_allocated_gb']:.2f} GB reserved {r['cuda_reserved_gb']:.2f} GB"
            if "cuda_allocated_gb" in r
            else ""
        )
        print(
            f"stage {r['stage']} {r['device']:5s} layers [{r['layers'][0]},{r['layers'][1]}) "
            f"{r['params'] / 1e9:.2f}B params, loaded {r['segment_gb']:.2f} GB in {r['load_s']:.1f} s "
            f"(peak {r['load_peak_above_runtime_gb']:.2f} GB above the runtime); "
            f"planned {r['planned_gb']:.2f} GB, held {r['measured_gb']:.2f} GB{extra}",
            flush=True,
        )
    record = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "machine": machine(),
        "args": vars(args),
        "checkpoint_save_s": save_s,
        "train_wall_s": wall,
        "losses": result.losses,
        "median_step_s": s["median_step_s"],
        "stages": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
