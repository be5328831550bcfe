"""Edge fit: the edge stage of a 16-layer model under full fine-tuning, LoRA, LoRA with
activation recompute, and LoRA on int8 frozen weights — predicted and measured peak memory
and step time, and the loss each reaches on the quickstart data.

The model is a Llama-family model of 16 blocks (hidden 256), cut into four stages under
1F1B with four micro-batches; the edge stage is the first one (embedding and blocks 0-3),
which holds the most micro-batches in flight. For each method:

- predicted: the layers are profiled with the method applied (``splitlearn profile``'s
  code), and the cost model gives the stage's peak memory and compute time;
- measured: the stage is built as a worker builds it (the method applied to its segment),
  then run in this process through its 1F1B actions (token ids in, random gradients from
  the next stage) and its optimizer step. Peak memory is torch's own accounting (CPU:
  the profiler's allocation events) above the tensors that persist between steps —
  weights (compact ones by their inner tensors), gradients, optimizer state — which are
  counted exactly;
- loss: the whole model trains N steps on the quickstart data through the real runtime
  (``splitlearn.trainer.train``: Ray actors over gloo), the edge stage with the method,
  the other stages fully.

    python bench/edgefit.py                 # writes bench/results/edgefit.json
    python bench/edgefit.py --steps 10      # fewer training steps
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster.topology import Device  # noqa: E402
from partitioners import schedule as S  # noqa: E402
from partitioners.costmodel import StageMethod, stage_memory, stage_time  # noqa: E402
from partitioners.profile import _inner, peak_allocated_bytes  # noqa: E402
from splitlearn.config import config_from_container  # noqa: E402
from splitlearn.models.build import build_model  # noqa: E402
from splitlearn.models.chain import Segment  # noqa: E402
from splitlearn.models.methods import LoraSpec, apply_methods  # noqa: E402
from splitlearn.optim import make_optimizer  # noqa: E402
from splitlearn.profile_report import profile_model  # noqa: E402

METHODS = {
    "full": StageMethod("full"),
    "lora": StageMethod("lora"),
    "lora+recompute": StageMethod("lora", recompute=True),
    "lora+int8": StageMethod("lora", frozen_dtype="int8"),
}
MODEL = dict(
    vocab_size=258,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
CUTS = [5, 9, 13]  # chain of 18: [0,5) embed + blocks 0-3 on the edge, then 4 blocks per stage
DEVICES = ["edge-phone", "home-server", "cloud-a", "cloud-b"]
SCHEDULE, NUM_MB = "1f1b", 4


def topology() -> dict:
    def dev(name, tier, owns=False):
        return {
            "name": name,
            "tier": tier,
            "accelerator": "cpu",
            "memory_gb": 4.0,
            "host_memory_gb": 4.0,
            "tflops": 0.02,
            "zone": "home" if tier == "edge" else "cloud",
            "owns_data": owns,
            "cpu_threads": 1,
        }

    return {
        "devices": [
            dev("edge-phone", "edge", True),
            dev("home-server", "edge"),
            dev("cloud-a", "cloud"),
            dev("cloud-b", "cloud"),
        ],
        "links": {"default": {"bandwidth_mbps": 10000, "latency_ms": 0.1}},
    }


def run_config(method: StageMethod, steps: int, batch: int, seq: int, lr: float, out_dir: str):
    raw = {
        "name": "edgefit",
        "model": {"family": "llama", "config": MODEL},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": seq},
        "topology": {"inline": topology()},
        "train": {"steps": steps, "batch_size": batch, "micro_batches": NUM_MB, "lr": lr, "warmup_steps": 5, "seed": 0},
        "plan": {"partitioner": "manual", "devices": DEVICES, "cuts": CUTS},
        "finetune": {
            "lora": {"r": 8, "alpha": 16},
            "by_stage": {
                "0": {"method": method.method, "recompute": method.recompute, "frozen_dtype": method.frozen_dtype}
            },
        },
        "runtime": {
            "schedule": SCHEDULE,
            "output_dir": out_dir,
            "progress": "none",
            "checkpoint": False,
            "timeout_s": 600,
        },
    }
    return config_from_container(raw, [], "bench/edgefit", ROOT)


def edge_actions() -> list:
    return [a for a in S.build(SCHEDULE, len(DEVICES), NUM_MB)[0] if a.kind in (S.F, S.B, S.STEP)]


def run_edge_stage(seg, opt, acts, ids):
    """One step of the edge stage in its 1F1B order: token ids in, the next stage's
    gradients stood in for by random tensors, then the optimizer step."""
    mb = ids.shape[0] // NUM_MB
    outputs = {}
    for a in acts:
        if a.kind == S.F:
            outputs[a.mb] = seg(ids[a.mb * mb : (a.mb + 1) * mb])
        elif a.kind == S.B:
            out = outputs.pop(a.mb)
            out.backward(torch.randn_like(out))
        else:
            opt.step()
            opt.zero_grad(set_to_none=False)


def persistent_bytes(seg, opt) -> int:
    """Weights (compact ones by their inner tensors), gradients and optimizer state."""
    n = sum(sum(x.numel() * x.element_size() for x in _inner(p)) for p in seg.parameters())
    n += sum(p.grad.numel() * p.grad.element_size() for p in seg.parameters() if p.grad is not None)
    n += sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    return n


def measure(cfg, method: StageMethod, layers, steps: int, device: str = "cpu") -> dict:
    run = cfg.run
    a, b = 0, CUTS[0]
    mem = stage_memory(
        layers, stage=0, num_stages=len(DEVICES), schedule=SCHEDULE, num_micro_batches=NUM_MB, method=method
    )
    here = Device(name="here", memory_gb=1e9, tflops=1.0)
    pred_ms = stage_time(layers, here, 1.0, method=method).step_ms(NUM_MB)

    torch.manual_seed(0)
    # as a worker builds it: the segment on its device, then the method applied
    seg = Segment(build_model(run.model, 0), a, b, recompute=method.recompute).to(device)
    apply_methods(seg.model, [(a, b, method)], LoraSpec(r=8, alpha=16), 0)
    seg.train()
    opt = make_optimizer(seg.parameters(), run.train)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (run.train.batch_size, run.data.seq_len), generator=g).to(device)
    acts = edge_actions()
    run_edge_stage(seg, opt, acts, ids)  # allocates gradients and optimizer state
    static = persistent_bytes(seg, opt)
    peak = static + peak_allocated_bytes(lambda: run_edge_stage(seg, opt, acts, ids), torch.device(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        run_edge_stage(seg, opt, acts, ids)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    meas_ms = statistics.median(times)
    return {
        "trainable_params": sum(p.numel() for p in seg.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in seg.parameters()),
        "pred_mem_mb": mem.device_total / 1e6,
        "meas_mem_mb": peak / 1e6,
        "mem_ratio": mem.device_total / peak,
        "pred_breakdown_mb": {k: v * 1e3 for k, v in mem.as_gb().items()},
        "meas_static_mb": static / 1e6,
        "pred_ms": pred_ms,
        "meas_ms": meas_ms,
        "time_ratio": pred_ms / meas_ms,
    }


def profile_layers(cfg, device: str = "cpu") -> list:
    """The edge stage's layers profiled (``splitlearn profile``'s code): full, and the
    method the config gives the edge stage, measured with the method applied."""
    prof, _ = profile_model(cfg, layers=f"0:{CUTS[0]}", device=device, repeats=7, warmup=3)
    return prof.layers


def train_loss(method: StageMethod, steps: int, batch: int, seq: int, lr: float) -> dict:
    from splitlearn.trainer import train

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(method, steps, batch, seq, lr, out)
        t0 = time.perf_counter()
        result = train(cfg, progress="none")
        wall = time.perf_counter() - t0
    return {
        "first_loss": result.losses[0],
        "final_loss": result.losses[-1],
        "losses": result.losses,
        "train_wall_s": wall,
        "median_step_s": result.summary.get("median_step_s"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps for the loss (default 60)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16: 4 micro-batches of 4)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--timed", type=int, default=5, help="timed steps of the edge stage (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the in-process measurement")
    ap.add_argument("--no-train", action="store_true", help="skip the training runs (memory and time only)")
    ap.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the edge stage is measured (cuda: no training)"
    )
    ap.add_argument("--out", default=None, help="default bench/results/edgefit.json (cpu), edgefit-cuda.json (cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        args.no_train = True  # the loss runs use the Ray runtime on emulated CPU devices
    name = "edgefit.json" if args.device == "cpu" else f"edgefit-{args.device}.json"
    args.out = args.out or str(ROOT / "bench" / "results" / name)

    rows = {}
    for name, method in METHODS.items():
        cfg = run_config(method, 1, args.batch, args.seq, args.lr, tempfile.gettempdir())
        # profiled right before it is measured, so both see the same load on a shared machine
        layers = profile_layers(cfg, args.device)
        assert method.method == "full" or method.key in layers[0].methods
        r = measure(cfg, method, layers, args.timed, args.device)
        rows[name] = r
        print(
            f"{name:15} trainable {r['trainable_params']:>10,}  memory pred {r['pred_mem_mb']:7.2f} MB "
            f"meas {r['meas_mem_mb']:7.2f} MB ({r['mem_ratio']:.3f})  time pred {r['pred_ms']:7.1f} ms "
            f"meas {r['meas_ms']:7.1f} ms ({r['time_ratio']:.3f})",
            flush=True,
        )
    if not args.no_train:
        for name, method in METHODS.items():
            rows[name].update(train_loss(method, args.steps, args.batch, args.seq, args.lr))
            print(f"{name:15} loss {rows[name]['first_loss']:.4f} -> {rows[name]['final_loss']:.4f}", flush=True)

    full = rows["full"]["meas_mem_mb"]
    head = (
        "method",
        "trainable",
        "pred MB",
        "meas MB",
        "pred/meas",
        "x full",
        "pred ms",
        "meas ms",
        "pred/meas",
        "loss",
    )
    table = [head]
    for name, r in rows.items():
        loss = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if "final_loss" in r else "-"
        table.append(
            (
                name,
                f"{r['trainable_params']:,}",
                f"{r['pred_mem_mb']:.2f}",
                f"{r['meas_mem_mb']:.2f}",
                f"{r['mem_ratio']:.3f}",
                f"{r['meas_mem_mb'] / full:.3f}",
                f"{r['pred_ms']:.1f}",
                f"{r['meas_ms']:.1f}",
                f"{r['time_ratio']:.3f}",
                loss,
            )
        )
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(t, widths, strict=True)))
        for t in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print()
    print("\n".join(lines))
    third = rows["lora+recompute"]["meas_mem_mb"] <= full / 3
    mem_ok = all(0.9 <= r["mem_ratio"] <= 1.1 for r in rows.values())
    print(
        f"edge stage: [0,{CUTS[0]}) of a {MODEL['num_hidden_layers']}-block llama (hidden {MODEL['hidden_size']}), "
        f"stage 0 of {len(DEVICES)}, {SCHEDULE}, {NUM_MB} micro-batches of {args.batch // NUM_MB}x{args.seq} tokens; "
        + (args.device if args.device == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)")
    )
    print(f"lora+recompute at most 1/3 of full: {third}; predicted memory within ±10% for every method: {mem_ok}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "host": platform.node(),
                "device": args.device,
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "model": MODEL,
                "cuts": CUTS,
                "edge_stage": [0, CUTS[0]],
                "schedule": SCHEDULE,
                "micro_batches": NUM_MB,
                "batch_size": args.batch,
                "seq_len": args.seq,
                "train_steps": None if args.no_train else args.steps,
                "lr": args.lr,
                "lora": {"r": 8, "alpha": 16, "target_modules": "q_proj,k_proj,v_proj,o_proj"},
                "rows": rows,
                "lora_recompute_at_most_third_of_full": third,
                "memory_within_10pct": mem_ok,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
