"""The run config: typed sections merged by omegaconf from schema, YAML file and overrides.

``load_config(path, overrides)`` returns a :class:`RunConfig` of plain dataclasses and a
resolved :class:`~cluster.topology.Topology`. Every error is a :class:`ConfigError` whose one
line names the key and the file; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.conf import conf_error_line, load_yaml_file, number_problem
from cluster.topology import TIERS, Topology, load_topology, topology_from_container
from partitioners.choices import (
    ALLOW_OPTIONS,
    CODECS,
    FROZEN_DTYPES,
    METHODS,
    OFFLOAD_MODES,
    OFFLOAD_PRECISIONS,
    PRECISIONS,
)
from partitioners.planner import PARTITIONERS
from partitioners.schedule import SCHEDULES
from splitlearn.data_formats import DATA_FORMATS
from splitlearn.errors import ConfigError, TopologyError

LOSS_ON = ("response", "all")  # data.loss_on
LR_SCHEDULES = ("constant", "linear", "cosine")  # train.lr_schedule
LOGGERS = ("auto", "tensorboard", "none")  # runtime.logger
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
PROGRESS_MODES = ("auto", "bar", "log", "none")  # runtime.progress and --progress
COMPILE_MODES = ("auto", "blocks", "none")  # runtime.compile
ON_CLUSTER = "on_cluster"  # plan.profile: measured on each device


@dataclass
class ModelConfig:
    family: str | None = None  # transformers model_type, e.g. llama, gpt2 (random init)
    path: str | None = None  # a local checkpoint directory (config.json + weights)
    config: dict[str, Any] = field(default_factory=dict)  # transformers config keys
    attn_implementation: str = "sdpa"  # eager | sdpa
    adapter_module: str | None = None  # module that registers extra families


@dataclass
class DataConfig:
    path: str = "data/quickstart.txt"  # a file (.txt, .jsonl, .parquet) or a datasets save_to_disk folder
    # auto | text | jsonl | chat | prompt_response | parquet | hf_disk (auto: by suffix, kind by first row's fields)
    format: str = "auto"
    text_key: str = "text"  # the field of a row that holds the text (text rows)
    messages_key: str = "messages"  # chat rows: a list of {role, content}
    prompt_key: str = "prompt"  # prompt/response rows
    response_key: str = "response"
    loss_on: str = "response"  # chat and prompt/response rows: response (assistant turns) | all tokens
    tokenizer: str = "byte"  # "byte" (built in), a local tokenizer.json, or a local tokenizer folder (chat template)
    seq_len: int = 64
    # text rows: concatenate documents and cut blocks (null: true); false: one padded row each.
    # chat and prompt/response rows are never packed (one padded row each)
    packing: bool | None = None
    eval_path: str | None = None  # held-out rows of the same kind, for the eval loss
    eval_fraction: float = 0.0  # or hold out this fraction of data.path's samples (seeded by train.seed)


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per step
    micro_batches: int = 1  # the batch is cut into this many micro-batches
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: constant | linear (to 0) | cosine (to 0)
    eval_every: int = 0  # eval loss every N steps (0: at the end only) when data has an eval set
    max_grad_norm: float = 1.0  # 0 disables clipping; the norm is global over all stages
    seed: int = 0
    # fp32 | bf16 (autocast over fp32 weights) | bf16-master (bf16 weights and gradients; fp32
    # master weights and AdamW moments for what trains) | bf16-pure (bf16 weights, gradients, moments)
    dtype: str = "fp32"


@dataclass
class PlanConfig:
    partitioner: str = "uniform"  # one of PARTITIONERS
    devices: list[str] = field(default_factory=list)  # stage order; empty: all devices
    cuts: list[int] = field(default_factory=list)  # manual: chain index where each stage after the first starts
    label_privacy: bool = False  # the head and loss run on the data owner too (U-shaped split)
    codec: str = "none"  # wire codec on every link: none | fp16 | bf16 | int8
    # a profile.json from `splitlearn profile`; on_cluster: each device times the layers in its
    # own Ray worker (splitlearn/device_profile.py); default: counted on meta (FLOPs over tflops)
    profile: str | None = None
    # what the planner may change on edge-tier stages where it makes the plan fit or faster:
    # lora, frozen (method), recompute, bf16 | fp16 | int8 (frozen weights' storage)
    allow: list[str] = field(default_factory=list)
    # optimal's search time: past it the plan carries a proven bound instead of optimality
    search_seconds: float = 10.0


PRIVACY_MEASURE = ("cached", "auto", "off")  # privacy.measure
PRIVACY_ATTACKS = ("nearest", "learned", "label")  # privacy.attacks


@dataclass
class PrivacyConfig:
    """What may leave the data owner, bounded by measured attacks (:mod:`splitlearn.privacy`)."""

    # the share of private tokens an attack may recover from what the owner sends (activations
    # at its cut; labels, which in causal-LM training are the input tokens; gradients of a U's tail)
    max_token_recovery: float = 0.05
    max_label_recovery: float = 1.0  # the share of labels attack (c) may recover (1: no bound of its own)
    # cached: bound the plan by the measurement `splitlearn privacy` cached for this model, if any;
    # auto: measure it first when not cached; off: no bound
    measure: str = "cached"
    max_owner_blocks: int = 4  # candidate cuts measured: 0 .. this many blocks on the owner (front and tail)
    finetune_steps: int = 0  # the owner's model is measured after this many fine-tuning steps on its data
    attacks: list[str] = field(default_factory=lambda: list(PRIVACY_ATTACKS))
    attack_steps: int = 300  # attack (b)'s budget: decoder training steps on public text
    cache_dir: str = "~/.cache/splitlearn/privacy"


@dataclass
class LoraSection:
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    target_modules: list[str] | None = None  # module-name suffixes; null: the family's attention projections


@dataclass
class FinetuneOverride:
    """Partial settings for some stages; unset (null) keys keep the broader setting."""

    method: str | None = None
    recompute: bool | None = None
    frozen_dtype: str | None = None
    offload: str | None = None


@dataclass
class FinetuneConfig:
    method: str = "full"  # full | frozen | lora, for every stage unless overridden
    recompute: bool = False  # activation checkpointing: keep only each layer's input, recompute in backward
    frozen_dtype: str = "fp32"  # frozen weights of lora/frozen stages: fp32 | bf16 | fp16 | int8 (weight-only)
    # DeepSpeed ZeRO offload: none | optimizer (ZeRO-2, optimizer state and the step on the host CPU);
    # the planner also picks it on cuda devices where it is the only way to fit, or faster
    offload: str = "none"
    lora: LoraSection = field(default_factory=LoraSection)
    by_tier: dict[str, FinetuneOverride] = field(default_factory=dict)  # edge | cloud
    by_stage: dict[str, FinetuneOverride] = field(default_factory=dict)  # stage index -> settings (wins over tier)
    merge_adapters: bool = False  # also write checkpoint/merged/: LoRA merged in, a transformers directory


@dataclass
class RuntimeConfig:
    schedule: str = "sequential"
    timeout_s: float = 300.0  # a transfer or step waiting longer fails, naming the stage
    placement_timeout_s: float = 60.0  # wait for Ray to place every stage
    output_dir: str = "runs"
    run_name: str | None = None  # default: <config name>-<timestamp>
    log_every: int = 10  # plain log line every N steps when not on a terminal
    progress: str = "auto"  # auto | bar | log | none
    checkpoint: bool = True  # save the final segments under <run>/checkpoint
    # curves beside metrics.jsonl: tensorboard (event files under <run>/tb) | none | auto (tensorboard if installed)
    logger: str = "auto"
    max_restarts: int = 2  # after a lost worker or a failed step: place again, resume from the last checkpoint
    replan_on_failure: bool = False  # a device gone for good: plan again on the devices that remain
    # post a step's receives over host memory when it starts (a gloo transfer moves only once
    # its receive is posted); false: each at its action, as before
    prepost_receives: bool = True
    emulate_links: bool = False  # each transfer takes at least its link's latency + bytes / bandwidth
    measure_memory: bool = False  # record each stage's peak memory per step (slower: profiler on CPU)
    trace: bool = False  # record each action's start and end per stage and step (metrics.jsonl "trace")
    # workers' glibc malloc: allocations from this size up are mapped on their own and returned
    # to the system when freed, so resident memory follows what is alive and holds to the plan
    # (0: glibc's adaptive default, which keeps freed memory; see docs/decisions.md)
    malloc_mmap_threshold_kb: int = 128
    # workers' glibc malloc arenas (MALLOC_ARENA_MAX; 0: glibc's default, 8 per core): one
    # keeps a freed buffer for any thread's next allocation instead of stranding it in the
    # arena of the thread that made it (see docs/decisions.md)
    malloc_arena_max: int = 1
    # ask the kernel for transparent huge pages under the workers' tensors of 2 MB and up
    # (torch's THP_MEM_ALLOC_ENABLE): a fresh 2 MB tensor faults once instead of 512 times,
    # which is most of what the mapped allocations above cost (docs/decisions.md)
    huge_pages: bool = True
    # torch.compile each stage's blocks: auto = on CUDA stages (a CPU stage's first steps would
    # spend minutes compiling), blocks = on every stage, none = eager
    compile: str = "auto"
    # resident memory a CPU worker's libraries keep besides its stage (oneDNN's caches, the
    # allocator's arenas), counted on every CPU stage of the plan: 25 MB measured on x86 with
    # torch's CPU build (partitioners/costmodel.py CPU_RUNTIME_BYTES); measure your devices'
    cpu_runtime_mb: float = 25.0
    # record every tensor each worker sends (kind, dtype, shape, stages and devices at both
    # ends) in metrics.jsonl, for a privacy audit of what left which device
    audit_transport: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N steps (0: only at the end, when runtime.checkpoint)
    keep: int = 3  # whole checkpoints kept, newest first


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else an embedded local cluster
    num_cpus: int | None = None  # embedded cluster only; default: this machine's cores
    connect_timeout_s: float = 20.0  # attaching to ray.address / $RAY_ADDRESS fails after this


@dataclass
class TopologySection:
    file: str | None = None  # a topology YAML, relative to the run config
    inline: dict[str, Any] | None = None  # or the topology itself (devices, links)


FEDERATION_MODES = ("none", "splitfed", "sequential")  # federation.mode


@dataclass
class ClientData:
    path: str = MISSING  # this client's own data file, read only on its worker (format etc. from data:)


@dataclass
class FederationClient:
    device: str = MISSING  # a data-owning device of the topology
    data: ClientData = field(default_factory=ClientData)


@dataclass
class FederationConfig:
    """Split-federated learning (:mod:`splitlearn.federation`): many data-owning clients, each
    running its own copy of the front segment on its own data; the cloud's stages are shared."""

    # none: one data owner; splitfed: the clients run in parallel, their fronts averaged (FedAvg);
    # sequential: classic split learning, the clients take turns (one client's batch per step,
    # round-robin), the front handed on to the next client through the server after each step
    mode: str = "none"
    clients: list[FederationClient] = field(default_factory=list)
    # synchronous FedAvg of the fronts every this many steps, weighted by samples: 1 averages
    # the gradients every step (= centralised training on all clients' batches); k > 1 lets
    # each client step its own front k-1 times on its own data, then averages the weights
    rounds_every: int = 1


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologySection = field(default_factory=TopologySection)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    # merged over the DeepSpeed config splitlearn generates for an offloaded stage
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedConfig:
    """A run config with its topology resolved and the file it came from."""

    run: RunConfig
    topology: Topology
    source: str
    base_dir: Path

    def resolve_path(self, p: str) -> Path:
        """Relative paths in a config are relative to the config file's directory, falling
        back to the working directory when that is where the file is."""
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        beside = self.base_dir / path
        return beside if beside.exists() or not path.exists() else path

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self.run))

    def resolved_dict(self) -> dict[str, Any]:
        """The run config with the topology written inline: what the workers receive."""
        d = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.structured(self.run)))
        d["topology"] = {"file": None, "inline": OmegaConf.to_container(OmegaConf.structured(self.topology))}
        return d


