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
from splitlearn.errors import ConfigError, DataError, StageFailed
from splitlearn.optim import clip_coefficient, lr_at, make_optimizer, set_lr, sum_of_squares

log = logging.getLogger(__name__)

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool]
_HEADER_LEN = 8  # ndim, dtype code, has-mask flag, up to 5 dims


def _header(t: torch.Tensor, has_mask: bool) -> torch.Tensor:
    h = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2] = t.dim(), _DTYPES.index(t.dtype), int(has_mask)
    h[3 : 3 + t.dim()] = torch.tensor(t.shape)
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
        self.actions = S.build(self.run.runtime.schedule, self.num_stages, self.run.train.micro_batches)[stage]
        torch.set_num_threads(self.device_cfg.cpu_threads)
        self.device = torch.device(
            "cuda" if self.device_cfg.accelerator == "cuda" and torch.cuda.is_available() else "cpu"
        )
        self.segment = None
        self.batches = None
        self.world_ready = False
        self._pending: list = []  # (work, tensor) of sends posted this step

    # -- set-up ---------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        beside = self.base_dir / path
        return beside if beside.exists() or not path.exists() else path

    def prepare(self) -> dict[str, Any]:
        from splitlearn.data import BatchSource, load_dataset
        from splitlearn.models.chain import Segment, build_model

        torch.manual_seed(self.run.train.seed)
        model = build_model(self.run.model, self.run.train.seed)
        self.segment = Segment(model, self.spec.start, self.spec.stop).to(self.device)
        self.segment.train()
        self.optimizer = make_optimizer(self.segment.parameters(), self.run.train)
        self.tied = self.segment.tied_parameters() if self.num_stages > 1 else {}
        info: dict[str, Any] = {
            "stage": self.stage,
            "device": self.device_name,
            "pid": os.getpid(),
            "node": _ray_node_id(),
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in self.segment.parameters()),
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
        # Every rank creates every group, in the same order.
        self.link_groups = [dist.new_group([i, i + 1], timeout=timeout) for i in range(n - 1)]
        self.ends_group = (
            dist.new_group([0, n - 1], timeout=timeout) if n > 2 else (self.link_groups[0] if n == 2 else None)
        )
        self.world_ready = True

    # -- transfers ------------------------------------------------------------------------
    def _send(self, t: torch.Tensor, dst: int, group, mask: torch.Tensor | None = None) -> int:
        """Post the header, the tensor (and the padding mask) without waiting: the stage moves
        on, and the step waits for every posted send before it ends. Messages between two
        ranks arrive in the order they were posted."""
        t = t.detach().contiguous().cpu()
        parts = [_header(t, mask is not None), t]
        if mask is not None:
            parts.append(mask.contiguous().cpu())
        for part in parts:
            self._pending.append((dist.isend(part, dst, group=group), part))
        return _HEADER_LEN * 8 + sum(p.numel() * p.element_size() for p in parts[1:])

    def _wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _recv(self, src: int, group, mask_shape: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = torch.empty(_HEADER_LEN, dtype=torch.int64)
        dist.recv(h, src, group=group)
        ndim, code, has_mask = int(h[0]), int(h[1]), bool(h[2])
        shape = [int(x) for x in h[3 : 3 + ndim]]
        t = torch.empty(shape, dtype=_DTYPES[code])
        dist.recv(t, src, group=group)
        mask = None
        if has_mask:
            mask = torch.empty(shape[:2], dtype=torch.int64)
            dist.recv(mask, src, group=group)
        return t.to(self.device), (None if mask is None else mask.to(self.device))

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: int) -> dict[str, Any]:
        """Execute this stage's actions for ``step``; return its metrics."""
        assert self.segment is not None and self.world_ready, "prepare() and init_dist() first"
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
                    sent["next"] += self._send(outputs[m], self.stage + 1, next_group, masks[m])
                elif act.kind == S.RECV_GRAD:
                    grads_in[m], _ = self._recv(self.stage + 1, next_group)
                elif act.kind == S.B:
                    out = outputs.pop(m)
                    if self.is_last:
                        out.backward()
                    else:
                        out.backward(grads_in.pop(m))
                elif act.kind == S.SEND_GRAD:
                    x = inputs.pop(m)
                    sent["prev"] += self._send(x.grad, self.stage - 1, prev_group)
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
        """This segment's tensors under the model's own names, shared tensors once."""
        out, seen = {}, set()
        for name, t in self.segment.model.state_dict().items():
            key = (t.data_ptr(), t.shape)
            if key in seen:
                continue
            seen.add(key)
            out[name] = t.detach().cpu().contiguous().clone()
        return out

    def save(self, directory: str) -> dict[str, Any]:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        name = f"stage_{self.stage}.safetensors"
        tmp = d / f".{name}.tmp"
        state = self.state_dict()
        save_file(state, str(tmp), metadata={"stage": str(self.stage), "device": self.device_name})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / name)
        return {"stage": self.stage, "file": name, "tensors": len(state), "bytes": (d / name).stat().st_size}

    def close(self) -> None:
        if self.world_ready and dist.is_initialized():
            dist.destroy_process_group()
            self.world_ready = False
