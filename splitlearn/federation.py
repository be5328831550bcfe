"""Split-federated learning: many data-owning clients share the cloud's segments.

Under ``federation.mode: splitfed`` the first stage is one replica per client, each on its
client's device and reading only that client's ``data.path``; the stages after it are shared.
Micro-batch ``m`` of a step is client ``m % N``'s local micro-batch ``m // N``, so a step is
every client's batch at once (``train.batch_size`` counts all clients' rows together) and the
cloud processes every client's micro-batches. The clients' fronts are averaged through the
server (the first replica of stage 1), never directly between clients
(:mod:`splitlearn.stage.fedavg`): every step, the gradients (``rounds_every: 1``, which is
centralised training on the union of the batches), or the weights every ``rounds_every``
steps, weighted by samples (FedAvg).

Under ``federation.mode: sequential`` (classic split learning) the clients take turns: step
``s`` is client ``s % N``'s batch (its own ``s // N``-th, ``train.batch_size`` rows, every
micro-batch of the step), the others idle, and after its step the client hands its front
(trainable weights and optimizer state) to the next client through the server.

A client that dies or stops answering is dropped (:mod:`splitlearn.failure`): the others redo
the steps since the last checkpoint without it; it rejoins at a later round's end.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from partitioners.planner.request import REPLICA_SEP

if TYPE_CHECKING:
    from partitioners import Plan
    from splitlearn.config import DataConfig, LoadedConfig, RunConfig, _Checker

FEDERATED_PARTITIONERS = ("uniform", "balanced", "manual")


def enabled(run: RunConfig) -> bool:
    return run.federation.mode != "none"


def clients(run: RunConfig) -> list[str]:
    """The client devices in replica order (replica r of stage 0 is client r)."""
    return [c.device for c in run.federation.clients] if enabled(run) else []


def client_group(run: RunConfig) -> str:
    """The ``plan.devices`` entry of the clients' front stage: ``a+b+c``."""
    return REPLICA_SEP.join(clients(run))


def plan_devices(cfg: LoadedConfig) -> list[str]:
    """``plan.devices`` for the planner: the config's, or the clients' front stage then every
    device that is no client, in the topology's order."""
    run = cfg.run
    if run.plan.devices or not enabled(run):
        return list(run.plan.devices)
    mine = set(clients(run))
    return [client_group(run), *(d for d in cfg.topology.device_names if d not in mine)]


def client_data(run: RunConfig, device: str) -> DataConfig:
    """The data section as client ``device`` reads it: its own path, the shared format."""
    data = copy.deepcopy(run.data)
    for c in run.federation.clients:
        if c.device == device:
            data.path = c.data.path
    return data


def sequential(run: RunConfig) -> bool:
    return run.federation.mode == "sequential"


def rows_per_client(run: RunConfig) -> int:
    """A client's rows per step: its share of the step's batch (splitfed), or the whole
    batch on its turn (sequential)."""
    if sequential(run):
        return run.train.batch_size
    return run.train.batch_size // max(len(run.federation.clients), 1)


def round_ends(run: RunConfig, done: int) -> bool:
    """Whether ``done`` steps (1-based) end a round: every client holds the averaged front."""
    return done % run.federation.rounds_every == 0 or done == run.train.steps


def without_clients(cfg: LoadedConfig, absent: list[str]) -> LoadedConfig:
    """The run with the clients ``absent`` left out (dropped clients). Splitfed: each
    remaining client keeps its own rows and micro-batches per step, so the step's batch and
    micro-batches shrink by the absent clients' share, and micro-batch ``m`` is remaining
    client ``m % (N - k)``'s. Sequential: the turns go round the remaining clients."""
    from splitlearn.config import LoadedConfig as Loaded

    run = cfg.run
    if not absent:
        return cfg
    n = len(run.federation.clients)
    keep = [c for c in run.federation.clients if c.device not in absent]
    assert keep and len(keep) == n - len(set(absent)), f"{absent} of {clients(run)}"
    small = copy.deepcopy(run)
    small.federation.clients = copy.deepcopy(keep)
    if not sequential(run):  # sequential: one client's batch a step, whoever's turn it is
        small.train.batch_size = run.train.batch_size // n * len(keep)
        small.train.micro_batches = run.train.micro_batches // n * len(keep)
    return Loaded(small, cfg.topology, cfg.source, cfg.base_dir)