def load_config(path: str | Path, overrides: list[str] | None = None) -> LoadedConfig:
    p = Path(path)
    raw = load_yaml_file(p, "config file", ConfigError)
    return config_from_container(raw, overrides or [], str(p), p.parent)


def _check_container_kinds(schema: Any, raw: Any, key: str, source: str) -> None:
    """A list where the schema has a mapping or the other way round, named by its key (the
    merge itself fails with a bare TypeError that names nothing)."""
    if OmegaConf.is_config(raw):
        raw = OmegaConf.to_container(raw)
    if not isinstance(raw, dict) or not OmegaConf.is_dict(schema) or schema._is_none():
        return  # not two mappings (an optional section left unset in the schema is None)
    for k, value in raw.items():
        if k not in schema:
            continue  # an unknown key: the merge names it
        node = schema._get_node(k)
        where = f"{key}.{k}" if key else str(k)
        if OmegaConf.is_list(node) and isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a list, got a mapping")
        if OmegaConf.is_dict(node) and isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a mapping, got a list")
        _check_container_kinds(node, value, where, source)


def config_from_container(raw: Any, overrides: list[str], source: str, base_dir: Path) -> LoadedConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=10")
    raw = _stage_keys_as_strings(raw)
    schema = OmegaConf.structured(RunConfig)
    _check_container_kinds(schema, raw, "", source)
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as e:
        raise ConfigError(conf_error_line(e, "", source)) from e
    for item in overrides:
        merged = _apply_override(merged, item)
    try:
        run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(conf_error_line(e, "", source)) from e
    loaded = LoadedConfig(run, Topology(), source, base_dir)
    loaded.topology = _resolve_topology(loaded)
    validate(loaded)
    return loaded


