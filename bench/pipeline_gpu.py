"""Our 1F1B runtime against torch.distributed.pipelining's Schedule1F1B on two GPUs.

Same model (Llama-like, random init), same cut (half the blocks on each GPU, embedding on
the first, head and loss on the last), same batch and micro-batches, fp32, one stage per
GPU. Ours: two Ray actors over NCCL (the link group) placed by the device resources.
Theirs: two processes (torch.multiprocessing) running PipelineStage + Schedule1F1B.
Both time whole training steps (forward, backward, optimizer) after warm-up; the median
gives tokens/s. Run on the GPU machine (see shared/device/README.md):

    python bench/pipeline_gpu.py --out bench/results/pipeline-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from splitlearn.config import ModelConfig  # noqa: E402

HIDDEN, INTER, BLOCKS, HEADS, VOCAB = 2048, 5632, 8, 16, 258


def model_cfg():
    return ModelConfig(
        family="llama",
        config=dict(
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=BLOCKS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=4096,
        ),
    )


class LogitsSegment(nn.Module):
    """A segment that returns what torch.pipelining passes on: hidden states, or logits on
    the last stage (its loss_fn computes the loss)."""

    def __init__(self, segment):
        super().__init__()
        self.seg = segment

    def forward(self, x):
        seg = self.seg
        model, ad = seg.model, seg.adapter
        probe = torch.empty(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)
        ctx = ad.context(model, probe, None)
        h = ad.embed(model, x, ctx) if seg.has_embed else x
        for i in seg.block_ids:
            h = ad.block(model, i, h, ctx)
        return ad.head(model, h) if seg.has_head else h


def torch_pipelining_worker(rank, args, port, out_q):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from splitlearn.models.build import build_model
    from splitlearn.models.chain import Segment, causal_lm_loss

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NCCL_NVLS_ENABLE": "0"})
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    dev = torch.device("cuda", rank)
    n = BLOCKS + 2
    cut = n // 2
    a, b = (0, cut) if rank == 0 else (cut, n)
    seg = LogitsSegment(Segment(build_model(model_cfg(), 0), a, b)).to(dev)
    stage = PipelineStage(seg, rank, 2, dev)

    def loss_fn(logits, labels):
        return causal_lm_loss(logits, labels)

    sched = Schedule1F1B(stage, args.micro_batches, loss_fn=loss_fn)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=g).to(dev)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        if rank == 0:
            sched.step(ids)
        else:
            sched.step(target=ids)
        opt.step()
        torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out_q.put(statistics.median(times))
    dist.destroy_process_group()


def run_torch_pipelining(args) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=torch_pipelining_worker, args=(r, args, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    step_s = q.get(timeout=1200)
    for p in procs:
        p.join(timeout=120)
    return step_s


def run_ours(args, trace: bool = False) -> float:
    from cluster.ray_cluster import connect
    from partitioners.planner import simulate_plan
    from splitlearn.config import config_from_container
    from splitlearn.planning import make_plan
    from splitlearn.replay import measured_stage_costs
    from splitlearn.runtime import StageGroup

    n = BLOCKS + 2
    raw = {
        "name": "gpu",
        "model": {"family": "llama", "config": model_cfg().config},
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": args.seq},
        "topology": {
            "inline": {
                "devices": [
                    {
                        "name": f"gpu{i}",
                        "tier": "cloud",
                        "accelerator": "cuda",
                        "memory_gb": 140,
                        "tflops": 60,
                        "owns_data": i == 0,
                        "gpus": 1,
                        "cpu_threads": 4,
                        "zone": "cloud",
                    }
                    for i in range(2)
                ],
                "links": {"default": {"bandwidth_mbps": 3_600_000, "latency_ms": 0.01}},
            }
        },
        "train": {
            "steps": 1,
            "batch_size": args.batch,
            "micro_batches": args.micro_batches,
            "lr": 1e-4,
            "max_grad_norm": 0.0,
        },
        "plan": {"partitioner": "manual", "devices": ["gpu0", "gpu1"], "cuts": [n // 2]},
        "runtime": {"schedule": "1f1b", "timeout_s": 300, "progress": "none", "trace": trace},
    }
    cfg = config_from_container(raw, [], "bench", ROOT)
    handle = connect(cfg.topology, env_vars={"NCCL_NVLS_ENABLE": "0"})
    plan = make_plan(cfg)
    group = StageGroup(plan, cfg.topology, cfg.resolved_dict(), str(ROOT), 300, 120)
    try:
        infos = group.start(prepare_timeout_s=600)
        print("ours: stages", [(i["stage"], i["device"], i["params"]) for i in infos], flush=True)
        times, metrics = [], []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            m = group.step(step)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                metrics.append(m)
    finally:
        group.shutdown()
        handle.shutdown()
    # the simulator on the compute the workers measured (CUDA events), the plan's NVLink figure
    costs = measured_stage_costs(plan, metrics, skip_first=False)
    sim = simulate_plan(plan, stage_costs=costs)
    if trace:  # the step of median time, as it ran on the GPUs, above its replay
        from partitioners.timeline import observed, timeline_figure

        k = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
        seen = observed({(m["stage"], m["replica"]): m["trace"] for m in metrics[k]}, [1, 1])
        fig = timeline_figure(
            seen, f"splitlearn 1F1B, traced (CUDA events), step of {times[k] * 1e3:.1f} ms", below=sim
        )
        fig.savefig(args.timeline, format="png")
        print(f"wrote {args.timeline}", flush=True)
    return statistics.median(times), {
        "replayed_step_s": sim.step_ms / 1e3,
        "measured_fwd_bwd_step_ms": [[round(c.fwd_ms, 3), round(c.bwd_ms, 3), round(c.step_ms, 3)] for c in costs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline-gpu.json"))
    ap.add_argument("--timeline", help="also run ours traced and draw its median step above the replay (PNG)")
    args = ap.parse_args()
    tokens = args.batch * args.seq
    theirs = run_torch_pipelining(args)
    print(
        f"torch.distributed.pipelining Schedule1F1B: {theirs * 1e3:.1f} ms/step, {tokens / theirs:.0f} tokens/s",
        flush=True,
    )
    ours, replayed = run_ours(args)
    print(
        f"splitlearn 1F1B (Ray actors, NCCL link):   {ours * 1e3:.1f} ms/step, {tokens / ours:.0f} tokens/s", flush=True
    )
    print(
        f"  replayed on the compute the workers measured: {replayed['replayed_step_s'] * 1e3:.1f} ms/step "
        f"(measured / replayed {ours / replayed['replayed_step_s']:.3f}); per stage fwd/bwd per micro-batch, "
        f"STEP ms: {replayed['measured_fwd_bwd_step_ms']}",
        flush=True,
    )
    res = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "args": vars(args),
        "model": {"hidden": HIDDEN, "intermediate": INTER, "blocks": BLOCKS},
        "torch_pipelining_step_s": theirs,
        "splitlearn_step_s": ours,
        "ratio_tokens_per_s": theirs / ours,
        **replayed,
    }
    print(f"ratio (ours / theirs, tokens/s): {theirs / ours:.3f}")
    if args.timeline:  # a separate run: tracing synchronises each step's start
        traced, _ = run_ours(args, trace=True)
        res["traced_step_s"] = traced
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
