"""A run's curves: one logger interface for live curves, and ``splitlearn curves`` to draw them.

:class:`MetricsLogger` takes scalars by step. :class:`TensorBoardLogger` writes real
TensorBoard event files under ``<run>/tb`` with ``torch.utils.tensorboard`` (which needs the
``tensorboard`` package); ``runtime.logger=auto`` uses it when it is installed and otherwise
keeps only ``metrics.jsonl``, which every run writes and :func:`draw_curves` reads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

from splitlearn.errors import OutputError

log = logging.getLogger("splitlearn")


class MetricsLogger(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars as TensorBoard event files in ``directory`` (``tensorboard --logdir`` reads them)."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_missing() -> str | None:
    """Why TensorBoard event files cannot be written here, or None when they can."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        return "tensorboard is not installed (pip install tensorboard), or set runtime.logger=auto or none"
    return None


def make_logger(mode: str, run_dir: Path) -> MetricsLogger:
    """The run's logger for ``runtime.logger``."""
    if mode == "none" or (mode == "auto" and tensorboard_missing()):
        if mode == "auto":
            log.info("tensorboard is not installed: curves only in metrics.jsonl (splitlearn curves draws them)")
        return NullLogger()
    return TensorBoardLogger(run_dir / "tb")


def step_scalars(rec: dict[str, Any], lr: float) -> dict[str, float]:
    """What a ``metrics.jsonl`` record puts on the curves."""
    out = {"train/loss": rec["loss"], "train/tokens_per_s": rec["tokens_per_s"], "train/lr": lr}
    out["train/grad_norm"] = rec["grad_norm"]
    if "eval_loss" in rec:
        out["eval/loss"], out["eval/perplexity"] = rec["eval_loss"], rec["eval_perplexity"]
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's step records, the last attempt of each step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise OutputError(f"{run_dir} is not a run directory (no metrics.jsonl); give the directory `train` printed")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def draw_curves(run_dir: Path, out: Path) -> dict[str, Any]:
    """Loss and eval loss by step, and tokens per second, to a PNG; returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from splitlearn.fsio import atomic_write

    recs = read_metrics(run_dir)
    steps = [r["step"] + 1 for r in recs]
    evals = [(r["step"] + 1, r["eval_loss"]) for r in recs if "eval_loss" in r]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in recs], label="train loss")
    if evals:
        ax_loss.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_tps.plot(steps, [r["tokens_per_s"] for r in recs], color="tab:green")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return {"steps": len(recs), "evals": len(evals), "last_loss": recs[-1]["loss"] if recs else None}