def _apply_override(merged: Any, item: str) -> Any:
    """``merged`` with one ``key=value`` override, or one line naming the override."""
    source = f"override '{item}'"
    try:
        dot = OmegaConf.from_dotlist([item])
        _check_container_kinds(merged, dot, "", source)
        return OmegaConf.merge(merged, dot)
    except OmegaConfBaseException as e:
        raise ConfigError(conf_error_line(e, "", source)) from e
    except (TypeError, ValueError) as e:  # e.g. an index into a list inside a free-form dict
        raise ConfigError(f"{source}: cannot apply it: {e}") from e
    except yaml.YAMLError as e:  # the value is parsed as YAML: e.g. an unclosed list
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(
            f"{source}: the value is not valid YAML ({problem}); close brackets and quotes, or quote the whole value"
        ) from e


def _stage_keys_as_strings(raw: Any) -> Any:
    """``finetune.by_stage`` is keyed by stage index: YAML reads ``0:`` as an int, a
    ``finetune.by_stage.0.method=lora`` override as a string; the schema keeps strings."""
    try:
        fin = raw.get("finetune") if OmegaConf.is_dict(raw) or isinstance(raw, dict) else None
        by_stage = fin.get("by_stage") if fin is not None and hasattr(fin, "get") else None
    except OmegaConfBaseException:
        return raw
    if not by_stage or not hasattr(by_stage, "items"):
        return raw
    container = cast(dict[str, Any], OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else dict(raw))
    container["finetune"] = dict(container["finetune"])
    container["finetune"]["by_stage"] = {str(k): v for k, v in container["finetune"]["by_stage"].items()}
    return OmegaConf.create(container)


