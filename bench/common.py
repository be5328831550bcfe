"""What the benchmarks that run ``splitlearn train`` share: the run config's runtime section,
the machine a result was measured on, and writing the result."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def runtime_section(out_dir: Path, run_name: str, progress: str, **extra: Any) -> dict[str, Any]:
    """A benchmark run's ``runtime:``: generous timeouts (large models load for minutes), no
    checkpoint at the end."""
    return {
        "output_dir": str(out_dir),
        "run_name": run_name,
        "progress": progress,
        "timeout_s": 1800,
        "placement_timeout_s": 300,
        "checkpoint": False,
        **extra,
    }


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