def plan_without(plan: Plan, run: RunConfig, absent: list[str]) -> Plan:
    """``plan`` with the clients ``absent`` left out of the clients' stage and their
    micro-batches out of the step. The cut, the shared stages and the schedule are the
    plan's; its predictions stay the whole federation's."""
    from partitioners import Plan as PlanType

    if not absent:
        return plan
    d = plan.to_dict()
    d["stages"][0]["devices"] = [c for c in d["stages"][0]["devices"] if c not in absent]
    if not sequential(run):
        n, k = len(run.federation.clients), len(d["stages"][0]["devices"])
        d["num_micro_batches"] = run.train.micro_batches // n * k
    return PlanType.from_dict(d)


def check_federation(c: _Checker, cfg: LoadedConfig) -> None:
    """The ``federation:`` section against the topology, the plan and the training settings."""
    from splitlearn.config import FEDERATION_MODES

    run, fed = cfg.run, cfg.run.federation
    c.choice("federation.mode", fed.mode, FEDERATION_MODES)
    if fed.mode == "none":
        if fed.clients:
            c.fail(
                "federation.clients", "clients are listed but federation.mode is none; set federation.mode: splitfed"
            )
        return
    c.at_least("federation.rounds_every", fed.rounds_every, 1)
    _check_clients(c, cfg)
    n = len(fed.clients)
    p = run.plan
    if p.label_privacy:
        c.fail("plan.label_privacy", "U-shaped plans are not supported with federation yet; set it false")
    if p.partitioner not in FEDERATED_PARTITIONERS:
        c.fail("plan.partitioner", f"'{p.partitioner}' with federation: use one of {', '.join(FEDERATED_PARTITIONERS)}")
    if p.devices and p.devices[0] != client_group(run):
        c.fail("plan.devices[0]", f"with federation the first stage is the clients' fronts: '{client_group(run)}'")
    if fed.mode == "sequential" and fed.rounds_every != 1:
        c.fail("federation.rounds_every", "sequential split learning hands the front on after every step; set it 1")
    if fed.mode == "sequential" and run.train.dtype == "bf16-master":
        c.fail(
            "train.dtype",
            "sequential split learning cannot hand on fp32 master weights yet; use fp32, bf16 or bf16-pure",
        )
    if fed.mode == "splitfed" and run.train.micro_batches % n:
        c.fail(
            "train.micro_batches",
            f"{run.train.micro_batches} is not a multiple of the {n} clients (each client runs every {n}th micro-batch)",
        )
    every = run.checkpoint.every_steps
    if every and every % fed.rounds_every:
        c.fail("checkpoint.every_steps", f"{every} must be a multiple of federation.rounds_every={fed.rounds_every}")


def _check_clients(c: _Checker, cfg: LoadedConfig) -> None:
    fed, topo = cfg.run.federation, cfg.topology
    if len(fed.clients) < 2:
        c.fail("federation.clients", "splitfed needs at least 2 clients ({device: <name>, data: {path: <file>}})")
    seen: set[str] = set()
    for i, cl in enumerate(fed.clients):
        key = f"federation.clients[{i}]"
        if cl.device not in topo.device_names:
            c.fail(f"{key}.device", f"'{cl.device}' is not in the topology ({', '.join(topo.device_names)})")
        if not topo.device(cl.device).owns_data:
            c.fail(f"{key}.device", f"'{cl.device}' does not own data; set owns_data: true on it in the topology")
        if cl.device in seen:
            c.fail(f"{key}.device", f"'{cl.device}' is listed twice")
        seen.add(cl.device)
        if cfg.run.ray.address is None and not cfg.resolve_path(cl.data.path).exists():
            c.fail(f"{key}.data.path", f"file not found: {cl.data.path}")
        cl.data.path = str(cfg.resolve_path(cl.data.path))
    stray = [d.name for d in topo.devices if d.owns_data and d.name not in seen]
    if stray:
        c.fail("federation.clients", f"'{stray[0]}' owns data but is no client; list it or unset its owns_data")


def check_untied(run: RunConfig) -> None:
    """Tied embed/head weights would sum gradients between the clients and the loss stage
    directly (client to client): refused until that sum goes through the server."""
    from splitlearn.errors import ConfigError
    from splitlearn.models.build import hf_config

    conf: Any = hf_config(run.model)
    if enabled(run) and getattr(conf, "tie_word_embeddings", False):
        raise ConfigError(
            "model.config.tie_word_embeddings: tied embeddings are not supported with federation yet; "
            "set model.config.tie_word_embeddings=false"
        )
