"""Wire codecs: how an activation or gradient is packed for one link.

``none`` sends the tensor as it is; ``fp16`` and ``bf16`` halve fp32 bytes; ``int8`` sends
one signed byte per value plus one fp32 scale per row of the last dimension (symmetric,
absmax / 127, rounded to nearest), a quarter of fp32 bytes for wide rows. Decoding restores
the original dtype. Both directions of a link use its codec: activations forward and
gradients back.
"""

from __future__ import annotations

import torch

from partitioners.choices import CODECS


def encode(t: torch.Tensor, codec: str) -> list[torch.Tensor]:
    if codec == "none" or not t.is_floating_point():
        return [t]
    if codec == "fp16":
        return [t.to(torch.float16)]
    if codec == "bf16":
        return [t.to(torch.bfloat16)]
    if codec == "int8":
        x = t.float()
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return [q, scale.squeeze(-1).contiguous()]
    raise ValueError(f"unknown codec '{codec}' (known: {', '.join(CODECS)})")


def payload_like(
    shape: list[int], dtype: torch.dtype, codec: str, device: torch.device | str = "cpu", pin: bool = False
) -> list[torch.Tensor]:
    """Empty receive buffers, on ``device``, for what :func:`encode` sends for a tensor of
    this shape/dtype (allocated where the data lands: no copy of an empty host buffer);
    ``pin``: in pinned host memory (bound for a GPU)."""

    def empty(s: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.empty(s, dtype=dt, device=device, pin_memory=pin)

    if codec == "none" or not dtype.is_floating_point:
        return [empty(shape, dtype)]
    if codec == "fp16":
        return [empty(shape, torch.float16)]
    if codec == "bf16":
        return [empty(shape, torch.bfloat16)]
    if codec == "int8":
        return [empty(shape, torch.int8), empty(shape[:-1], torch.float32)]
    raise ValueError(f"unknown codec '{codec}' (known: {', '.join(CODECS)})")


def decode(parts: list[torch.Tensor], dtype: torch.dtype, codec: str) -> torch.Tensor:
    if codec == "int8" and dtype.is_floating_point:
        q, scale = parts
        return (q.float() * scale.unsqueeze(-1)).to(dtype)
    return parts[0].to(dtype)


def wire_bytes(parts: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)
