"""Peak host memory of a stage worker while it builds its segment: segment-only vs whole model.

Each measurement runs in a fresh Python process: it imports what a worker imports, builds the
model on the meta device, resets the kernel's peak-RSS mark (``splitlearn.rss.PeakRSS``), then builds one stage's segment the way
a worker does (``build_segment`` + ``Segment``), or, for the old way, the whole model and then
cuts it (``build_model`` + ``Segment``: what every worker did before). It reports the peak
resident set during the build above the resident set before it, the segment's tensor bytes and the
seconds. Sources: random init (fp32), and a local checkpoint stored in bf16 or fp32 (as real
checkpoints ship), read into fp32 as training needs.

    python bench/load_memory.py                      # ~1.2B Llama-3.2-1B shape, 3 stages
    python bench/load_memory.py --shape small --stages 3 --out /tmp/x.json

Prints a table and writes JSON (default bench/results/load-memory-cpu.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from shapes import LLAMA_SHAPES  # noqa: E402

SHAPES = LLAMA_SHAPES

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
import torch
from splitlearn.config import ModelConfig
from splitlearn.models.build import build_model, build_segment, meta_model
from splitlearn.models.chain import Segment
spec = json.loads({spec!r})
cfg = ModelConfig(family=spec["family"], path=spec["path"], config=spec["config"])
from splitlearn.rss import PeakRSS
meta_model(cfg)  # imports and the meta build: the baseline
t0 = time.perf_counter()
with PeakRSS() as rss:
    if spec["way"] == "whole-then-cut":
        seg = Segment(build_model(cfg, 0), spec["start"], spec["stop"])
    else:
        seg = Segment(build_segment(cfg, 0, spec["start"], spec["stop"]), spec["start"], spec["stop"])
dt = time.perf_counter() - t0
nbytes = sum(t.nbytes for t in [*seg.parameters(), *seg.buffers()])
print(json.dumps(dict(base=rss.start_bytes, peak_above_base=rss.above_bytes, segment_bytes=nbytes, seconds=dt)))
"""


def measure(spec: dict) -> dict:
    code = CHILD.format(root=str(ROOT), spec=json.dumps(spec))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_checkpoint(config: dict, dtype: str, where: Path) -> Path:
    """The shape's model, random init, saved with save_pretrained in ``dtype``."""
    import torch

    from splitlearn.config import ModelConfig
    from splitlearn.models.build import build_model

    model = build_model(ModelConfig(family="llama", config=config), 0)
    path = where / f"ckpt-{dtype}"
    model.to(getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])).save_pretrained(path)
    del model
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--sources", default="random,bf16", help="random, bf16 and/or fp32 (checkpoints)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load-memory-cpu.json"))
    args = ap.parse_args()
    config = SHAPES[args.shape]
    n = config["num_hidden_layers"] + 2
    per = [n // args.stages + (1 if i < n % args.stages else 0) for i in range(args.stages)]
    cuts = [sum(per[:i]) for i in range(args.stages + 1)]
    ranges = list(zip(cuts, cuts[1:], strict=False))
    rows = []
    with tempfile.TemporaryDirectory(prefix="sl-load-") as tmp:
        for source in args.sources.split(","):
            path = None if source == "random" else str(save_checkpoint(config, source, Path(tmp)))
            for way in ("segment", "whole-then-cut"):
                for stage, (a, b) in enumerate(ranges):
                    if way == "whole-then-cut" and stage not in (0, len(ranges) // 2):
                        continue  # the old way's peak is the whole model's whatever the stage
                    spec = dict(
                        family=None if path else "llama",
                        path=path,
                        config={} if path else config,
                        way=way,
                        start=a,
                        stop=b,
                    )
                    r = measure(spec)
                    row = dict(source=source, way=way, stage=stage, chain=[a, b], **r)
                    row["ratio"] = r["peak_above_base"] / r["segment_bytes"]
                    rows.append(row)
                    print(
                        f"{source:6s} {way:15s} stage {stage} [{a:2d},{b:2d}) segment {r['segment_bytes'] / 1e9:6.2f} GB"
                        f"  peak above baseline {r['peak_above_base'] / 1e9:6.2f} GB  ({row['ratio']:.2f}x)"
                        f"  {r['seconds']:6.1f} s",
                        flush=True,
                    )
    seg = [r for r in rows if r["way"] == "segment"]
    overhead = [r["peak_above_base"] - r["segment_bytes"] for r in seg]
    summary = {
        "shape": args.shape,
        "config": config,
        "stages": args.stages,
        "segment_peak_over_bytes_max": max(r["ratio"] for r in seg),
        "segment_overhead_bytes_median": statistics.median(overhead),
        "segment_overhead_bytes_max": max(overhead),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(
        f"segment-only: peak above baseline <= {summary['segment_peak_over_bytes_max']:.2f}x the segment's bytes; "
        f"overhead median {summary['segment_overhead_bytes_median'] / 1e6:.0f} MB, "
        f"max {summary['segment_overhead_bytes_max'] / 1e6:.0f} MB; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
