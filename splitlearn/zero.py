"""DeepSpeed ZeRO offload for one pipeline stage, inside its Ray worker.

A stage planned with ``offload: optimizer`` is wrapped by ``deepspeed.initialize`` with
ZeRO stage 2 and ``offload_optimizer: cpu`` (DeepSpeedCPUAdam): the fp32 gradient copy and
the Adam moments live in host memory and the step runs on the host CPU. DeepSpeed is not
launched by its launcher: the worker has already joined the pipeline (whose groups are
standalone, :mod:`splitlearn.stage.fabric`), torch's default group in an offloaded stage's worker
is the stage's replica group, and a model-parallel-unit object (:class:`ReplicaGroups`)
hands DeepSpeed that group, so its collectives never leave the stage.

``offload: params`` uses ZeRO stage 3 with ``offload_param: cpu`` too. ZeRO-3 calls
world-wide collectives (barriers, broadcasts from rank 0), so the pipeline's own groups are
standalone (:mod:`splitlearn.stage.fabric`) and torch's default group of an offloaded stage's
worker is its replica group: DeepSpeed's world. ZeRO-3 also needs one micro-batch in flight
per replica (:func:`check_schedule`).

Everything that touches DeepSpeed's internals is here: the flat fp32 gradient partitions
(for the pipeline-wide gradient norm) and the by-name optimizer state (checkpoints in the
same format as plain stages, so a checkpoint loads into a plan with or without offload).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from splitlearn.errors import ConfigError, UserError

log = logging.getLogger(__name__)

ZERO_STAGE = {"optimizer": 2, "params": 3}
# keys splitlearn derives from train.* and the plan; a deepspeed: section may not set them
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
ADAM_STATE = ("exp_avg", "exp_avg_sq")


class DeepSpeedOpError(UserError):
    """A DeepSpeed op that the stage needs cannot be built or loaded on its device."""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def bucket_elements(trainable: int) -> int:
    """ZeRO's reduce/all-gather bucket, in elements: a quarter of the stage's trainable
    parameters, between 1e6 and 5e7 (DeepSpeed's default, 5e8, is 2 GB of fp32 on the device
    and defeats offload on a small one)."""
    return int(min(5e7, max(1e6, trainable // 4)))


def check_user_section(user: dict[str, Any], offload: str, where: str = "deepspeed") -> None:
    """The ``deepspeed:`` section of a run config, against the stage's offload mode."""
    for key in OWNED_KEYS:
        if key in user:
            what = (
                "train.max_grad_norm (the norm is global over every stage)"
                if key == "gradient_clipping"
                else ("train.batch_size and train.micro_batches")
            )
            raise ConfigError(f"{where}.{key}: set by splitlearn from {what}; remove it from the deepspeed section")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}.zero_optimization: expected a mapping, got {type(zero).__name__}")
    stage = zero.get("stage")
    if offload == "params" and stage is not None and int(stage) < 3:
        raise ConfigError(
            f"{where}.zero_optimization.stage={stage}: offload: params needs ZeRO stage 3; remove the key or set 3"
        )
    if offload == "optimizer" and stage is not None and int(stage) not in (1, 2):
        raise ConfigError(
            f"{where}.zero_optimization.stage={stage}: offload: optimizer runs ZeRO stage 2 (or 1); "
            "for stage 3 (the weights in host memory too) set offload: params"
        )


def check_schedule(offload: str, actions, stage: int, schedule: str) -> None:
    """ZeRO-3 keeps one micro-batch's gradients at a time: with a second forward before the
    first one's backward (GPipe, or 1F1B's warm-up) it loses the first one's gradients
    (measured with DeepSpeed 0.19.8: the parameter gradients of a two-micro-batch step came
    out as the second micro-batch's alone). So a params-offloaded stage must run its
    micro-batches one at a time."""
    from partitioners.schedule import peak_in_flight

    if offload != "params":
        return
    inflight = peak_in_flight(actions)
    if inflight > 1:
        raise ConfigError(
            f"stage {stage}: offload: params (ZeRO-3) needs one micro-batch in flight, but runtime.schedule="
            f"{schedule} holds {inflight} on it (DeepSpeed's stage 3 then loses gradients); use "
            "runtime.schedule: sequential, put the stage last under 1f1b, give it as many replicas as "
            "micro-batches, or use offload: optimizer"
        )


