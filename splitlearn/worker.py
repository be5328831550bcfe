"""The stage worker: one segment of the model on one device, run by its action list.

A plain class, unit-testable without Ray; :mod:`splitlearn.runtime` wraps it with
``ray.remote`` when it places it. Life cycle, each step driven by one call from the driver:

1. ``prepare()``: build the model, cut this stage's segment, make its optimizer, and on the
   data-owning first stage read the data. User errors surface here, before any process
   group exists, so no peer is left waiting.
2. ``init_dist(addr, port)``: join the one ``torch.distributed`` world (rank = stage) and
   create one group per link, so independent links never serialise.
3. ``run_step(step)``: execute this stage's actions for the step and report its metrics.
4. ``save(dir)``: write the segment's weights as safetensors.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.conf import to_typed
from cluster.topology import topology_from_container
from partitioners import schedule as S
from partitioners.plan import Plan
from splitlearn import codecs
from splitlearn.errors import ConfigError, DataError, StageFailed
from splitlearn.optim import clip_coefficient, lr_at, make_optimizer, set_lr, sum_of_squares

log = logging.getLogger(__name__)

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]
_CODECS = list(codecs.CODECS)
_HEADER_LEN = 10  # ndim, dtype, has-mask flag, codec, up to 5 dims, arrival time (ns, 0 = now)


def _header(t: torch.Tensor, has_mask: bool, codec: int = 0, arrival_ns: int = 0) -> torch.Tensor:
    h = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2], h[3] = t.dim(), _DTYPES.index(t.dtype), int(has_mask), codec
    h[4 : 4 + t.dim()] = torch.tensor(t.shape)
    h[_HEADER_LEN - 1] = arrival_ns
    return h


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
    def __init__(self, stage: int, run: dict[str, Any], plan: dict[str, Any], base_dir: str):
        from splitlearn.config import RunConfig

        self.stage = stage
        self.run = to_typed(RunConfig, run, prefix="", source="run config", error=ConfigError)
        self.topology = topology_from_container(self.run.topology.inline, "run config")
        self.plan = Plan.from_dict(plan)
        self.spec = self.plan.stages[stage]
        self.device_name = self.spec.device
        self.device_cfg = self.topology.device(self.device_name)
        self.base_dir = Path(base_dir)
        self.num_stages = self.plan.num_stages
        self.is_first, self.is_last = stage == 0, stage == self.num_stages - 1
        # a link's codec is set on the stage it leaves from; gradients come back through it
        self.codec_out = self.spec.codec
        self.codec_in = self.plan.stages[stage - 1].codec if stage > 0 else "none"
        self.actions = S.build(self.run.runtime.schedule, self.num_stages, self.run.train.micro_batches)[stage]
        torch.set_num_threads(self.device_cfg.cpu_threads)
        self.device = torch.device(
            "cuda" if self.device_cfg.accelerator == "cuda" and torch.cuda.is_available() else "cpu"
        )
        self.segment = None
        self.batches = None
        self.world_ready = False
        self._pending: list = []  # (work, tensor) of sends posted this step
        self._link_free_ns: dict[int, int] = {}  # link rehearsal: when each outgoing wire is free

    # -- set-up ---------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        beside = self.base_dir / path
        return beside if beside.exists() or not path.exists() else path

    def prepare(self) -> dict[str, Any]:
        from splitlearn.data import BatchSource, load_dataset
        from splitlearn.finetune import prepare_segment, stage_method
        from splitlearn.models.chain import Segment, build_model

        torch.manual_seed(self.run.train.seed)
        model = build_model(self.run.model, self.run.train.seed)
        self.segment = Segment(model, self.spec.start, self.spec.stop).to(self.device)
        # the plan's method for this stage: LoRA adapters, frozen weights (compact), recompute
        self.adapted = prepare_segment(self.segment, self.plan, self.stage, self.run)
        self.segment.train()
        self.optimizer = make_optimizer(self.segment.parameters(), self.run.train)  # trainable ones only
        tied = self.segment.tied_parameters() if self.num_stages > 1 else {}
        self.tied = {k: p for k, p in tied.items() if p.requires_grad}  # both ends agree: see tied_trainable
        info: dict[str, Any] = {
            "stage": self.stage,
            "device": self.device_name,
            "pid": os.getpid(),
            "node": _ray_node_id(),
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in self.segment.parameters()),
            "trainable_params": sum(p.numel() for p in self.segment.parameters() if p.requires_grad),
            "method": stage_method(self.spec).label,
        }
        if self.is_first:
            dataset, tokenizer = load_dataset(self.run.data, self._resolve)
            vocab = model.config.vocab_size
            if tokenizer.vocab_size > vocab:
                raise DataError(
                    f"model.config.vocab_size={vocab} is smaller than the tokenizer's "
                    f"{tokenizer.vocab_size} tokens; raise model.config.vocab_size"
                )
            self.batches = BatchSource(dataset, self.run.train.batch_size, self.run.train.seed)
            info["rows"] = dataset.num_rows
        return info

    def rendezvous_address(self) -> tuple[str, int]:
        """An address of this node and a free port on it, for the world's rendezvous."""
        try:
            import ray

            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_dist(self, addr: str, port: int) -> None:
        timeout = datetime.timedelta(seconds=self.run.runtime.timeout_s)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{addr}:{port}",
            rank=self.stage,
            world_size=self.num_stages,
            timeout=timeout,
        )
        n = self.num_stages
        # Every rank creates every group, in the same order: one per link, NCCL when both
        # ends are CUDA stages (tensors stay on the GPUs), gloo through host memory otherwise.
        self.link_backends = [
            "nccl" if self._is_cuda_stage(i) and self._is_cuda_stage(i + 1) else "gloo" for i in range(n - 1)
        ]
        self.link_groups = [
            dist.new_group([i, i + 1], timeout=timeout, backend=self.link_backends[i]) for i in range(n - 1)
        ]
        self.ends_group = dist.new_group([0, n - 1], timeout=timeout) if n > 1 else None
        self.world_ready = True

    def _is_cuda_stage(self, stage: int) -> bool:
        dev = self.topology.device(self.plan.stages[stage].device)
        return dev.accelerator == "cuda" and torch.cuda.is_available()

    # -- transfers ------------------------------------------------------------------------
    def _arrival_ns(self, peer: int, nbytes: int) -> int:
        """With ``runtime.emulate_links``: when a transfer posted now to ``peer`` would arrive
        on the real link. One transfer at a time per direction; latency overlaps the next."""
        if not self.run.runtime.emulate_links:
            return 0
        src, dst = self.device_name, self.plan.stages[peer].device
        link = self.topology.link(src, dst)
        if link.bandwidth_mbps == float("inf"):
            return 0
        now = time.time_ns()
        start = max(now, self._link_free_ns.get(peer, 0))
        wire_ns = int(nbytes * 8 / (link.bandwidth_mbps * 1e6) * 1e9)
        self._link_free_ns[peer] = start + wire_ns
        return start + wire_ns + int(link.latency_ms * 1e6)

    def _send(self, t: torch.Tensor, dst: int, group, codec: str = "none", mask: torch.Tensor | None = None) -> int:
        """Post the header, the encoded tensor (and the padding mask) without waiting: the
        stage moves on, and the step waits for every posted send before it ends. Messages
        between two ranks arrive in the order they were posted. Returns the bytes sent."""
        gpu = self._on_gpu(group)
        t = t.detach().contiguous()
        parts = codecs.encode(t if gpu else t.cpu(), codec)
        if mask is not None:
            parts.append(mask.contiguous() if gpu else mask.contiguous().cpu())
        nbytes = _HEADER_LEN * 8 + codecs.wire_bytes(parts)
        header = _header(t, mask is not None, _CODECS.index(codec), self._arrival_ns(dst, nbytes))
        for part in [header.to(t.device) if gpu else header, *parts]:
            self._pending.append((dist.isend(part, dst, group=group), part))
        return nbytes

    def _on_gpu(self, group) -> bool:
        return self.device.type == "cuda" and any(
            g is group and b == "nccl" for g, b in zip(self.link_groups, self.link_backends, strict=True)
        )

    def _wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _recv(self, src: int, group) -> tuple[torch.Tensor, torch.Tensor | None]:
        gpu = self._on_gpu(group)
        where = self.device if gpu else torch.device("cpu")
        h = torch.empty(_HEADER_LEN, dtype=torch.int64, device=where)
        dist.recv(h, src, group=group)
        h = h.cpu()
        ndim, code, has_mask, codec = int(h[0]), int(h[1]), bool(h[2]), _CODECS[int(h[3])]
        shape = [int(x) for x in h[4 : 4 + ndim]]
        dtype = _DTYPES[code]
        parts = [p.to(where) for p in codecs.payload_like(shape, dtype, codec)]
        for part in parts:
            dist.recv(part, src, group=group)
        mask = None
        if has_mask:
            mask = torch.empty(shape[:2], dtype=torch.int64, device=where)
            dist.recv(mask, src, group=group)
        arrival = int(h[_HEADER_LEN - 1])
        if arrival:  # link rehearsal: the transfer is not here before the real link would deliver it
            wait = (arrival - time.time_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
        t = codecs.decode(parts, dtype, codec).to(self.device)
        return t, (None if mask is None else mask.to(self.device))

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: int) -> dict[str, Any]:
        """Execute this stage's actions for ``step``; return its metrics. With
        ``runtime.measure_memory`` also the step's peak allocation above what was allocated
        when it began (torch's own accounting; see ``partitioners.profile.peak_allocated_bytes``)."""
        assert self.segment is not None and self.world_ready, "prepare() and init_dist() first"
        if not self.run.runtime.measure_memory:
            return self._run_step(step)
        from partitioners.profile import peak_allocated_bytes

        out: dict[str, Any] = {}
        peak = peak_allocated_bytes(lambda: out.update(self._run_step(step)), self.device)
        out["peak_bytes"] = peak
        return out

    def _run_step(self, step: int) -> dict[str, Any]:
        mbs = self.run.train.micro_batches
        rows = self.run.train.batch_size // mbs
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.run.train.dtype == "bf16" else nullcontext()
        )
        batch = self.batches.batch(step) if self.is_first else None
        labels_all = batch["labels"] if batch is not None else None
        num_items = None
        inputs: dict[int, Any] = {}
        outputs: dict[int, torch.Tensor] = {}
        masks: dict[int, torch.Tensor | None] = {}
        grads_in: dict[int, torch.Tensor] = {}
        compute_s = comm_s = 0.0
        sent = {"next": 0, "prev": 0, "labels": 0}
        loss_total = 0.0
        next_group = self.link_groups[self.stage] if not self.is_last else None
        prev_group = self.link_groups[self.stage - 1] if not self.is_first else None
        set_lr(self.optimizer, lr_at(step, self.run.train))
        self.optimizer.zero_grad(set_to_none=False)  # gradients persist: steady memory
        grad_norm = 0.0
        for i, act in enumerate(self.actions):
            t0 = time.perf_counter()
            try:
                m = act.mb
                if act.kind == S.SEND_LABELS:
                    sent["labels"] += self._send(labels_all, self.num_stages - 1, self.ends_group)
                elif act.kind == S.RECV_LABELS:
                    labels_all, _ = self._recv(0, self.ends_group)
                elif act.kind == S.RECV_ACT:
                    x, mask = self._recv(self.stage - 1, prev_group)
                    inputs[m] = x.requires_grad_(True)
                    masks[m] = mask
                elif act.kind == S.F:
                    if self.is_first:
                        sl = slice(m * rows, (m + 1) * rows)
                        inputs[m] = batch["input_ids"][sl].to(self.device)
                        bm = batch["attention_mask"]
                        masks[m] = None if bm is None else bm[sl].to(self.device)
                    lab = None
                    if self.is_last:
                        from splitlearn.models.chain import count_items

                        if num_items is None:
                            num_items = count_items(labels_all)
                        lab = labels_all[m * rows : (m + 1) * rows].to(self.device)
                    with autocast:
                        outputs[m] = self.segment(inputs[m], masks[m], lab, num_items)
                    if self.is_last:
                        loss_total += float(outputs[m].detach())
                elif act.kind == S.SEND_ACT:
                    sent["next"] += self._send(outputs[m], self.stage + 1, next_group, self.codec_out, masks[m])
                elif act.kind == S.RECV_GRAD:
                    grads_in[m], _ = self._recv(self.stage + 1, next_group)
                elif act.kind == S.B:
                    out = outputs.pop(m)
                    grad = None if self.is_last else grads_in.pop(m)
                    if out.requires_grad:  # a frozen first stage has nothing to differentiate
                        out.backward(grad)
                elif act.kind == S.SEND_GRAD:
                    x = inputs.pop(m)
                    sent["prev"] += self._send(x.grad, self.stage - 1, prev_group, self.codec_in)
                elif act.kind == S.STEP:
                    self._wait_sends()
                    grad_norm = self._optimizer_step()
                else:  # pragma: no cover - validated schedules hold only known kinds
                    raise AssertionError(f"unknown action {act}")
            except Exception as e:
                grid = " ".join(str(a) for a in self.actions)
                log.error("stage %d actions: %s  <-- ERROR HERE at %s (#%d)", self.stage, grid, act, i)
                raise StageFailed(self.stage, self.device_name, step, str(act), f"{type(e).__name__}: {e}") from e
            dt = time.perf_counter() - t0
            if act.kind in (S.F, S.B, S.STEP):
                compute_s += dt
            else:
                comm_s += dt
        links = {}
        if not self.is_last:
            links[f"{self.stage}->{self.stage + 1}"] = sent["next"]
        if not self.is_first:
            links[f"{self.stage}->{self.stage - 1}"] = sent["prev"]
        if sent["labels"]:
            links[f"0->{self.num_stages - 1} (labels)"] = sent["labels"]
        return {
            "stage": self.stage,
            "device": self.device_name,
            "compute_s": compute_s,
            "comm_s": comm_s,
            "bytes_sent": links,
            "loss": loss_total if self.is_last else None,
            "grad_norm": grad_norm,
            "tokens": int(batch["input_ids"].numel()) if batch is not None else None,
        }

    def _optimizer_step(self) -> float:
        """Sum the gradients of tied embed/head copies, clip by the global norm, step."""
        if self.tied:
            for p in self.tied.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if p.grad.is_cuda:  # the ends group is gloo: reduce through host memory
                    host = p.grad.cpu()
                    dist.all_reduce(host, group=self.ends_group)
                    p.grad.copy_(host)
                else:
                    dist.all_reduce(p.grad, group=self.ends_group)
        params = [p for p in self.segment.parameters() if p.grad is not None]
        # Count a tied weight once (on the first stage), as the unsplit model does.
        skip = {id(p) for p in self.tied.values()} if (self.is_last and self.tied) else set()
        local = sum_of_squares(p.grad for p in params if id(p) not in skip)
        if self.num_stages > 1:
            dist.all_reduce(local)
        norm = float(local.sqrt())
        coef = clip_coefficient(norm, self.run.train.max_grad_norm)
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
        self.optimizer.step()
        return norm

    # -- results --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This segment's tensors under the model's own names, shared tensors once; LoRA
        adapters under peft's names (``base_model.model.<module>.lora_A.weight``)."""
        from splitlearn.models.finetune import checkpoint_tensors

        return checkpoint_tensors(self.segment.model)

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients left by the last step (after the tied-weight sum and clipping)."""
        from splitlearn.models.finetune import checkpoint_params

        return {
            name: p.grad.detach().cpu().clone()
            for name, p in checkpoint_params(self.segment.model).items()
            if p.grad is not None
        }

    # -- checkpoints ----------------------------------------------------------------------
    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        """Parameters by checkpoint name (model's own names; LoRA adapters by peft's names;
        compactly stored frozen weights left out: they are rebuilt from the model's source)."""
        from splitlearn.models.finetune import checkpoint_params

        return checkpoint_params(self.segment.model)

    def save_checkpoint(self, directory: str) -> dict[str, Any]:
        """Write this stage's tensors and its optimizer and RNG state, by parameter name, each
        file atomically; return the files with their sizes and SHA-256 for the manifest."""
        from safetensors.torch import save_file

        from splitlearn.checkpoint import sha256

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        optim: dict[str, torch.Tensor] = {}
        for name, p in self._named_params().items():
            for key, value in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    optim[f"optim/{name}/{key}"] = value.detach().cpu().contiguous().clone()
        optim["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            optim["rng/cuda"] = torch.cuda.get_rng_state()
        files = []
        for name, tensors in (
            (f"stage_{self.stage}.safetensors", self.state_dict()),
            (f"stage_{self.stage}.optim.safetensors", optim),
        ):
            tmp = d / f".{name}.tmp"
            save_file(tensors, str(tmp), metadata={"stage": str(self.stage), "device": self.device_name})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, d / name)
            files.append({"name": name, "bytes": (d / name).stat().st_size, "sha256": sha256(d / name)})
        return {"stage": self.stage, "device": self.device_name, "files": files}

    def load_checkpoint(self, directory: str, files: list[str]) -> int:
        """Load this stage's parameters and optimizer state by name from a checkpoint written
        by any plan. A name missing from every file or a shape that differs is a
        CheckpointError naming the file."""
        from safetensors import safe_open

        from splitlearn.checkpoint import CheckpointError

        d = Path(directory)
        params = self._named_params()
        want = set(params) | {f"optim/{n}" for n in params}
        found: dict[str, tuple[Path, str]] = {}
        for fname in files:
            path = d / fname
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        base = key if not key.startswith("optim/") else "optim/" + key[6:].rsplit("/", 1)[0]
                        if base in want or key.startswith("rng/"):
                            found.setdefault(key, (path, key))
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
        missing = [n for n in params if n not in found]
        if missing:
            raise CheckpointError(f"{d}: no tensor for {missing[0]} (and {len(missing) - 1} more) in any shard")
        opened: dict[Path, Any] = {}
        try:

            def get(key: str) -> torch.Tensor:
                path, k = found[key]
                if path not in opened:
                    opened[path] = safe_open(str(path), framework="pt").__enter__()
                return opened[path].get_tensor(k)

            with torch.no_grad():
                for name, p in params.items():
                    t = get(name)
                    if t.shape != p.shape:
                        raise CheckpointError(
                            f"{found[name][0]}: {name} has shape {tuple(t.shape)}, the plan's model has {tuple(p.shape)}"
                        )
                    p.copy_(t)
                    state = {}
                    for key in [k for k in found if k.startswith(f"optim/{name}/")]:
                        state[key.rsplit("/", 1)[1]] = get(key).to(p.device)
                    if state:
                        self.optimizer.state[p] = state
            if "rng/torch" in found:
                torch.set_rng_state(get("rng/torch"))
            if "rng/cuda" in found and self.device.type == "cuda":
                torch.cuda.set_rng_state(get("rng/cuda"))
        finally:
            for handle in opened.values():
                handle.__exit__(None, None, None)
        return len(params)

    def export(self, directory: str, merge: bool) -> dict[str, Any]:
        """The stage's LoRA adapters (peft's names, returned: they are small) and, with
        ``merge``, its shard of the merged model written to ``directory`` as
        ``model-<i>-of-<n>.safetensors`` (LoRA deltas added to the base weights)."""
        from safetensors.torch import save_file

        from splitlearn.models.finetune import adapter_state_dict, merged_state_dict

        out: dict[str, Any] = {
            "stage": self.stage,
            "lora_modules": list(self.adapted),
            "adapter": adapter_state_dict(self.segment.model),
        }
        if merge:
            d = Path(directory)
            d.mkdir(parents=True, exist_ok=True)
            state = merged_state_dict(self.segment.model)
            name = f"model-{self.stage + 1:05d}-of-{self.num_stages:05d}.safetensors"
            tmp = d / f".{name}.tmp"
            save_file(state, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, d / name)
            out.update(merged_file=name, merged_keys=sorted(state), merged_bytes=(d / name).stat().st_size)
        return out

    def close(self) -> None:
        if self.world_ready and dist.is_initialized():
            dist.destroy_process_group()
            self.world_ready = False