def _resolve_topology(cfg: LoadedConfig) -> Topology:
    sec = cfg.run.topology
    if sec.file and sec.inline:
        raise ConfigError(f"{cfg.source}: topology: give either topology.file or topology.inline, not both")
    try:
        if sec.file:
            return load_topology(cfg.resolve_path(sec.file))
        if sec.inline:
            return topology_from_container(sec.inline, cfg.source)
    except TopologyError as e:
        raise ConfigError(str(e)) from e
    raise ConfigError(f"{cfg.source}: topology: missing; set topology.file (a YAML path) or topology.inline")


class _Checker:
    """Raises one :class:`ConfigError` line naming the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, msg: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {key}: {msg}")

    def choice(self, key: str, value: str, allowed: Iterable[str]) -> None:
        if value not in allowed:
            self.fail(key, f"'{value}' is not one of {', '.join(allowed)}")

    def file(self, key: str, given: str, path: Path, what: str) -> None:
        """``path`` (``given`` as the user wrote it) must be a file."""
        if path.is_dir():
            self.fail(key, f"{given} is a directory; give {what}")
        if not path.is_file():
            self.fail(key, f"file not found: {given}")

    def at_least(self, key: str, value: float, low: float) -> None:
        problem = number_problem(value, low)
        if problem:
            self.fail(key, problem)

    def positive(self, key: str, value: float) -> None:
        problem = number_problem(value, 0, strict=True)
        if problem:
            self.fail(key, problem)


def validate(cfg: LoadedConfig) -> None:
    """Range and choice checks that the type system cannot express, section by section."""
    c = _Checker(cfg.source)
    _check_model(c, cfg)
    _check_data(c, cfg)
    _check_train(c, cfg.run.train)
    _check_plan(c, cfg)
    _check_finetune(c, cfg.run)
    _check_offload(cfg.run)
    _check_runtime(c, cfg.run)
    _check_privacy(c, cfg.run.privacy)
    from splitlearn.federation import check_federation

    check_federation(c, cfg)


def _check_privacy(c: _Checker, p: PrivacyConfig) -> None:
    for key in ("max_token_recovery", "max_label_recovery"):
        value = getattr(p, key)
        if not 0.0 <= value <= 1.0:
            c.fail(f"privacy.{key}", f"{value} is not a share between 0 and 1 (e.g. 0.05: 5% of tokens)")
    c.choice("privacy.measure", p.measure, PRIVACY_MEASURE)
    for i, a in enumerate(p.attacks):
        c.choice(f"privacy.attacks[{i}]", a, PRIVACY_ATTACKS)
    c.at_least("privacy.max_owner_blocks", p.max_owner_blocks, 0)
    c.at_least("privacy.finetune_steps", p.finetune_steps, 0)
    c.at_least("privacy.attack_steps", p.attack_steps, 0)


def _check_model(c: _Checker, cfg: LoadedConfig) -> None:
    m = cfg.run.model
    if bool(m.family) == bool(m.path):
        c.fail("model", "set exactly one of model.family (build from config) or model.path (local checkpoint)")
    if m.path and not cfg.resolve_path(m.path.replace("{stage}", "0")).is_dir():
        first = m.path.replace("{stage}", "0")
        what = "is a file; give a checkpoint directory" if cfg.resolve_path(first).exists() else "directory not found"
        c.fail("model.path", f"{what}: {first}" if what.startswith("dir") else f"{first} {what}")
    if m.path:
        m.path = str(cfg.resolve_path(m.path))
    c.choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)


def _check_data(c: _Checker, cfg: LoadedConfig) -> None:
    d = cfg.run.data
    c.choice("data.format", d.format, DATA_FORMATS)
    c.choice("data.loss_on", d.loss_on, LOSS_ON)
    c.at_least("data.seq_len", d.seq_len, 2)
    federated = cfg.run.federation.mode != "none"  # then each client's path (federation.clients)
    for key in ("eval_path",) if federated else ("path", "eval_path"):
        p = getattr(d, key)
        if cfg.run.ray.address is None and p is not None and not cfg.resolve_path(p).exists():
            c.fail(f"data.{key}", f"file not found: {p}")
    if d.tokenizer != "byte" and not cfg.resolve_path(d.tokenizer).exists():
        c.fail(
            "data.tokenizer", f"'{d.tokenizer}' is neither 'byte' nor an existing tokenizer.json or tokenizer folder"
        )
    if not 0 <= d.eval_fraction < 1:
        c.fail("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if d.eval_path and d.eval_fraction:
        c.fail("data.eval_fraction", "give either data.eval_path or data.eval_fraction, not both")


def _check_train(c: _Checker, t: TrainConfig) -> None:
    for key in ("steps", "batch_size", "micro_batches"):
        c.at_least(f"train.{key}", getattr(t, key), 1)
    if t.batch_size % t.micro_batches:
        c.fail("train.micro_batches", f"{t.micro_batches} does not divide train.batch_size={t.batch_size}")
    c.positive("train.lr", t.lr)
    for key in ("weight_decay", "warmup_steps", "max_grad_norm"):
        c.at_least(f"train.{key}", getattr(t, key), 0)
    c.choice("train.dtype", t.dtype, PRECISIONS)
    c.choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    c.at_least("train.eval_every", t.eval_every, 0)


def _plan_stages(p: PlanConfig) -> int:
    """The number of stages the config fixes (plan.devices, plus the loss stage under label privacy)."""
    return len(p.devices) + (1 if p.label_privacy else 0)


def _check_plan(c: _Checker, cfg: LoadedConfig) -> None:
    p = cfg.run.plan
    c.choice("plan.partitioner", p.partitioner, PARTITIONERS)
    owners = [i for i, d in enumerate(cfg.topology.devices) if d.owns_data]
    if len(owners) > 1 and cfg.run.federation.mode == "none":  # many data owners: federation only
        first, second = (cfg.topology.devices[i].name for i in owners[:2])
        c.fail(
            f"topology.devices[{owners[1]}].owns_data",
            f"'{second}' is a second data owner after '{first}'; a run has one data owner unless "
            "federation.mode is splitfed: set owns_data on one device, or add a federation: section",
        )
    names = set(cfg.topology.device_names)
    listed = [d for entry in p.devices for d in entry.split("+")]  # "a+b": one stage replicated on a and b
    for i, entry in enumerate(p.devices):
        for dev in entry.split("+"):
            if dev not in names:
                c.fail(
                    f"plan.devices[{i}]",
                    f"device '{dev}' is not in the topology (devices: {', '.join(cfg.topology.device_names)})",
                )
    if len(set(listed)) != len(listed):
        c.fail("plan.devices", "a device is listed twice")
    if p.partitioner == "manual" and not p.devices:
        c.fail("plan.devices", "the manual partitioner needs plan.devices (one per stage)")
    stages = _plan_stages(p)
    if p.partitioner == "manual" and len(p.cuts) != stages - 1:
        c.fail("plan.cuts", f"{stages} stages need {stages - 1} cuts, got {len(p.cuts)}")
    c.choice("plan.codec", p.codec, CODECS)
    c.positive("plan.search_seconds", p.search_seconds)
    if p.profile and p.profile != ON_CLUSTER:
        c.file("plan.profile", p.profile, cfg.resolve_path(p.profile), "a profile.json from `splitlearn profile`")
    for i, opt in enumerate(p.allow):
        c.choice(f"plan.allow[{i}]", opt, ALLOW_OPTIONS)


def _check_finetune(c: _Checker, r: RunConfig) -> None:
    f, p = r.finetune, r.plan
    c.choice("finetune.method", f.method, METHODS)
    c.choice("finetune.offload", f.offload, OFFLOAD_MODES)
    c.choice("finetune.frozen_dtype", f.frozen_dtype, FROZEN_DTYPES)
    for tier, over in f.by_tier.items():
        if tier not in TIERS:
            c.fail(f"finetune.by_tier.{tier}", f"'{tier}' is not a device tier ({', '.join(TIERS)})")
        _check_override(c, f"finetune.by_tier.{tier}", over)
    stages = _plan_stages(p)
    for key, over in f.by_stage.items():
        if not key.isdigit():
            c.fail(f"finetune.by_stage.{key}", "keys are stage indices (0, 1, ...)")
        if p.partitioner in ("uniform", "manual") and p.devices and int(key) >= stages:
            c.fail(f"finetune.by_stage.{key}", f"the plan has {stages} stages (0..{stages - 1})")
        _check_override(c, f"finetune.by_stage.{key}", over)
    lo = f.lora
    c.at_least("finetune.lora.r", lo.r, 1)
    c.positive("finetune.lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        c.fail("finetune.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    if lo.target_modules is not None and not lo.target_modules:
        c.fail("finetune.lora.target_modules", "an empty list adapts nothing; use null for the family's default")


def _check_runtime(c: _Checker, r: RunConfig) -> None:
    rt = r.runtime
    c.choice("runtime.schedule", rt.schedule, SCHEDULES)
    c.choice("runtime.progress", rt.progress, PROGRESS_MODES)
    c.choice("runtime.compile", rt.compile, COMPILE_MODES)
    c.at_least("runtime.cpu_runtime_mb", rt.cpu_runtime_mb, 0)
    c.choice("runtime.logger", rt.logger, LOGGERS)
    if rt.logger == "tensorboard":
        from splitlearn.curves import tensorboard_missing

        missing = tensorboard_missing()
        if missing:
            c.fail("runtime.logger", missing)
    c.positive("runtime.timeout_s", rt.timeout_s)
    c.positive("runtime.placement_timeout_s", rt.placement_timeout_s)
    c.at_least("runtime.log_every", rt.log_every, 1)
    c.at_least("runtime.max_restarts", rt.max_restarts, 0)
    c.at_least("runtime.malloc_mmap_threshold_kb", rt.malloc_mmap_threshold_kb, 0)
    c.at_least("runtime.malloc_arena_max", rt.malloc_arena_max, 0)
    problem = directory_problem(Path(rt.output_dir).expanduser())
    if problem:
        c.fail("runtime.output_dir", f"{problem}; runs go in a directory: give one you can write to")
    name = rt.run_name
    if name is not None and (not name or name in (".", "..") or any(sep in name for sep in "/\\")):
        c.fail("runtime.run_name", f"'{name}' must be a name, not a path: the run directory is <output_dir>/<run_name>")
    c.at_least("checkpoint.every_steps", r.checkpoint.every_steps, 0)
    c.at_least("checkpoint.keep", r.checkpoint.keep, 1)
    if r.ray.num_cpus is not None:
        c.at_least("ray.num_cpus", r.ray.num_cpus, 1)
    c.positive("ray.connect_timeout_s", r.ray.connect_timeout_s)


def directory_problem(path: Path) -> str | None:
    """Why a directory cannot be made or written at ``path``, or None. Its nearest existing
    ancestor must be a directory this process can create entries in: tried with an empty
    directory made and removed at once (permissions alone pass for root, and ``/proc``)."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file"
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is a file, not a directory" if existing else f"{path}: no such place"
    try:
        Path(tempfile.mkdtemp(prefix=".splitlearn-check-", dir=existing)).rmdir()
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    return None