def ds_config(
    train: Any,
    *,
    offload: str,
    rows_per_micro_batch: int,
    micro_batches_per_replica: int,
    replicas: int,
    trainable_params: int,
    on_cuda: bool,
    user: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of one offloaded stage: a pure function of the run's training
    settings and the stage, with the run config's ``deepspeed:`` section merged over it.

    Gradient clipping stays off here: the worker clips by the norm over every stage of the
    pipeline, as an unsplit model would (see :func:`grad_partitions`)."""
    if offload not in ZERO_STAGE:
        raise ValueError(f"offload '{offload}' does not use DeepSpeed")
    user = dict(user or {})
    check_user_section(user, offload)
    bucket = bucket_elements(trainable_params)
    zero: dict[str, Any] = {
        "stage": ZERO_STAGE[offload],
        "offload_optimizer": {"device": "cpu", "pin_memory": on_cuda},
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
        zero["stage3_prefetch_bucket_size"] = bucket
    base = {
        "train_micro_batch_size_per_gpu": rows_per_micro_batch,
        "gradient_accumulation_steps": micro_batches_per_replica,
        "train_batch_size": rows_per_micro_batch * micro_batches_per_replica * replicas,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        # torch.optim.AdamW's defaults, so a stage steps the same with and without offload
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": train.weight_decay},
        },
        "steps_per_print": 2**31 - 1,
        # DeepSpeed turns an outer torch.autocast off inside its engine: the run's bf16 autocast
        # must be its own, or the stage computes in fp32
        "torch_autocast": {"enabled": train.dtype == "bf16", "dtype": "bfloat16"},
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
    }
    return _merge(base, user)


class ReplicaGroups:
    """DeepSpeed's model-parallel unit: the data-parallel group is the stage's replica group;
    the model-parallel group is this rank alone (pipeline stages are not tensor-parallel, and
    the cross-stage gradient norm is the worker's business)."""

    def __init__(self, replica_group, own_group):
        self.replica_group, self.own_group = replica_group, own_group

    def get_data_parallel_group(self):
        return self.replica_group

    def get_data_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size(self.replica_group)

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.replica_group)

    def get_model_parallel_group(self):
        return self.own_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def ensure_ops(device_name: str, on_cuda: bool) -> None:
    """Build (or load from the torch extensions cache) the DeepSpeed ops the stage will use,
    before any process group exists and under the longer prepare timeout, so a missing
    compiler is one clear error, not a hang: CPU Adam, and on a CPU stage the shared-memory
    collectives that DeepSpeed's CPU accelerator builds when it wraps the process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_cuda else "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # an import error names a missing package or a broken install
        raise DeepSpeedOpError(
            f"device '{device_name}': deepspeed cannot be imported ({e}); pip install deepspeed"
        ) from e
    builders = [CPUAdamBuilder()]
    if not on_cuda:
        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None and deepspeed.ops.__compatible_ops__.get(shm.NAME, False):
            builders.append(shm)
    for builder in builders:
        try:
            log.info("loading DeepSpeed's %s op (built on first use: a few minutes)", builder.NAME)
            builder.load(verbose=False)
        except BaseException as e:  # noqa: BLE001 - torch's JIT build raises RuntimeError or exits
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            raise DeepSpeedOpError(
                f"device '{device_name}': DeepSpeed op '{builder.NAME}' cannot be built ({first}); "
                "it needs a C++ compiler (g++) and Python headers on the node, or install deepspeed "
                "with the op prebuilt (e.g. DS_BUILD_CPU_ADAM=1) where they exist"
            ) from e


def initialize(module: torch.nn.Module, params: list, config: dict[str, Any], groups: ReplicaGroups, rank_env: dict):
    """``deepspeed.initialize`` without its launcher, inside a worker whose world exists."""
    for k, v in rank_env.items():
        os.environ[k] = str(v)
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=params, config=config, mpu=groups, dist_init_required=False
    )
    return engine


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed steps (DeepSpeedCPUAdam over the flat fp32 partitions)."""
    return engine.optimizer.optimizer


def grad_partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 gradient partitions after the last backward of a step (before the
    step): the replicas of a stage hold disjoint partitions, so summing their squares over
    every rank of the pipeline counts each gradient entry once."""
    opt = engine.optimizer
    groups = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    if groups is None:
        groups = getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO 3
    if groups is None:
        raise RuntimeError(f"unsupported DeepSpeed optimizer {type(opt).__name__}: no fp32 gradient partitions")
    return [g.grad for g in groups if g.grad is not None]


def optimizer_step_count(engine) -> int:
    states = list(inner_optimizer(engine).state.values())
    return int(states[0].get("step", 0)) if states else 0


def full_params(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every parameter's whole fp32 value by checkpoint name (gathered over the replicas)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu().contiguous().clone() for name, p in params.items()}


def get_state(engine, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value and Adam moments, whole, by checkpoint name (gathered over
    the replica group: every replica calls this, in the same order)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = full_params(params)
    step = optimizer_step_count(engine)
    for name, p in params.items():
        if step:
            for key in ADAM_STATE:
                out[f"optim/{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().contiguous().clone()
            out[f"optim/{name}/step"] = torch.tensor(float(step))
    return out


def set_state(engine, params: dict[str, torch.nn.Parameter], get) -> None:
    """Load values and Adam moments by checkpoint name (``get(key)`` reads a tensor, or
    None when the checkpoint has no optimizer state yet)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = inner_optimizer(engine)
    if any(get(f"optim/{name}/{ADAM_STATE[0]}") is not None for name in params):
        _ensure_adam_state(engine, opt)
    steps = set()
    for name, p in params.items():
        value = get(name).to(torch.float32)
        with torch.no_grad():
            safe_set_full_fp32_param(p, value)  # the optimizer's fp32 master partition
            if hasattr(p, "ds_id"):  # ZeRO 3: the module's own partition of the weight too
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            elif p.numel() == value.numel():  # ZeRO 1/2: the module holds the whole weight too
                p.data.copy_(value.to(p.dtype))
        moments = {key: get(f"optim/{name}/{key}") for key in ADAM_STATE}
        if all(m is not None for m in moments.values()):
            for key, value in moments.items():
                safe_set_full_optimizer_state(p, value.to(torch.float32), key)
            step = get(f"optim/{name}/step")
            if step is not None:
                steps.add(int(step.item()))
    if steps:
        for state in opt.state.values():
            state["step"] = max(steps)


def _ensure_adam_state(engine, opt) -> None:
    """DeepSpeedCPUAdam creates its moments on the first step; a checkpoint loaded before
    then needs them to exist (zeros, as the first step would make them) and, under ZeRO 1/2,
    linked to the parameters' fragments."""
    created = False
    flats = [flat for group in opt.param_groups for flat in group["params"]]
    flats += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO 3's keys
    for flat in flats:
        state = opt.state.setdefault(flat, {})
        for key in ADAM_STATE:
            if key not in state:
                state[key] = torch.zeros_like(flat.data, dtype=torch.float32)
                created = True
        state.setdefault("step", 0)
    if not created or hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        return  # ZeRO 3 reads the state by its flat partitions directly: nothing to link
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None:
        raise RuntimeError(f"unsupported DeepSpeed optimizer {type(engine.optimizer).__name__}: cannot link state")
    engine.optimizer._hp_optimizer_states_linked = False
    link()
