"""``splitlearn profile``: build the run's model, measure each chain layer of it on this
machine (every fine-tuning method the run may use) and print the tables. The profile data
type and the model-agnostic measuring are :mod:`partitioners.profile`."""

from __future__ import annotations

import torch

from cluster.tables import render_table
from cluster.topology import Device
from partitioners.costmodel import StageMethod, stage_memory, stage_time
from partitioners.profile import ModelProfile, calibrate_tflops, profile_chain
from splitlearn import method_policy
from splitlearn.config import LoadedConfig
from splitlearn.errors import ConfigError
from splitlearn.models.build import build_model, weights_dtype
from splitlearn.models.chain import chain_names, hf_config, layer_views, num_blocks
from splitlearn.models.costs import layer_compact_counts, method_costs


def parse_layers(spec: str | None, num_layers: int) -> range:
    """``a:b`` (Python slice of chain indices, either end optional) -> range; checked."""
    if not spec:
        return range(num_layers)
    try:
        a, _, b = spec.partition(":")
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else num_layers
        if not _:
            stop = start + 1
    except ValueError:
        raise ConfigError(f"--layers: '{spec}' is not a range like 0:4") from None
    if not (0 <= start < stop <= num_layers):
        raise ConfigError(
            f"--layers: {spec} is outside the model's chain of {num_layers} layers (valid: 0:{num_layers})"
        )
    return range(start, stop)


def profile_model(
    cfg: LoadedConfig,
    *,
    layers: str | None = None,
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    calibrate: bool = False,
    threads: int | None = None,
) -> tuple[ModelProfile, range]:
    run = cfg.run
    mb = run.train.batch_size // run.train.micro_batches
    seq = run.data.seq_len
    if threads:
        torch.set_num_threads(threads)
    wdtype = weights_dtype(run.train.dtype)  # bf16-master/pure: measured with bf16 weights
    model = build_model(run.model, run.train.seed).to(device=device, dtype=wdtype)
    model.train()
    n = num_blocks(model) + 2
    span = parse_layers(layers, n)
    vocab = hf_config(model).vocab_size
    g = torch.Generator().manual_seed(run.train.seed)
    ids = torch.randint(0, vocab, (mb, seq), generator=g).to(device)
    views = layer_views(model, None, ids)
    names = chain_names(n - 2)
    # Run the layers before the range too (untimed) so the first profiled layer sees a real input.
    x = ids
    with torch.no_grad():
        for i in range(span.start):
            x = views[i](x)
    autocast = torch.bfloat16 if run.train.dtype == "bf16" else None
    profs = profile_chain(
        [views[i] for i in span],
        x,
        [names[i] for i in span],
        warmup=warmup,
        repeats=repeats,
        autocast_dtype=autocast,
    )
    # the other fine-tuning methods this run may use (finetune section, plan.allow): each
    # measured the same way on a fresh model with the method applied to the whole chain
    variants = method_policy.variants(run)
    if variants:
        counts = layer_compact_counts(model)
        for layer, i in zip(profs, span, strict=True):
            layer.compact_params, layer.compact_rows = counts[i]
        del views, model
        for v in variants:
            fresh = build_model(run.model, run.train.seed).to(device=device, dtype=wdtype)
            costs = method_costs(
                fresh,
                v,
                method_policy.lora_spec(run),
                run.train.seed,
                ids,
                span,
                warmup=warmup,
                repeats=repeats,
                autocast_dtype=autocast,
            )
            for layer, cost in zip(profs, costs, strict=True):
                layer.methods[v.key] = cost
            del fresh
    prof = ModelProfile(
        layers=profs,
        micro_batch=mb,
        seq_len=seq,
        dtype=run.train.dtype,
        device=device,
        threads=torch.get_num_threads(),
        calibrated_tflops=calibrate_tflops(device) if calibrate else None,
        lora=method_policy.lora_record(run) if variants else None,
    )
    return prof, span