def _check_override(c: _Checker, key: str, over: FinetuneOverride) -> None:
    if over.method is not None:
        c.choice(f"{key}.method", over.method, METHODS)
    if over.frozen_dtype is not None:
        c.choice(f"{key}.frozen_dtype", over.frozen_dtype, FROZEN_DTYPES)
    if over.offload is not None:
        c.choice(f"{key}.offload", over.offload, OFFLOAD_MODES)
    if over.method == "full" and over.frozen_dtype not in (None, "fp32"):
        c.fail(f"{key}.frozen_dtype", f"{over.frozen_dtype} stores frozen weights, but method full freezes none")


def _check_offload(r: RunConfig) -> None:
    """The offload modes the config asks for, against its ``deepspeed:`` section."""
    from splitlearn.zero import check_user_section

    f = r.finetune
    modes = {f.offload, *(o.offload for o in (*f.by_tier.values(), *f.by_stage.values()) if o.offload)}
    for mode in sorted(modes):
        check_user_section(r.deepspeed, mode)
    if modes - {"none"} and r.train.dtype not in OFFLOAD_PRECISIONS:
        raise ConfigError(
            f"train.dtype={r.train.dtype} keeps the weights in bf16, which a DeepSpeed-offloaded stage does not "
            f"run with yet: use train.dtype={' or '.join(OFFLOAD_PRECISIONS)} with offload, or drop finetune offload"
        )
