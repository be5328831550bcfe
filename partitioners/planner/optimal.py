"""``optimal``: the best plan over device choice, order, cuts and stage methods."""

from __future__ import annotations

import math

import numpy as np

from partitioners.costmodel import StageMethod
from partitioners.plan import Plan
from partitioners.planner.assemble import build_plan
from partitioners.planner.exhaustive import device_sequences
from partitioners.planner.feasibility import infeasible_reason
from partitioners.planner.replicas import add_replicas
from partitioners.planner.request import PlanError, PlanRequest, closed_sequence
from partitioners.planner.tables import CostTables

EXACT_MAX_DEVICES = 7


# A label of the cut search: (worst resource so far, total so far, the owner's first-stage
# ms, device bytes and host bytes (U-shape only), back-pointer (stage, start, previous
# label)). Plain tuples: millions are made for large topologies.
_W, _T, _FMS, _FMEM, _FHOST, _PREV = range(6)


def _pareto_cuts(
    req: PlanRequest, tables: CostTables, seq: list[str], bound: float
) -> tuple[float, list[int], list[StageMethod]] | None:
    """The best cuts (and stage methods) for a fixed device sequence: a dynamic programme
    over (stage, cut) keeping every label (worst resource so far, total so far) that no
    other label beats in both — exact for the objective total + (M-1) * worst. Labels whose
    lower bound is not below ``bound`` are dropped.

    A stage with several method options takes, for each of its layer ranges, the fastest
    one that fits: its memory concerns only its own device. The U-shape's first stage is
    the exception (its memory counts against the owner's last stage): it keeps one label per
    option, and the last stage checks each label's memory."""
    S, n, M = len(seq), req.n, req.num_micro_batches
    ushape = req.label_privacy and S > 1
    sequential = req.schedule == "sequential"

    def lower(lab: tuple) -> float:
        return M * lab[_T] if sequential else lab[_T] + (M - 1) * lab[_W]

    frontier: dict[int, list[tuple]] = {0: [(0.0, 0.0, 0.0, 0.0, 0.0, None)]}
    for s in range(S):
        nxt: dict[int, list[tuple]] = {}
        dev = seq[s]
        cap, hcap = tables.capacity(dev), tables.host_capacity(dev)
        last = s == S - 1
        opts = tables.options(s, dev)
        cums = [tables.cum(dev, o) for o in opts]
        memtabs = [tables.dev_table(dev, tables.inflight(s, S), o) for o in opts]
        hostcums = [tables.host_cum(dev, o) for o in opts]
        hi = n if last else n - (S - s - 1)
        for a, labels in frontier.items():
            lo = n if last else a + 1
            if lo > hi:
                continue
            bs = np.arange(lo, hi + 1)
            cs = np.stack([cum[bs] - cum[a] for cum in cums])  # (options, ends)
            mems = np.stack([memtab[a, bs] for memtab in memtabs])
            hosts = np.stack([hc[bs] - hc[a] for hc in hostcums])
            la, lg = tables.link(seq[s - 1], dev, a) if s > 0 else (0.0, 0.0)
            first = ushape and s == 0
            for lab in labels:
                w0, t0, fms, fmem, fhost = lab[_W], lab[_T], lab[_FMS], lab[_FMEM], lab[_FHOST]
                if first:  # one candidate per option: their memory matters to the last stage
                    variants = [
                        (np.full(len(bs), k), cs[k], mems[k], hosts[k], (mems[k] <= cap) & (hosts[k] <= hcap))
                        for k in range(len(opts))
                    ]
                else:
                    if ushape and last:
                        fits = (fmem + mems <= cap) & (fhost + hosts <= hcap)
                    else:
                        fits = (mems <= cap) & (hosts <= hcap)
                    masked = np.where(fits, cs, np.inf)
                    k_best = np.argmin(masked, axis=0)  # the first (configured) option on ties
                    cols = np.arange(len(bs))
                    variants = [(k_best, cs[k_best, cols], mems[k_best, cols], hosts[k_best, cols], fits[k_best, cols])]
                for ks, c, mem, host, ok in variants:
                    if ushape and last:
                        worst = np.maximum(max(w0, la, lg), fms + c)
                    elif first:
                        worst = np.full(len(bs), max(w0, la, lg))  # the owner's load is known at the end
                    else:
                        worst = np.maximum(max(w0, la, lg), c)
                    total = t0 + c + la + lg
                    low = M * total if sequential else total + (M - 1) * worst
                    keep = np.nonzero(ok & (low < bound))[0]
                    if not len(keep):
                        continue
                    for wk, tk, ck, mk, hk, b, k in zip(
                        worst[keep].tolist(),
                        total[keep].tolist(),
                        c[keep].tolist(),
                        mem[keep].tolist(),
                        host[keep].tolist(),
                        bs[keep].tolist(),
                        ks[keep].tolist(),
                        strict=True,
                    ):
                        prev = (s, a, lab, k)
                        lab_new = (wk, tk, ck, mk, hk, prev) if first else (wk, tk, fms, fmem, fhost, prev)
                        nxt.setdefault(b, []).append(lab_new)
        for b, labs in nxt.items():
            nxt[b] = _prune(labs, ushape and s < S - 1)
        frontier = nxt
        if not frontier:
            return None
    labels = frontier.get(n, [])
    if not labels:
        return None
    best = min(labels, key=lower)
    cuts, chosen, lab = [], [], best
    while lab[_PREV] is not None:
        s, a, lab, k = lab[_PREV]
        cuts.append(a)
        chosen.append(tables.options(s, seq[s])[k])
    bounds = sorted(set([*cuts, n]))
    return lower(best), bounds, chosen[::-1]


