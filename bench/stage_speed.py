"""One stage on one GPU against single-GPU training loops, in one process tree and one call.

The same Llama-shaped model (random init, no downloads), batch, sequence length and
precision (fp32 weights, bf16 autocast: fp32 master weights under bf16 compute) trained by:

- ``eager loop``: a plain PyTorch loop, AdamW with ``foreach``, no compilation;
- ``tuned loop``: the same with ``torch.compile`` of the whole model and fused AdamW;
- ``splitlearn`` stages: ``splitlearn.trainer.train`` with a one-device topology (the GPU owns
  the data), ``runtime.compile`` ``auto`` (each block compiled, fused AdamW) and ``none``.

Each figure is the median step time of the steps after ``--warmup``; tokens/s and MFU
(model FLOPs per step, counted by the plan, over ``--peak-tflops``) follow from it.

    python bench/stage_speed.py --out bench/results/stage-speed-h200.json      # the lent H200

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, runtime_section, write_record  # noqa: E402

SHAPE = dict(  # ~1.0B parameters, untied embeddings (65.5M each)
    hidden_size=2048,
    intermediate_size=7168,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
)


TINY = dict(  # a shape to check the scripts with, on a CPU
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
)


def gpu_device(accelerator: str, tflops: float, owns_data: bool = True) -> dict:
    """The one GPU of the benchmarks' topologies (``accelerator=cpu`` to check a script)."""
    return {"name": "gpu", "tier": "cloud", "accelerator": accelerator, "memory_gb": 130.0, "tflops": tflops,
            "owns_data": owns_data, "cpu_threads": 4, "zone": "cloud",
            "gpus": 1.0 if accelerator == "cuda" else 0.0}  # fmt: skip


def loop_step_times(args: argparse.Namespace, tuned: bool) -> list[float]:
    import torch
    import torch.nn.functional as F

    from splitlearn.config import ModelConfig
    from splitlearn.models.build import build_model

    torch.manual_seed(0)
    dev = args.accelerator
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    model = build_model(ModelConfig(family="llama", config=SHAPE), seed=0).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=tuned, foreach=not tuned)
    fwd = torch.compile(model) if tuned else model
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), device=dev)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            logits = fwd(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sync()
        times.append(time.perf_counter() - t0)
    del model, opt, fwd
    if dev == "cuda":
        torch.cuda.empty_cache()
    return times


def stage_run(args: argparse.Namespace, compile_mode: str, out_dir: Path) -> tuple[list[float], dict]:
    from splitlearn.config import config_from_container
    from splitlearn.trainer import train

    raw = {
        "name": f"stage-{compile_mode}",
        "model": {"family": "llama", "config": SHAPE},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "tokenizer": "byte", "seq_len": args.seq},
        "topology": {
            "inline": {
                "devices": [gpu_device(args.accelerator, args.peak_tflops)],
                "links": {"default": {"bandwidth_mbps": 100000.0, "latency_ms": 0.01}},
            }
        },
        "train": {"steps": args.steps, "batch_size": args.batch, "micro_batches": 1, "lr": 1e-4, "dtype": "bf16"},
        "plan": {"partitioner": "manual", "devices": ["gpu"], "cuts": []},
        "runtime": runtime_section(out_dir, f"stage-{compile_mode}", "none", compile=compile_mode),
    }
    cfg = config_from_container(raw, [], "stage_speed", ROOT)
    result = train(cfg, progress="none")
    lines = (out_dir / f"stage-{compile_mode}" / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(x)["step_s"] for x in lines if '"step_s"' in x]
    summary = json.loads((out_dir / f"stage-{compile_mode}" / "summary.json").read_text())
    return times, {"flops_per_step": result.plan.predicted.get("flops_per_step"), "summary_mfu": summary.get("mfu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200: 989)")
    ap.add_argument("--accelerator", default="cuda", help="cuda, or cpu for a smoke run (with a --tiny shape)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, to check the script")
    ap.add_argument("--only", nargs="*", default=None, help="eager, tuned, stage-auto, stage-none")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage-speed-h200.json"))
    args = ap.parse_args()
    if args.tiny:
        SHAPE.update(TINY)
    want = args.only or ["eager", "tuned", "stage-auto", "stage-none"]
    rows, flops = [], None
    with tempfile.TemporaryDirectory(prefix="sl-stage-speed-") as tmp:
        for name in want:
            t0 = time.perf_counter()
            extra: dict = {}
            if name in ("eager", "tuned"):
                times = loop_step_times(args, tuned=name == "tuned")
            else:
                times, extra = stage_run(args, name.split("-", 1)[1], Path(tmp))
                flops = extra["flops_per_step"]
            after = times[args.warmup :] or times
            rows.append(
                {
                    "name": name,
                    "median_step_s": statistics.median(after),
                    "steps_s": times,
                    "wall_s": time.perf_counter() - t0,
                    **extra,
                }
            )
            print(f"{name:12s} median step {rows[-1]['median_step_s'] * 1e3:8.1f} ms", flush=True)
    tokens = args.batch * args.seq
    tuned = next((r["median_step_s"] for r in rows if r["name"] == "tuned"), None)
    print(f"\n{'run':12s} {'step ms':>9s} {'tokens/s':>9s} {'MFU':>6s} {'x tuned':>8s}")
    for r in rows:
        r["tokens_per_s"] = tokens / r["median_step_s"]
        if flops:
            r["mfu"] = flops / (r["median_step_s"] * args.peak_tflops * 1e12)
        if tuned:
            r["x_tuned_tokens_per_s"] = tuned / r["median_step_s"]
        print(
            f"{r['name']:12s} {r['median_step_s'] * 1e3:9.1f} {r['tokens_per_s']:9.0f} "
            f"{r.get('mfu', 0):6.1%} {r.get('x_tuned_tokens_per_s', 0):8.3f}"
        )
    write_record(
        args.out, {"machine": machine(), "args": vars(args), "shape": SHAPE, "flops_per_step": flops, "rows": rows}
    )


if __name__ == "__main__":
    main()
