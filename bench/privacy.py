"""Token recovery vs the number of blocks the data owner keeps (0-4), for two model shapes
(Llama: RMSNorm, rotary, SwiGLU, grouped KV; GPT-2: LayerNorm, learned positions, GELU),
at the initial weights and after fine-tuning steps (full and LoRA), with and without
Gaussian noise on what the owner sends; and the noise's utility cost (the loss after the
same fine-tuning with the noise on the cut's activations).

    python bench/privacy.py                  # table, bench/results/privacy.json and privacy.png
    python bench/privacy.py --quick          # fewer cells (a smoke run)

Attacks: (a) nearest neighbour against the initial input embedding, (b) a learned decoder
trained on generated public text through the initial weights (``--attack-steps``), (c) labels
from the gradient a U-shaped tail sends back. See splitlearn/privacy/attacks.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_record  # noqa: E402
from splitlearn.config import config_from_container  # noqa: E402
from splitlearn.privacy.attacks import InverterBudget  # noqa: E402
from splitlearn.privacy.measure import MeasureSettings, measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "llama": {
        "family": "llama",
        "config": {
            "vocab_size": 258,
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128,
        },
    },
    "gpt2": {
        "family": "gpt2",
        "config": {"vocab_size": 258, "n_embd": 256, "n_layer": 6, "n_head": 8, "n_positions": 128},
    },
}


def config(shape: str, method: str) -> Any:
    raw = {
        "name": f"privacy-{shape}",
        "model": SHAPES[shape],
        "data": {"path": str(ROOT / "data" / "quickstart.txt"), "seq_len": 64},
        "topology": {
            "inline": {
                "devices": [{"name": "edge", "tier": "edge", "memory_gb": 8, "tflops": 0.1, "owns_data": True}],
                "links": {},
            }
        },
        "train": {"batch_size": 8, "lr": 1e-3, "seed": 0},
        "finetune": {"method": method},
    }
    return config_from_container(raw, [], "bench/privacy.py", ROOT)


def cell_loss(cfg: Any, steps: int, noise: float, cut_blocks: int) -> float:
    """The private-data loss after ``steps`` of fine-tuning with noise on the activations at
    the cut after ``cut_blocks`` blocks (the defence's utility cost), evaluated without noise."""
    import copy

    from splitlearn.data import load_dataset
    from splitlearn.models.build import build_model
    from splitlearn.models.chain import cut, num_blocks
    from splitlearn.privacy.measure import add_noise

    ds, _ = load_dataset(cfg.run.data, cfg.resolve_path)
    model = build_model(cfg.run.model, 0)
    n = num_blocks(model)
    front, back = cut(copy.deepcopy(model), 0, cut_blocks + 1), cut(copy.deepcopy(model), cut_blocks + 1, n + 2)
    params = [*front.parameters(), *back.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.run.train.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, ds.num_rows, (8,), generator=gen)
        ids = ds.input_ids[rows]
        h = front(ids)
        loss = back(h + (add_noise(h.detach(), noise, gen) - h.detach()), None, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ids = ds.input_ids[-16:]
        return float(back(front(ids), None, ids))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--attack-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "privacy.json"))
    ap.add_argument("--cells", nargs="*", help="METHOD:STEPS:NOISE cells only (e.g. full:30:0.5)")
    ap.add_argument("--add-to", help="a privacy.json whose other cells and noise cost to keep beside these")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cells = [
        (m, steps, noise)
        for m, steps in (("full", 0), ("full", args.finetune_steps), ("lora", args.finetune_steps))
        for noise in (0.0, 0.5)
    ]
    if args.quick:
        cells = [
            ("full", 0, 0.0),
            ("full", 0, 0.5),
            ("full", args.finetune_steps, 0.0),
            ("lora", args.finetune_steps, 0.0),
        ]
    if args.cells:
        cells = [(m, int(st), float(n)) for m, st, n in (c.split(":") for c in args.cells)]
    records = []
    t0 = time.perf_counter()
    for shape in SHAPES:
        for method, steps, noise in cells:
            cfg = config(shape, method)
            s = MeasureSettings(
                max_owner_blocks=4,
                finetune_steps=steps,
                noise_scale=noise,
                budget=InverterBudget(steps=args.attack_steps),
            )
            rep = measure(cfg, s, "", {})
            for r in rep.rows:
                records.append(
                    {
                        "shape": shape,
                        "method": method,
                        "finetune_steps": steps,
                        "noise": noise,
                        "owner_blocks": r.owner_blocks,
                        "nearest": r.nearest,
                        "learned": r.learned,
                        "label": r.label,
                    }
                )
            print(f"{shape} {method} steps={steps} noise={noise}: {rep.seconds:.1f} s", flush=True)
    cost: list[dict[str, Any]] = []
    earlier: dict[str, Any] = json.loads(Path(args.add_to).read_text()) if args.add_to else {}
    if earlier:  # keep its other cells (and its noise cost, unless measured again)
        mine = {(r["shape"], r["method"], r["finetune_steps"], r["noise"]) for r in records}
        kept = [r for r in earlier["records"] if (r["shape"], r["method"], r["finetune_steps"], r["noise"]) not in mine]
        records = sorted(
            [*kept, *records],
            key=lambda r: (r["shape"] != "llama", r["method"], r["finetune_steps"], r["noise"], r["owner_blocks"]),
        )
        cost = earlier["noise_cost"]
    for shape in SHAPES if not cost else ():
        for noise in (0.0, 0.5, 2.0):
            cost.append(
                {
                    "shape": shape,
                    "noise": noise,
                    "cut_blocks": 1,
                    "loss": round(cell_loss(config(shape, "full"), args.finetune_steps, noise, 1), 4),
                }
            )
    print_table(records, cost)
    write_record(
        args.out,
        {
            "machine": machine(),
            "attack_steps": args.attack_steps,
            "records": records,
            "noise_cost": cost,
            "seconds": round(time.perf_counter() - t0, 1) + (earlier.get("seconds") or 0),
        },
    )
    draw(records, Path(args.out).with_suffix(".png"))


def print_table(records: list[dict[str, Any]], cost: list[dict[str, Any]]) -> None:
    def pct(x: float | None) -> str:
        return "   -" if x is None else f"{x:4.0%}"

    print(f"{'shape':6} {'method':5} {'steps':>5} {'noise':>5} {'blocks':>6} {'(a)':>5} {'(b)':>5} {'(c)':>5}")
    for r in records:
        print(
            f"{r['shape']:6} {r['method']:5} {r['finetune_steps']:5d} {r['noise']:5.1f} {r['owner_blocks']:6d} "
            f"{pct(r['nearest']):>5} {pct(r['learned']):>5} {pct(r['label']):>5}"
        )
    print("noise cost (loss on private rows after fine-tuning with noise at the cut after 1 block):")
    for c in cost:
        print(f"  {c['shape']:6} noise {c['noise']:3.1f}: loss {c['loss']:.3f}")


def draw(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, shape in zip(axes, SHAPES, strict=True):
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in records:
            if r["shape"] == shape:
                groups.setdefault((r["method"], r["finetune_steps"], r["noise"]), []).append(r)
        for (method, steps, noise), rows in groups.items():
            xs = [r["owner_blocks"] for r in rows]
            best = [max(v for v in (r["nearest"], r["learned"]) if v is not None) for r in rows]
            ax.plot(xs, best, marker="o", label=f"{method}, {steps} steps, noise {noise}")
        ax.set_title(f"{shape}: token recovery, best of (a) and (b)")
        ax.set_xlabel("blocks on the data owner after the embedding")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("share of private tokens recovered")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
