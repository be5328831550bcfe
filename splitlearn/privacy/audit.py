"""The transport audit: from a run's recorded transfers (``runtime.audit_transport``), what
crossed each link, and the ways it broke the privacy rules:

- no input ids ever leave the data owner's first stage (no integer tensor is sent other
  than the labels and the padding mask);
- under ``label_privacy`` (U-shape) the labels never leave the data owner's device; without
  it they go only to the loss stage (and the plan's leak column says so: they are the text);
- with several data owners (federated clients), no tensor goes from one client to another:
  activations, gradients, labels and FedAvg updates go between a client and the cloud only;
  and a client receives the gradients of its own micro-batches only, and sends the
  activations of its own only (micro-batch ``m`` is client ``m % N``'s, the plan's order;
  under sequential split learning every micro-batch of step ``s`` is client ``s % N``'s).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cluster.topology import Topology
from partitioners import Plan

INTEGER = ("int64", "int32", "int16", "int8", "uint8")


def transfers(stage_metrics: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every recorded transfer of every step and worker."""
    return [t for step in stage_metrics for worker in step for t in worker.get("transfers", [])]


def violations(plan: Plan, topology: Topology, sent: list[dict[str, Any]], sequential: bool = False) -> list[str]:
    """One line per transfer that breaks a rule (see the module's docstring). ``sequential``:
    the clients take turns (every micro-batch of step ``s`` is client ``s % N``'s)."""
    owners = {d.name for d in topology.devices if d.owns_data}
    last = plan.num_stages - 1
    clients = (
        plan.stages[0].devices if len(plan.stages[0].devices) > 1 and owners.issuperset(plan.stages[0].devices) else []
    )
    out = []
    for t in sent:
        where = f"{t['kind']} {t['dtype']}{t['shape']} stage {t['src_stage']} ({t['src_device']}) -> "
        where += f"stage {t['dst_stage']} ({t['dst_device']})"
        if t["dtype"] in INTEGER and t["kind"] not in ("labels", "padding-mask"):
            out.append(f"integer tensor (input ids?) sent: {where}")
        if t["src_device"] in owners and t["dst_device"] in owners and t["src_device"] != t["dst_device"]:
            out.append(f"sent from one data owner to another: {where}")
        if t["kind"] == "labels":
            if plan.label_privacy and t["dst_device"] not in owners:
                out.append(f"labels left the data owner under label_privacy: {where}")
            if t["dst_stage"] != last:
                out.append(f"labels sent to a stage that computes no loss: {where}")
        if clients and t.get("mb") is not None:
            own = clients[(t["step"] if sequential else t["mb"]) % len(clients)]
            at = t["src_device"] if t["src_stage"] == 0 else t["dst_device"] if t["dst_stage"] == 0 else own
            if at != own:
                out.append(f"micro-batch {t['mb']} is client {own}'s, not {at}'s: {where}")
    return out


def summary(sent: list[dict[str, Any]]) -> dict[str, int]:
    """How many tensors of each kind crossed each pair of devices."""
    c = Counter(f"{t['kind']} {t['src_device']}->{t['dst_device']}" for t in sent)
    return dict(sorted(c.items()))
