"""The run's plan: the layer costs, the request to the partitioner, the plan and the
simulator's step time for it, checked before anything is placed."""

from __future__ import annotations

import dataclasses

from cluster.topology import Topology
from partitioners import Plan, PlanRequest, partition
from partitioners import schedule as S
from partitioners.planner import simulate_plan as simulate
from partitioners.profile import LayerProfile, ModelProfile
from splitlearn import federation, method_policy
from splitlearn.config import ON_CLUSTER, LoadedConfig, RunConfig
from splitlearn.errors import ConfigError
from splitlearn.models.build import hf_config, learned_positions, meta_model, weights_dtype
from splitlearn.models.chain import chain_names, num_blocks
from splitlearn.models.costs import meta_profile


def load_profile(cfg: LoadedConfig) -> ModelProfile:
    """The layer costs the planner uses: ``plan.profile`` (measured by ``splitlearn
    profile``) when given and matching this run, else counted on the meta device."""
    run = cfg.run
    mb = run.train.batch_size // run.train.micro_batches
    seq = run.data.seq_len
    method_policy.check_lora_targets(run)
    positions = learned_positions(meta_model(run.model))
    if positions and seq > positions[1]:
        raise ConfigError(
            f"data.seq_len: {seq} is beyond the {positions[1]} positions the model learned "
            f"(model.config.{positions[0]}); lower data.seq_len or raise model.config.{positions[0]}"
        )
    check_batch_fits(cfg)
    if run.plan.profile and run.plan.profile != ON_CLUSTER:
        path = cfg.resolve_path(run.plan.profile)
        try:
            prof = ModelProfile.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"plan.profile: {path} is not a profile written by `splitlearn profile`: {e}") from e
        if (prof.micro_batch, prof.seq_len) != (mb, seq):
            raise ConfigError(
                f"plan.profile: {path} was measured for micro_batch={prof.micro_batch}, seq_len={prof.seq_len}, "
                f"but this run has {mb}, {seq}; profile again with this config"
            )
        method_policy.check_profile(prof, run, path)
        return prof
    variants = method_policy.variants(run)
    gpu = any(d.accelerator == "cuda" for d in cfg.topology.devices)
    return ModelProfile(
        layers=meta_layers(cfg, gpu),
        micro_batch=mb,
        seq_len=seq,
        dtype=run.train.dtype,
        device="meta",
        lora=method_policy.lora_record(run) if variants else None,
    )


def check_data(cfg: LoadedConfig, embedded: bool = True) -> None:
    """Read, tokenize and check the data here, before anything is placed, when this process
    reads the same file the data owner's worker will: on the embedded cluster (``embedded``),
    or wherever the file is here when validating. On a real cluster the owner's worker checks
    it first thing in its ``prepare``."""
    from splitlearn.data import load_dataset

    run = cfg.run
    for data in [federation.client_data(run, d) for d in federation.clients(run)] or [run.data]:
        if not embedded and not cfg.resolve_path(data.path).is_file():
            continue
        _, tokenizer = load_dataset(data, cfg.resolve_path)
        _check_vocab(run, tokenizer.vocab_size)


def _check_vocab(run: RunConfig, tokens: int) -> None:
    from splitlearn.errors import DataError

    vocab = getattr(hf_config(run.model), "vocab_size", None)
    if isinstance(vocab, int) and tokens > vocab:
        raise DataError(
            f"model.config.vocab_size={vocab} is smaller than the tokenizer's {tokens} tokens; "
            "raise model.config.vocab_size"
        )


def check_batch_fits(cfg: LoadedConfig) -> None:
    """One micro-batch's hidden state (a lower bound of what the first stage holds) must fit
    the largest device: checked from the config alone, before anything is allocated, so a huge
    ``train.batch_size`` or ``data.seq_len`` is one line rather than an allocation failure."""
    run = cfg.run
    mb, seq = run.train.batch_size // run.train.micro_batches, run.data.seq_len
    text = hf_config(run.model)
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    hidden = int(getattr(text, "hidden_size", 0) or 1)
    need_gb = mb * seq * hidden * 2 / 1e9  # bf16, the smallest activation dtype a run uses
    biggest = max(cfg.topology.devices, key=lambda d: max(d.memory_gb, d.host_budget_gb))
    have_gb = max(biggest.memory_gb, biggest.host_budget_gb)
    if need_gb > have_gb:
        raise ConfigError(
            f"train.batch_size={run.train.batch_size}, data.seq_len={seq}: one micro-batch's hidden state alone "
            f"({mb} rows x {seq} tokens x {hidden} x 2 B = {need_gb:.3g} GB) exceeds the largest device's memory "
            f"({have_gb:g} GB, '{biggest.name}'); lower train.batch_size or data.seq_len, or raise train.micro_batches"
        )


