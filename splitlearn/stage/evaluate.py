"""Forward-only eval through the same pipeline: no backward, no optimizer, no gradients kept.

The data owner cuts its eval rows into chunks of one micro-batch each (the memory the plan
sized every stage for); each chunk goes through the first replica of every stage over the
same links and codecs as training, and the loss stage sums the loss over the label tokens.
Dropout is off for the pass (each module's own mode is restored after it).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from splitlearn.models.chain import count_items

if TYPE_CHECKING:
    from splitlearn.stage.worker import StageWorker


def _chunk_in(w: StageWorker, c: int, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """This stage's input for chunk ``c``: the rows on the data owner, else from the previous
    stage; and the labels on the loss stage."""
    assert w.groups is not None
    labels = None
    if w.is_first:
        assert w.eval_data is not None, "the eval rows are read in prepare()"
        b = w.eval_data.rows(c * rows, (c + 1) * rows)
        x, mask, labels = b["input_ids"].to(w.device), b["attention_mask"], b["labels"]
        mask = None if mask is None else mask.to(w.device)
        if not w.is_last:
            w.transport.send(labels, w.layout.rank_of(w.num_stages - 1, 0), w.groups.ends)
    else:
        src = w.layout.rank_of(w.stage - 1, 0)
        x, mask = w.transport.recv(src, w.groups.link(w.rank, src))
        if w.is_last:
            labels, _ = w.transport.recv(0, w.groups.ends)
    return x, mask, labels


def evaluate(w: StageWorker, num_chunks: int) -> dict[str, Any]:
    """Run ``num_chunks`` eval chunks through this stage; the loss stage returns the summed
    loss and the number of label tokens."""
    out: dict[str, Any] = {"stage": w.stage, "replica": w.replica, "loss_sum": None, "tokens": None}
    if w.replica > 0:  # the first replica of each stage carries the eval
        return out
    groups = w.groups
    assert groups is not None, "init_dist() first"
    rows = w.run.train.batch_size // w.num_micro_batches
    modes = [(m, m.training) for m in w.segment.modules()]
    w.segment.eval()
    bf16 = w.run.train.dtype == "bf16"
    loss_sum, tokens = 0.0, 0
    try:
        with torch.no_grad(), torch.autocast(w.device.type, torch.bfloat16) if bf16 else nullcontext():
            fwd = w.engine if w.engine is not None else w.segment
            for c in range(num_chunks):
                x, mask, labels = _chunk_in(w, c, rows)
                if w.is_last:
                    assert labels is not None
                    n = count_items(labels)
                    loss = fwd(x, mask, labels.to(w.device), n if n else None)
                    if n:
                        loss_sum, tokens = loss_sum + float(loss) * n, tokens + n
                else:
                    dst = w.layout.rank_of(w.stage + 1, 0)
                    w.transport.send(fwd(x, mask, None, None), dst, groups.link(w.rank, dst), w.codec_out, mask)
            w.transport.wait_sends()
    finally:
        for m, mode in modes:
            m.train(mode)
    if w.is_last:
        out.update(loss_sum=loss_sum, tokens=tokens)
    return out
