"""The benchmarked layers: shapes from SDXL and Anima at 1024² training, with the adapter settings people train."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One adapted layer: a Linear over ``tokens`` rows or a kxk Conv2d over a ``side``² feature map."""

    name: str
    source: str
    algo: str  # "loha" or "lokr"
    in_features: int
    out_features: int
    rank: int
    tokens: int = 0
    kernel: int = 0  # 0: Linear; k: k x k conv, padding k // 2
    side: int = 0
    batch: int = 1
    alpha: float | None = None  # None: alpha = rank
    factor: int = -1
    tucker: bool = False
    dtype: str = "float32"

    @property
    def is_conv(self) -> bool:
        return self.kernel > 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.batch, self.in_features, self.side, self.side)
        return (self.batch, self.tokens, self.in_features)

    def as_dict(self) -> dict:
        return asdict(self)


# The three rows of the issue's table (the peers' ratios there were measured on this 2-core CPU).
HEADLINE = [
    Case("loha-lin1280-r16", "SDXL attn 1280, 32² latent ×2 batch", "loha", 1280, 1280, 16, tokens=2048),
    Case("lokr-lin1280x5120-f8", "SDXL ff 1280→5120, 32² latent", "lokr", 1280, 5120, 16, tokens=1024, factor=8),
    Case(
        "loha-conv320-32-tucker",
        "SDXL ResNet conv 320ch, 32² map",
        "loha",
        320,
        320,
        16,
        kernel=3,
        side=32,
        tucker=True,
    ),
]

FULL = HEADLINE + [
    # SDXL attention at 64² (4096 tokens, 640 wide) and the LyCORIS "large factor, full dimension" LoKr
    Case("loha-lin640-r4", "SDXL attn 640, 64² latent", "loha", 640, 640, 4, tokens=4096),
    Case("lokr-lin640-f-1-r8", "SDXL attn 640, 64² latent", "lokr", 640, 640, 8, tokens=4096),
    Case(
        "lokr-lin1280x5120-f8-full",
        "SDXL ff 1280→5120, full-matrix LoKr",
        "lokr",
        1280,
        5120,
        100000,
        tokens=1024,
        factor=8,
    ),
    Case("lokr-lin1280-f4-r64", "SDXL attn 1280, 32² latent", "lokr", 1280, 1280, 64, tokens=1024, factor=4),
    # cross-attention k/v: 77 text tokens (2048-wide) per sample, batch 4
    Case(
        "loha-lin2048x1280-r32",
        "SDXL cross-attn k/v 2048→1280, 77 tokens ×4",
        "loha",
        2048,
        1280,
        32,
        tokens=77,
        batch=4,
    ),
    Case(
        "lokr-lin2048x1280-f4",
        "SDXL cross-attn k/v 2048→1280, 77 tokens ×4",
        "lokr",
        2048,
        1280,
        16,
        tokens=77,
        batch=4,
        factor=4,
    ),
    # SDXL ResNet 3x3 convs at the three resolutions of 1024² training
    Case("lokr-conv320-128-f4", "SDXL ResNet conv 320ch, 128² map", "lokr", 320, 320, 8, kernel=3, side=128, factor=4),
    Case("loha-conv640-64-r8", "SDXL ResNet conv 640ch, 64² map", "loha", 640, 640, 8, kernel=3, side=64),
    # the headline Tucker LoHa conv at rank 8, where its structured route (1x1 -> rank-64 core -> 1x1) pays off
    Case(
        "loha-conv320-32-tucker-r8",
        "SDXL ResNet conv 320ch, 32² map",
        "loha",
        320,
        320,
        8,
        kernel=3,
        side=32,
        tucker=True,
    ),
    Case(
        "lokr-conv1280-32-f8-tucker",
        "SDXL ResNet conv 1280ch, 32² map",
        "lokr",
        1280,
        1280,
        16,
        kernel=3,
        side=32,
        factor=8,
        tucker=True,
    ),
    # Anima DiT 2048-wide projections at 1024² (4096 tokens); sd-scripts' Anima example (dim 32, factor -1) is full-matrix
    Case("lokr-anima2048-f-1-r32", "Anima 2048 projection, 4096 tokens", "lokr", 2048, 2048, 32, tokens=4096),
    Case(
        "loha-anima2048-r16-bf16",
        "Anima 2048 projection, 4096 tokens",
        "loha",
        2048,
        2048,
        16,
        tokens=4096,
        dtype="bfloat16",
    ),
    # bf16 bases with fp32 adapters
    Case(
        "loha-lin1280-r16-bf16",
        "SDXL attn 1280, 32² latent ×2 batch",
        "loha",
        1280,
        1280,
        16,
        tokens=2048,
        dtype="bfloat16",
    ),
    Case(
        "lokr-lin1280x5120-f8-bf16",
        "SDXL ff 1280→5120, 32² latent",
        "lokr",
        1280,
        5120,
        16,
        tokens=1024,
        factor=8,
        dtype="bfloat16",
    ),
    Case(
        "loha-conv1280-32-r8-bf16",
        "SDXL ResNet conv 1280ch, 32² map",
        "loha",
        1280,
        1280,
        8,
        kernel=3,
        side=32,
        dtype="bfloat16",
    ),
]

QUICK = HEADLINE

# for the unit test of the suite itself: every code path, nothing that takes time
TINY = [
    Case("tiny-loha-lin", "test", "loha", 16, 32, 2, tokens=8),
    Case("tiny-lokr-conv", "test", "lokr", 8, 16, 2, kernel=3, side=6, factor=4, tucker=True),
]