def meta_layers(cfg: LoadedConfig, cuda_kernels: bool) -> list[LayerProfile]:
    """The chain's costs counted on the meta device, attention as CUDA runs it or as a CPU does."""
    run = cfg.run
    return meta_profile(
        run.model,
        run.train.batch_size // run.train.micro_batches,
        run.data.seq_len,
        run.train.seed,
        method_policy.variants(run),
        method_policy.lora_spec(run),
        weights_dtype(run.train.dtype),
        cuda_kernels,
    )


def counted_on_devices(cfg: LoadedConfig, profile: ModelProfile) -> dict[str, list[LayerProfile]]:
    """A meta profile's layers as each CPU device runs them, where that differs (the profile
    counts attention as CUDA runs it when the topology has a GPU: fp32 with grouped key/value
    heads takes the math path there, and saves the probabilities)."""
    kinds = {d.accelerator for d in cfg.topology.devices}
    if profile.device != "meta" or not {"cpu", "cuda"} <= kinds:
        return {}
    layers = meta_layers(cfg, cuda_kernels=False)
    if layers == profile.layers:
        return {}
    return {d.name: layers for d in cfg.topology.devices if d.accelerator == "cpu"}


def measured_on_devices(
    cfg: LoadedConfig, counted: dict[str, list[LayerProfile]]
) -> tuple[dict[str, list[LayerProfile]], list[dict]]:
    """``plan.profile: on_cluster``: each pool device's layers (``counted``) with the times
    measured there, in its own Ray worker (attached to, or started as the run would be); and
    the hosts whose devices ask for more threads than they have CPUs or were measured slower side
    by side (``PlanRequest.shared_cpus``)."""
    if cfg.run.plan.profile != ON_CLUSTER:
        return {}, []
    from cluster.ray_cluster import connect
    from splitlearn import logs
    from splitlearn.device_profile import device_profiles, profile_keys, shared_hosts, side_by_side
    from splitlearn.runtime import worker_env

    run = cfg.run
    connect(cfg.topology, run.ray.address, run.ray.num_cpus, timeout_s=run.ray.connect_timeout_s)
    logs.route_worker_output()  # the workers' warnings to the run's log, not the screen
    pool = profile_pool(cfg)
    env = worker_env(cfg.resolved_dict())
    keys = profile_keys(cfg, pool, env)
    found = device_profiles(cfg, counted, keys, env)
    threads = {d: cfg.topology.device(d).cpu_threads for d in pool}
    hosts = shared_hosts(pool, threads)
    side = side_by_side(cfg, hosts, keys, env)
    shared = []
    for devs, asked, cpus in hosts:
        crowded = asked > cpus
        if crowded:
            print(
                f"note: {', '.join(devs)} share a host of {cpus} CPUs and ask {asked} threads between them: "
                "timed one at a time, they compute slower where the run overlaps them (the simulated step shares "
                "the cores; the plan's search does not)",
                flush=True,
            )
        slow = {d: side[d] for d in devs if d in side}
        if crowded or slow:
            shared.append(
                {"cpus": cpus, "threads": {d: threads[d] for d in devs}, **({"side_by_side": slow} if slow else {})}
            )
    return found, shared


def profile_pool(cfg: LoadedConfig) -> list[str]:
    """The devices ``plan.profile: on_cluster`` measures: the plan's (replicas split), or all."""
    return [d for entry in (cfg.run.plan.devices or cfg.topology.device_names) for d in entry.split("+")]


def measured_topology(cfg: LoadedConfig, layers: list[LayerProfile], env: dict[str, str]) -> Topology:
    """The topology with what a transfer of a cut's activation measured between the pool
    devices' nodes (a link is no faster than that); Ray is up (:func:`measured_on_devices`)."""
    from splitlearn.device_profile import measure_links

    pool = profile_pool(cfg)
    nbytes = max((layer.out_bytes for layer in layers[:-1]), default=0)
    if len(set(pool)) < 2 or nbytes <= 0:
        return cfg.topology
    links = measure_links(pool, nbytes, gpu_devices(cfg, pool), cfg.run.plan.codec, env=env)
    return dataclasses.replace(cfg.topology, measured=links)


def gpu_devices(cfg: LoadedConfig, pool: list[str]) -> set[str]:
    """The devices of ``pool`` Ray gives a GPU, whose workers compute there."""
    return {d for d in pool if cfg.topology.device(d).accelerator == "cuda" and cfg.topology.device(d).gpus}


def measured_overhead_ms(cfg: LoadedConfig, env: dict[str, str]) -> float:
    """What a step costs the runtime outside the stages' actions on this cluster
    (:func:`splitlearn.device_profile.measure_call_ms`); Ray is up (:func:`measured_on_devices`)."""
    from splitlearn.device_profile import measure_call_ms

    pool = list(dict.fromkeys(profile_pool(cfg)))
    return measure_call_ms(pool, gpu_devices(cfg, pool), env)


