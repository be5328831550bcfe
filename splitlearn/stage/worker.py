"""The stage worker: one segment of the model on one device, run by its action list.

A plain class, unit-testable without Ray; :mod:`splitlearn.runtime` wraps it with
``ray.remote`` when it places it. It is a facade over the parts of a stage, each in its own
module: :mod:`~splitlearn.stage.groups` (ranks, process groups, DeepSpeed's engine),
:mod:`~splitlearn.stage.transport` (the wire: header, codecs, link rehearsal),
:mod:`~splitlearn.stage.executor` (the action list), :mod:`~splitlearn.stage.optim_step`
(reductions, clipping, the step), :mod:`~splitlearn.stage.timing` and
:mod:`~splitlearn.stage.checkpoint_io`. Life cycle, each step driven by one call from the driver:

1. ``prepare()``: build the model, cut this stage's segment, make its optimizer, and on the
   data-owning first stage read the data. User errors surface here, before any process
   group exists, so no peer is left waiting.
2. ``init_dist(addr, port)``: join the one ``torch.distributed`` world (one rank per stage
   replica) and create one group per link, so independent links never serialise; a group
   per replicated stage; DeepSpeed's engine for an offloaded stage.
3. ``run_step(step)``: execute this stage's actions for the step and report its metrics.
4. ``save_checkpoint(dir)`` / ``load_checkpoint(dir)``: tensors and optimizer state by name.

Replicas: a stage on R identical devices runs R workers; replica r takes the micro-batches m
with m % R == r (its action list is the stage's, filtered), and the replicas sum their
gradients in their group before the step (DeepSpeed does it for an offloaded stage).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.conf import to_typed
from cluster.topology import topology_from_container
from partitioners import schedule as S
from partitioners.plan import Plan
from splitlearn.errors import ConfigError, DataError
from splitlearn.optim import make_optimizer
from splitlearn.rss import PeakRSS
from splitlearn.stage.checkpoint_io import StageCheckpoint
from splitlearn.stage.executor import Executor
from splitlearn.stage.groups import Groups, RankLayout, build_groups, init_deepspeed, rendezvous_address
from splitlearn.stage.optim_step import OptimizerStep
from splitlearn.stage.transport import LinkClock, Transport


def _ray_node_id() -> str:
    """The Ray node this worker runs on (the host name when not under Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return socket.gethostname()


class StageWorker:
    def __init__(self, stage: int, run: dict[str, Any], plan: dict[str, Any], base_dir: str, replica: int = 0):
        from splitlearn.config import RunConfig

        self.stage, self.replica = stage, replica
        self.run = to_typed(RunConfig, run, prefix="", source="run config", error=ConfigError)
        self.topology = topology_from_container(self.run.topology.inline, "run config")
        self.plan = Plan.from_dict(plan)
        self.spec = self.plan.stages[stage]
        self.device_name = self.spec.devices[replica]
        self.layout = RankLayout(self.plan, self.topology)
        self.num_replicas = self.layout.replicas[stage]
        self.rank = self.layout.rank(stage, replica)
        self.offload = self.spec.offload
        self.device_cfg = self.topology.device(self.device_name)
        self.base_dir = Path(base_dir)
        self.num_stages = self.plan.num_stages
        self.num_micro_batches = self.plan.num_micro_batches
        self.is_first, self.is_last = stage == 0, stage == self.num_stages - 1
        # a link's codec is set on the stage it leaves from; gradients come back through it
        self.codec_out = self.spec.codec
        self.codec_in = self.plan.stages[stage - 1].codec if stage > 0 else "none"
        self.actions = S.replica_actions(self.plan.actions()[stage], replica, self.num_replicas)
        self.num_forwards = sum(a.kind == S.F for a in self.actions)  # this replica's micro-batches
        torch.set_num_threads(self.device_cfg.cpu_threads)
        self.device = torch.device(
            "cuda" if self.device_cfg.accelerator == "cuda" and torch.cuda.is_available() else "cpu"
        )
        clock = (
            LinkClock(self.topology, self.device_name, self.layout.device_of)
            if self.run.runtime.emulate_links
            else None
        )
        self.transport = Transport(self.device, clock)
        self.checkpoints = StageCheckpoint(self)
        self.segment: Any = None
        self.engine: Any = None  # DeepSpeed's, for an offloaded stage
        self.batches: Any = None
        self.eval_data: Any = None  # the data owner's eval rows (a TokenDataset), if any
        self.groups: Groups | None = None
        self.federated = self.run.federation.mode != "none" and self.num_stages > 1
        # sequential split learning: a client runs every micro-batch of the steps that are its turn
        self.sequential = self.federated and self.run.federation.mode == "sequential"
        if self.sequential and self.is_first:
            self.actions = list(self.plan.actions()[stage])
            self.num_forwards = sum(a.kind == S.F for a in self.actions)
        self.fed: Any = None  # FedAvg: a federated client's or the server's part
        self.steps_done = 0  # the steps this worker ran (sequential: who holds the newest front)

    # -- set-up ---------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        beside = self.base_dir / path
        return beside if beside.exists() or not path.exists() else path

    def prepare(self) -> dict[str, Any]:
        from splitlearn.method_policy import prepare_segment, stage_method
        from splitlearn.models.build import build_segment, meta_model, weights_dtype
        from splitlearn.models.chain import Segment
        from splitlearn.models.materialize import meta_tensor_names

        t_load = time.perf_counter()
        self._check_dtype()
        # only this segment's tensors are ever materialised (read from the checkpoint's files, or
        # random init with the whole model's values for this seed)
        meta = meta_model(self.run.model)  # built (and its modelling code imported) before the memory mark
        data_info = self._load_data(meta) if self.is_first else {}  # the owner checks its data first thing
        if stage_method(self.spec).method == "lora":
            import peft  # noqa: F401  (the library is runtime, not segment: imported before the mark)
        with PeakRSS() as rss:
            # straight to the device, tensor by tensor (DeepSpeed places an offloaded stage itself)
            where = self.device if self.offload == "none" else torch.device("cpu")
            model = build_segment(
                self.run.model,
                self.run.train.seed,
                self.spec.start,
                self.spec.stop,
                self.stage,
                dtype=weights_dtype(self.run.train.dtype),
                device=where,
                meta=meta,
            )
            self.segment = Segment(model, self.spec.start, self.spec.stop)
        left = meta_tensor_names(self.segment)
        assert not left, f"stage {self.stage}: not materialised: {left[:3]}"
        load = {
            "load_s": time.perf_counter() - t_load,
            "segment_bytes": sum(t.nbytes for t in [*self.segment.parameters(), *self.segment.buffers()]),
            "load_peak_rss_bytes": rss.above_bytes,  # the build's peak above the RSS before it
            "rss_base_bytes": rss.start_bytes,  # the runtime: interpreter, torch, transformers, Ray
        }
        self.rss_base = rss.start_bytes
        if self.device.type == "cuda" and self.offload == "none":
            index = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            if self.device_cfg.memory_gb * 1e9 < total:  # torch raises its OOM error past the device's budget
                torch.cuda.set_per_process_memory_fraction(self.device_cfg.memory_gb * 1e9 / total, index)
        if self.offload == "none":  # DeepSpeed places an offloaded stage itself
            self.segment.to(self.device)
        # the plan's method for this stage: LoRA adapters, frozen weights (compact), recompute
        self.adapted = prepare_segment(self.segment, self.plan, self.stage, self.run)
        self.segment.train()
        tied = self.segment.tied_parameters() if self.num_stages > 1 else {}
        self.tied = {k: p for k, p in tied.items() if p.requires_grad}  # both ends agree: see tied_trainable
        self._check_federated()
        mode = self.run.runtime.compile
        if mode == "blocks" or (mode == "auto" and self.device.type == "cuda"):
            self.segment.compile_blocks()
        if self.offload == "none":
            self.optimizer = make_optimizer(self.segment.parameters(), self.run.train)  # trainable ones only
        else:
            self._check_offload()
        info: dict[str, Any] = {
            "stage": self.stage,
            "device": self.device_name,
            "pid": os.getpid(),
            "node": _ray_node_id(),
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in self.segment.parameters()),
            "trainable_params": sum(p.numel() for p in self.segment.parameters() if p.requires_grad),
            "method": stage_method(self.spec).label,
            "replica": self.replica,
            "offload": self.offload,
            **load,
        }
        return {**info, **data_info}

    def _load_data(self, meta: Any) -> dict[str, Any]:
        """Read, tokenize and check the data (on the data owner), before the segment is built."""
        from splitlearn import federation
        from splitlearn.data import BatchSource, load_run_data

        if self.federated:  # a client reads only its own data, its share of the step's rows
            data_cfg, rows = federation.client_data(self.run, self.device_name), federation.rows_per_client(self.run)
        else:
            data_cfg, rows = self.run.data, self.run.train.batch_size
        data = load_run_data(data_cfg, self._resolve, self.run.train.seed)
        vocab = meta.config.vocab_size
        if data.tokenizer.vocab_size > vocab:
            raise DataError(
                f"model.config.vocab_size={vocab} is smaller than the tokenizer's "
                f"{data.tokenizer.vocab_size} tokens; raise model.config.vocab_size"
            )
        self.batches = BatchSource(data.train, rows, self.run.train.seed)
        self.eval_data = data.eval
        return {"rows": data.train.num_rows, "eval_rows": 0 if data.eval is None else data.eval.num_rows}

    def rendezvous_address(self) -> tuple[str, int]:
        """An address of this node and a free port on it, for the world's rendezvous."""
        return rendezvous_address()

    def _check_dtype(self) -> None:
        """The run's precision is one this device computes in (bf16 on a GPU needs compute
        capability 8.0 or later), checked before anything is built."""
        if self.run.train.dtype == "fp32" or self.device.type != "cuda":
            return
        if not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(self.device)
            raise ConfigError(
                f"device '{self.device_name}' ({name}) cannot compute in bf16, which train.dtype={self.run.train.dtype} "
                "needs: use train.dtype=fp32, or plan this stage on another device"
            )

    def _check_federated(self) -> None:
        """What a federated client or the server cannot do yet, before any process group exists."""
        if not self.federated or not (self.stage == 0 or self.replica == 0 and self.stage == 1):
            return
        if self.offload != "none":
            raise ConfigError(
                f"stage {self.stage} takes part in FedAvg and cannot be offloaded yet; offload a later stage"
            )
        if self.tied:
            raise ConfigError(
                "model.config.tie_word_embeddings: tied embeddings are not supported with federation yet; "
                "set model.config.tie_word_embeddings=false"
            )

    def _check_offload(self) -> None:
        """What an offloaded stage needs, checked before any process group exists."""
        from splitlearn import zero

        if self.tied:
            raise ConfigError(
                f"stage {self.stage} holds a weight tied to another stage ({', '.join(sorted(self.tied))}), whose "
                "gradients are summed across stages before the step; DeepSpeed reduces them itself, so this "
                "stage cannot be offloaded: offload another stage, or untie the embeddings"
            )
        zero.check_user_section(self.run.deepspeed, self.offload)
        zero.check_schedule(self.offload, self.actions, self.stage, self.plan.schedule)
        zero.ensure_ops(self.device_name, self.device.type == "cuda")

    def init_dist(self, addr: str, port: int) -> None:
        """Join the pipeline: standalone process groups on one store served by rank 0 (see
        :mod:`splitlearn.stage.fabric`), then, on an offloaded stage, torch's default group over
        the stage's replicas and DeepSpeed's engine on it."""
        timeout = datetime.timedelta(seconds=self.run.runtime.timeout_s)
        self.groups = build_groups(
            self.layout,
            self.stage,
            self.rank,
            self.num_micro_batches,
            addr,
            port,
            timeout,
            self.federated,
            self.sequential,
        )
        if self.federated and (self.stage == 0 or self.rank == self.layout.offsets[1]):
            from splitlearn.stage.fedavg import CLIENT, SERVER, FedAvg

            fed = self.run.federation
            self.fed = FedAvg(
                CLIENT if self.stage == 0 else SERVER,
                self.groups.fedavg,
                self.transport,
                self.layout.offsets[1],
                self.layout.stage_ranks(0),
                fed.rounds_every,
                self.run.train.steps,
                rank=self.rank,
                sequential=self.sequential,
            )
        if self.offload != "none":
            from splitlearn import zero

            self.engine = init_deepspeed(
                self.groups.store,
                self.segment,
                self.run,
                self.stage,
                self.replica,
                self.num_replicas,
                self.num_micro_batches,
                self.offload,
                self.device.type == "cuda",
                timeout,
            )
            self.optimizer = zero.inner_optimizer(self.engine)
        self.optimizer_step = OptimizerStep(
            self.optimizer,
            self.engine,
            self.tied,
            self.groups,
            self.replica,
            self.num_replicas,
            self.is_last,
            self.layout.world_size,
            self.run.train.max_grad_norm,
            self.fed,
        )
        self.executor = Executor(self)

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: int) -> dict[str, Any]:
        """Execute this stage's actions for ``step``; return its metrics, with the process's peak
        resident memory during the step (``rss_peak_bytes``) and, on a GPU, the peak allocated
        and reserved by torch. With ``runtime.measure_memory`` also the step's peak allocation
        above what was allocated when it began (torch's own accounting; see
        ``partitioners.profile.peak_allocated_bytes``)."""
        assert self.segment is not None and self.groups is not None, "prepare() and init_dist() first"
        t_in = time.perf_counter()
        out: dict[str, Any] = {}
        with PeakRSS() as rss:
            t_exec = time.perf_counter()
            if self.run.runtime.measure_memory:
                from partitioners.profile import peak_allocated_bytes

                out["peak_bytes"] = peak_allocated_bytes(lambda: out.update(self.executor.run(step)), self.device)
            else:
                out.update(self.executor.run(step))
            out["exec_s"] = time.perf_counter() - t_exec
        self.steps_done = step + 1
        out["rss_peak_bytes"], out["rss_base_bytes"] = rss.peak_bytes, self.rss_base
        if self.device.type == "cuda":
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        else:
            self._check_budget(step, rss.peak_bytes - self.rss_base)
        # the call's seconds in this worker: with ``exec_s`` (the actions, the batch and the
        # metrics), what the step costs here beyond its actions; the driver's step less this
        # is the call's way through Ray
        out["run_s"] = time.perf_counter() - t_in
        return out

    def run_eval(self, num_chunks: int) -> dict[str, Any]:
        """Forward-only eval of ``num_chunks`` micro-batches of eval rows (:mod:`splitlearn.stage.evaluate`)."""
        from splitlearn.stage.evaluate import evaluate

        assert self.groups is not None, "init_dist() first"
        return evaluate(self, num_chunks)

    def model_state(self) -> dict[str, Any]:
        """This stage's tensors of the fine-tuned model under the model's own names (LoRA
        merged in), and the names of its LoRA-adapted modules: what an export gathers."""
        from splitlearn.models.methods import merged_state_dict

        return {"stage": self.stage, "state": merged_state_dict(self.segment.model), "lora_modules": list(self.adapted)}

    def _check_budget(self, step: int, used: int) -> None:
        """A CPU stage's memory above the runtime's (the resident set before the segment was
        built) must fit its device's ``memory_gb``: a named error, not a silent overrun."""
        budget = self.device_cfg.memory_gb * 1e9
        if used > budget:
            from splitlearn.errors import MemoryBudgetError

            raise MemoryBudgetError(
                f"stage {self.stage} on '{self.device_name}' held {used / 1e9:.3f} GB at step {step} (resident "
                f"memory above the runtime's {self.rss_base / 1e9:.2f} GB), over the device's memory_gb="
                f"{self.device_cfg.memory_gb:g} (the plan predicted {self.spec.memory_gb:.3f} GB); give the "
                "device more memory_gb, or plan again with a method that holds less (lora, recompute)"
            )

    # -- results and checkpoints (:mod:`splitlearn.stage.checkpoint_io`) -------------------
    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients left by the last step (after the tied-weight sum and clipping). An
        offloaded stage has none here: DeepSpeed moved them to the host and stepped."""
        return {
            name: p.grad.detach().cpu().clone()
            for name, p in self.checkpoints.named_params().items()
            if p.grad is not None
        }

    def save_checkpoint(self, directory: str) -> dict[str, Any]:
        return self.checkpoints.save(directory)

    def check_checkpoint(self, directory: str, files: list[str]) -> int:
        """What :meth:`load_checkpoint` checks, changing nothing: the driver asks every stage
        before any loads, so a checkpoint is taken whole or not at all."""
        return self.checkpoints.check(directory, files)

    def load_checkpoint(self, directory: str, files: list[str]) -> int:
        return self.checkpoints.load(directory, files)

    def export(self, directory: str, merge: bool) -> dict[str, Any]:
        return self.checkpoints.export(directory, merge)

    def ping(self) -> int:
        """A liveness call (the driver's, after a failure), answered on the actor's second
        concurrency slot while a step runs or waits: this process's id."""
        return os.getpid()

    def close(self) -> None:
        if self.groups is not None:
            if dist.is_initialized():  # an offloaded stage's replica group
                dist.destroy_process_group()
            self.groups = None