def _fmt_count(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def profile_table(prof: ModelProfile, span: range) -> str:
    """The profiled layers, one row each, and their total (see :mod:`cluster.tables`), then
    the profile's settings and :func:`methods_table`."""
    head = ("idx", "layer", "params", "fwd FLOPs", "bwd FLOPs", "cut MB", "saved MB", "train MB", "fwd ms", "bwd ms")
    rows: list[tuple[str, ...]] = []
    for i, layer in zip(span, prof.layers, strict=True):
        mem = stage_memory([layer], precision=prof.dtype)
        rows.append(
            (
                str(i),
                layer.name,
                _fmt_count(layer.params),
                _fmt_count(layer.fwd_flops),
                _fmt_count(layer.bwd_flops),
                f"{layer.out_bytes / 1e6:.3f}",
                f"{layer.saved_bytes / 1e6:.3f}",
                f"{mem.device_total / 1e6:.3f}",
                f"{layer.fwd_ms:.3f}",
                f"{layer.bwd_ms:.3f}",
            )
        )
    t = prof.totals()
    tot_mem = stage_memory(prof.layers, precision=prof.dtype)
    total = (
        "",
        "total",
        _fmt_count(t["params"]),
        _fmt_count(t["fwd_flops"]),
        _fmt_count(t["bwd_flops"]),
        "",
        f"{t['saved_bytes'] / 1e6:.3f}",
        f"{tot_mem.device_total / 1e6:.3f}",
        f"{t['fwd_ms']:.3f}",
        f"{t['bwd_ms']:.3f}",
    )
    table = render_table(head, rows, numeric=[h for h in head if h != "layer"], total=total)
    foot = (
        f"micro_batch={prof.micro_batch} seq_len={prof.seq_len} dtype={prof.dtype} device={prof.device} "
        f"threads={prof.threads}"
    )
    if prof.calibrated_tflops:
        foot += f" calibrated={prof.calibrated_tflops * 1e3:.1f} GFLOP/s"
    foot += "\ncut MB: activation crossing a cut after the layer; saved MB: held for backward (one micro-batch);"
    foot += "\ntrain MB: weights + gradients + AdamW state + saved activations of one micro-batch"
    return "\n".join([table, foot, "", methods_table(prof)])


HERE = Device(name="here", memory_gb=1.0, tflops=1.0)  # the profiling machine, at scale 1


def methods_table(prof: ModelProfile) -> str:
    """Each fine-tuning method the profile costs (and each with recompute), over the
    profiled layers as one stage running one micro-batch: what trains, and its memory."""
    keys = ["full", *dict.fromkeys(k for layer in prof.layers for k in layer.methods)]
    head = ("method", "trainable", "weights MB", "grads+opt MB", "saved MB", "train MB", "fwd ms", "bwd ms")
    rows: list[tuple[str, ...]] = []
    for key in keys:
        for rc in (False, True):
            m = StageMethod.parse(key)
            m = StageMethod(m.method, rc, m.frozen_dtype)
            mem = stage_memory(prof.layers, precision=prof.dtype, method=m)
            # times on this machine: the measured medians (scale 1); recompute adds a forward
            t = stage_time(prof.layers, HERE, 1.0, method=m)
            trainable = sum(
                (layer.methods[key].trainable_params if key != "full" else layer.trainable) for layer in prof.layers
            )
            rows.append(
                (
                    m.label,
                    _fmt_count(trainable),
                    f"{mem.weights / 1e6:.3f}",
                    f"{(mem.grads + mem.optimizer) / 1e6:.3f}",
                    f"{mem.activations / 1e6:.3f}",
                    f"{mem.device_total / 1e6:.3f}",
                    f"{t.fwd_ms:.3f}",
                    f"{t.bwd_ms:.3f}",
                )
            )
    table = render_table(head, rows, numeric=head[1:])
    foot = "methods over these layers as one stage, one micro-batch: full | frozen | lora, +bf16/fp16/int8 frozen"
    foot += " weights, +rc recompute (saved MB: inputs held + one layer's activations)"
    return "\n".join([table, foot])
