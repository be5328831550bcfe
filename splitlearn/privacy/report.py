"""``splitlearn privacy CONFIG``: per candidate cut on the data owner, the measured recovery
rates and what keeping that many blocks there costs (the best plan's step and the owner's
memory), then what the configured bounds make of it."""

from __future__ import annotations

import dataclasses

from cluster.tables import render_table
from partitioners import PlanError, partition
from splitlearn.config import LoadedConfig
from splitlearn.planning import plan_request
from splitlearn.privacy.bound import OwnerMinimums, minimums, report_for
from splitlearn.privacy.measure import PrivacyReport


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def cut_costs(cfg: LoadedConfig, report: PrivacyReport) -> dict[int, str]:
    """Per number of owner blocks: ``optimal``'s step with at least that many on the owner
    (front), and the owner's first stage memory."""
    base = plan_request(cfg)
    out: dict[int, str] = {}
    for row in report.rows:
        req = dataclasses.replace(base, min_owner_front=row.owner_blocks + 1, min_owner_tail=1, privacy_why="")
        try:
            plan = partition("optimal", req)
        except PlanError:
            out[row.owner_blocks] = "no plan fits"
            continue
        first = plan.stages[0]
        out[row.owner_blocks] = f"{plan.step_ms:.1f} ms, owner {first.memory_gb:.3f} GB ({first.stop - 1} blocks)"
    return out


def privacy_command(cfg: LoadedConfig, remeasure: bool = False) -> str:
    """The measured table (measured now and cached when missing) and the bound's verdict."""
    if remeasure:
        path = report_for(cfg, measure_if_missing=False)[1]
        path.unlink(missing_ok=True)
    report, path = report_for(cfg, measure_if_missing=True)
    assert report is not None
    costs = cut_costs(cfg, report)
    head = ("owner blocks", "nearest (a)", "learned (b)", "tokens", "labels from grads (c)", "best plan with them")
    rows = [
        (
            str(r.owner_blocks),
            _pct(r.nearest),
            _pct(r.learned),
            _pct(r.tokens if r.nearest is not None or r.learned is not None else None),
            _pct(r.label),
            costs.get(r.owner_blocks, "-"),
        )
        for r in report.rows
    ]
    run = cfg.run
    m = minimums(run, report, report.num_blocks + 2)
    lines = [
        render_table(head, rows, numeric=head[:5]),
        f"model {report.num_blocks} blocks; after {run.privacy.finetune_steps} fine-tuning steps "
        f"({run.finetune.method}); attack (b) {run.privacy.attack_steps} steps; "
        f"measured in {report.seconds:.1f} s, cached in {path}",
        "blocks: front = after the embedding (activations sent); tail = before the head in a U (gradients sent)",
        f"bound ({m.why}): {verdict(m, report.num_blocks + 2)}",
    ]
    return "\n".join(lines)


def verdict(m: OwnerMinimums, num_chain: int) -> str:
    """What the bound asks of the plan, in words."""
    if m.front_layers >= num_chain or m.tail_layers >= num_chain:
        return "the whole model stays on the data owner"
    out = f"the owner keeps >= {m.front_layers - 1} blocks after the embedding"
    if m.label_privacy:
        out += f", and the head with >= {m.tail_layers - 1} blocks before it (U-shape)"
    return out