def _prune(labels: list[tuple], keep_first: bool) -> list[tuple]:
    """Drop labels another label beats in every kept dimension."""
    if keep_first:  # U-shape before its last stage: the owner's first stage still matters
        labels.sort(key=lambda x: (x[_W], x[_T], x[_FMS], x[_FMEM], x[_FHOST]))
        out: list[tuple] = []
        for lab in labels:
            if not any(
                o[_W] <= lab[_W]
                and o[_T] <= lab[_T]
                and o[_FMS] <= lab[_FMS]
                and o[_FMEM] <= lab[_FMEM]
                and o[_FHOST] <= lab[_FHOST]
                for o in out
            ):
                out.append(lab)
        return out
    labels.sort(key=lambda x: (x[_W], x[_T]))
    out, best_total = [], math.inf
    for lab in labels:  # sorted by worst: keep those with a strictly smaller total
        if lab[_T] < best_total:
            out.append(lab)
            best_total = lab[_T]
    return out


def ranked_devices(req: PlanRequest) -> list[str]:
    """The data owner, then the others ranked for the large-topology search: devices whose
    link from the owner is faster first, then faster devices, then more memory."""
    topo = req.topology
    pool = req.pool
    owner = next(d for d in pool if topo.device(d).owns_data)
    rest = [d for d in pool if d != owner]
    rest.sort(key=lambda d: (-topo.link(owner, d).bandwidth_mbps, -topo.device(d).tflops, -topo.device(d).memory_gb, d))
    return [owner, *rest]


def optimal(req: PlanRequest) -> Plan:
    tables = CostTables(req)
    pool = req.pool
    if len(pool) <= EXACT_MAX_DEVICES:
        candidates = device_sequences(req)
    else:
        ranked = ranked_devices(req)
        by_speed = [ranked[0], *sorted(ranked[1:], key=lambda d: (-req.topology.device(d).tflops, d))]
        longer = [k for k in (16, 24, 32, 48, 64, 96, 128) if k <= len(ranked)]
        lengths = sorted({*range(1, min(len(ranked), 12) + 1), *longer})
        seen: set[tuple[str, ...]] = set()
        candidates = []
        for order in (ranked, by_speed):
            for k in lengths:
                seq = closed_sequence(req, order[:k])
                if len(seq) <= req.n and tuple(seq) not in seen:
                    seen.add(tuple(seq))
                    candidates.append(seq)
    best: tuple[float, list[str], list[int], list[StageMethod]] | None = None
    for seq in sorted(candidates, key=len):
        got = _pareto_cuts(req, tables, seq, best[0] if best else math.inf)
        if got is not None and (best is None or got[0] < best[0] - 1e-12):
            best = (got[0], seq, got[1], got[2])
    if best is None:
        raise PlanError(infeasible_reason(req, tables, candidates))
    _, seq, bounds, opts = best
    groups = add_replicas(req, tables, seq, bounds, opts) if req.replicate else None
    return build_plan(req, tables, seq, bounds, "optimal", opts, groups)