def plan_request(cfg: LoadedConfig, profile: ModelProfile | None = None) -> PlanRequest:
    """What the partitioner is asked: the layers, the topology and the config's constraints."""
    run = cfg.run
    federation.check_untied(run)
    profile = profile or load_profile(cfg)
    n = len(profile.layers)
    if run.plan.profile and n != len(meta_chain_names(cfg)):
        raise ConfigError(f"plan.profile: it has {n} layers but the model's chain has {len(meta_chain_names(cfg))}")
    counted = counted_on_devices(cfg, profile)
    measured, shared_cpus = measured_on_devices(
        cfg, {d: counted.get(d, profile.layers) for d in cfg.topology.device_names}
    )
    from splitlearn.device_profile import measured_like
    from splitlearn.runtime import worker_env

    env = worker_env(cfg.resolved_dict()) if measured else {}  # the measurements run as the stage workers do
    # a device not on the cluster: a measured one's times, scaled by tflops
    like = measured_like(cfg.topology, list(measured), profile_pool(cfg)) if measured else {}
    layers = {**counted, **measured, **{d: measured[r] for d, r in like.items()}} or None
    req = PlanRequest(
        layers=profile.layers,
        topology=measured_topology(cfg, profile.layers, env) if measured else cfg.topology,
        num_micro_batches=run.train.micro_batches,
        schedule=run.runtime.schedule,
        devices=federation.plan_devices(cfg) or None,
        clients=tuple(federation.clients(run)),
        rounds_every=run.federation.rounds_every,
        cuts=list(run.plan.cuts) or None,
        label_privacy=run.plan.label_privacy,
        precision=run.train.dtype,
        calibrated_tflops=profile.calibrated_tflops,
        codec=run.plan.codec,
        finetune=method_policy.policy(run),
        allow=tuple(run.plan.allow),
        search_seconds=run.plan.search_seconds,
        device_layers=layers,
        measured_on=frozenset(measured),
        measured_like=like,
        step_overhead_ms=measured_overhead_ms(cfg, env) if measured else 0.0,
        shared_cpus=shared_cpus,
        cpu_runtime_bytes=run.runtime.cpu_runtime_mb * 1e6,
    )
    from splitlearn.privacy.bound import apply

    apply(cfg, req)  # the privacy bound: layers the owner keeps, the head on it (measured)
    return req


def meta_chain_names(cfg: LoadedConfig) -> list[str]:
    """The names of the model's chain of layers, from the model built on the meta device."""
    return chain_names(num_blocks(meta_model(cfg.run.model)))


def make_plan(cfg: LoadedConfig, partitioner: str | None = None, request: PlanRequest | None = None) -> Plan:
    """The plan of ``partitioner`` (default the config's) for ``request`` (default the
    config's), checked and with the simulator's step time."""
    req = request or plan_request(cfg)
    turns = federation.sequential(cfg.run) and bool(req.clients)
    if turns:  # sequential split learning: planned, simulated and bounded as the first client's turn
        first = req.clients[0]
        req = dataclasses.replace(req, clients=(), devices=[first, *(req.devices or [])[1:]] or None)
    plan = partition(partitioner or cfg.run.plan.partitioner, req)
    check_offload_schedule(cfg, plan)
    simulate_plan(plan)
    from splitlearn.privacy.bound import annotate_run

    annotate_run(cfg, plan)
    if turns:  # every client takes its turn on the clients' stage
        plan.stages[0].devices = list(federation.clients(cfg.run))
        plan.predicted["sequential_clients"] = len(plan.stages[0].devices)  # the figures are one turn's
    return plan


def check_offload_schedule(cfg: LoadedConfig, plan: Plan) -> None:
    """A params-offloaded (ZeRO-3) stage must hold one micro-batch at a time: checked on the
    plan, before anything is placed."""
    from splitlearn.zero import check_schedule

    run = cfg.run
    sched = S.build(run.runtime.schedule, plan.num_stages, run.train.micro_batches)
    for st in plan.stages:
        for r in range(len(st.devices)):
            check_schedule(
                st.offload, S.replica_actions(sched[st.index], r, len(st.devices)), st.index, run.runtime.schedule
            )


def simulate_plan(plan: Plan) -> None:
    """Add the simulator's step time (same schedule data as the workers) to the plan."""
    overhead = plan.predicted.get("step_overhead_ms", 0.0)
    shared = plan.predicted.get("shared_cpus")
    # as the workers step: together, after the global gradient norm
    plan.predicted["simulated_step_ms"] = round(
        simulate(plan, step_overhead_ms=overhead, shared_cpus=shared, step_barrier=True).step_ms, 4
    )
