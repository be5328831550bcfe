"""The privacy bound: the measurement for a run (cached per model and settings), what it
asks of the plan (layers the owner keeps, the head on the owner), and the plan's leak column.

In causal-LM fine-tuning the labels are the input tokens shifted by one: a plan whose head
runs in the cloud sends the text itself there as labels. So any token bound below 1 (or a
label bound below 1) keeps the head on the data owner (U-shape), and the gradient that the
U's tail sends back is then bounded by attack (c)'s measurement.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from partitioners import Plan, PlanRequest
from splitlearn.config import LoadedConfig, RunConfig
from splitlearn.errors import ConfigError
from splitlearn.fsio import atomic_write
from splitlearn.privacy.attacks import InverterBudget
from splitlearn.privacy.measure import MeasureSettings, PrivacyReport, measure

VERSION = 1  # of the attacks: a change that alters their figures bumps it (and so the cache key)


def settings(run: RunConfig) -> MeasureSettings:
    p = run.privacy
    return MeasureSettings(
        max_owner_blocks=p.max_owner_blocks,
        finetune_steps=p.finetune_steps,
        attacks=tuple(p.attacks),
        budget=InverterBudget(steps=p.attack_steps, seed=run.train.seed),
    )


def measured_what(cfg: LoadedConfig) -> dict[str, Any]:
    """Everything the figures depend on: the model (config or checkpoint), seed, data, method
    and the measurement's settings."""
    run = cfg.run
    model: dict[str, Any] = {"family": run.model.family, "config": dict(run.model.config)}
    if run.model.path:
        path = Path(run.model.path)
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        model = {"path": str(path), "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    container = OmegaConf.to_container(OmegaConf.structured(run))
    assert isinstance(container, dict)
    p = dict(container["privacy"])
    for k in ("max_token_recovery", "max_label_recovery", "measure", "cache_dir"):  # bounds, not figures
        p.pop(k)
    return {
        "version": VERSION,
        "model": model,
        "seed": run.train.seed,
        "lr": run.train.lr,
        "batch_size": run.train.batch_size,
        "data": container["data"],
        "finetune": container["finetune"],
        "owner_tier": cfg.topology.data_owner.tier,
        "privacy": p,
    }


def cache_file(cfg: LoadedConfig) -> tuple[Path, str, dict[str, Any]]:
    what = measured_what(cfg)
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.run.privacy.cache_dir).expanduser() / f"{key}.json", key, what


def report_for(cfg: LoadedConfig, measure_if_missing: bool) -> tuple[PrivacyReport | None, Path]:
    """The cached measurement for this run, measured (and cached) first when asked."""
    path, key, what = cache_file(cfg)
    if path.is_file():
        try:
            return PrivacyReport.from_dict(json.loads(path.read_text())), path
        except (ValueError, TypeError, KeyError):
            pass  # an unreadable cache entry is measured again
    if not measure_if_missing:
        return None, path
    report = measure(cfg, settings(cfg.run), key, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(report.to_dict(), indent=1))
    except OSError as e:
        raise ConfigError(f"privacy.cache_dir: cannot write {path}: {e}") from e
    return report, path


def least_blocks(values: dict[int, float | None], bound: float) -> int | None:
    """The fewest owner blocks from which every measured cut meets ``bound`` (a deeper cut
    that measured worse would break it), or None when the deepest measured cut breaks it."""
    ks = sorted(k for k, v in values.items() if v is not None)
    best = None
    for k in reversed(ks):
        if float(values[k] or 0.0) > bound:
            break
        best = k
    return best


@dataclass
class OwnerMinimums:
    front_layers: int  # chain layers the owner's first stage keeps (1: the embedding)
    tail_layers: int  # chain layers a U's last stage keeps (1: the head)
    label_privacy: bool
    why: str  # for the plan's footer and error lines


def minimums(run: RunConfig, report: PrivacyReport, num_chain: int) -> OwnerMinimums:
    """What the bounds ask of the plan, from the measurement."""
    p = run.privacy
    tok, lab = p.max_token_recovery, p.max_label_recovery
    front = least_blocks({r.owner_blocks: r.tokens for r in report.rows}, tok)
    # the head on the owner (U-shape) unless the whole model stays there anyway
    ushape = run.plan.label_privacy or (front is not None and (tok < 1.0 or lab < 1.0))
    tail = least_blocks({r.owner_blocks: r.label for r in report.rows}, min(tok, lab)) if ushape else 0
    parts = [f"privacy.max_token_recovery={tok:g}"]
    if lab < 1.0:
        parts.append(f"privacy.max_label_recovery={lab:g}")
    why = " and ".join(parts)
    deepest = max((r.owner_blocks for r in report.rows), default=0)
    if front is None or tail is None:
        what = "front" if front is None else "tail (gradients back)"
        why += (
            f": no measured {what} cut up to {deepest} owner blocks meets it; raise the bound or "
            "privacy.max_owner_blocks, or keep the whole model on the data owner"
        )
    return OwnerMinimums(
        front_layers=num_chain if front is None else 1 + front,
        tail_layers=num_chain if tail is None else 1 + (tail or 0),
        label_privacy=ushape,
        why=why,
    )


def apply(cfg: LoadedConfig, req: PlanRequest) -> PrivacyReport | None:
    """Bound ``req`` by the run's privacy settings (in place); the measurement used, if any."""
    p = cfg.run.privacy
    if p.measure == "off" or (p.max_token_recovery >= 1.0 and p.max_label_recovery >= 1.0):
        return None
    report, _ = report_for(cfg, measure_if_missing=p.measure == "auto")
    if report is None:
        return None
    m = minimums(cfg.run, report, req.n)
    req.min_owner_front, req.min_owner_tail = m.front_layers, m.tail_layers
    req.label_privacy = m.label_privacy
    req.privacy_why = m.why
    return report


def annotate(plan: Plan, run: RunConfig, report: PrivacyReport | None, path: Path) -> None:
    """The plan's leak column and privacy footer from the measurement."""
    if report is None:
        if run.privacy.measure != "off":
            plan.privacy = f"privacy: not measured for this model (no {path}); run `splitlearn privacy CONFIG`"
        return
    if plan.num_stages < 2:
        plan.privacy = "privacy: the whole model runs on the data owner; nothing leaves it"
        return
    first, last = plan.stages[0], plan.stages[-1]
    row = report.row(first.stop - 1)
    front = None if row is None else row.tokens
    if plan.stages[1].devices != first.devices:  # what it sends leaves the owner's device
        first.leak = 1.0 if not plan.label_privacy else front  # the labels sent to the cloud are the tokens
    if plan.label_privacy and plan.stages[-2].devices != last.devices:
        tail = report.row(last.stop - last.start - 1)
        last.leak = None if tail is None else tail.label
    attacks = "+".join(run.privacy.attacks)
    plan.privacy = (
        f"privacy: leak = share of private tokens recovered ({attacks}, after {report.what['privacy']['finetune_steps']}"
        f" fine-tuning steps; {path.name}); bound {run.privacy.max_token_recovery:.1%}"
    )
    if not plan.label_privacy:
        plan.privacy += "; the head runs remotely, so the labels (the input tokens) leave the owner"


def annotate_run(cfg: LoadedConfig, plan: Plan) -> None:
    """:func:`annotate` with the run's cached measurement (none when the bound is off)."""
    p = cfg.run.privacy
    if p.measure == "off":
        return
    report, path = report_for(cfg, measure_if_missing=False)
    annotate(plan, cfg.run, report, path)
