"""Whole-model slices at real widths, built from code (no download): the blocks SDXL and Anima train through.

A slice is one container block of the real model with random weights and the inputs it sees at 1024² training:

* ``sdxl-transformer``: diffusers' ``Transformer2DModel`` as SDXL's UNet builds it (linear projections in and out,
  ``BasicTransformerBlock`` with self-attention, 2048-d cross-attention to the text embedding and a GEGLU
  feed-forward, 64-wide heads) over the latent's tokens: 1280 wide at 32² (1024 tokens), 640 wide at 64² (4096);
* ``sdxl-resnet``: diffusers' ``ResnetBlock2D`` (GroupNorm, two 3x3 convs, time-embedding projection), 640 channels
  at 64² and 1280 at 32²;
* ``anima-block``: our Anima ``DiTBlock`` (2048 wide, 16 heads of 128, 3-D RoPE, 1024-d cross-attention to 512
  text tokens, 4x MLP, AdaLN-LoRA modulation), 1024 (512²) to 4096 (1024²) tokens.

The adapted layers are the ones sd-scripts adapts on that block (``peft_lyco.presets``' architecture rules, with
``conv_dim`` given so ResNet 3x3 convs are included, and the architecture's default excludes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from peft_lyco.presets import architectures

KINDS = ("sdxl-transformer", "sdxl-resnet", "anima-block")
PRECISIONS = ("fp32", "bf16", "bf16-full")
PRECISION_DOC = {
    "fp32": "float32 base, adapters and activations",
    "bf16": "bfloat16 frozen base, float32 adapters, bfloat16 inputs, forward under torch.autocast(bfloat16) "
    "(what trainers run with --mixed_precision bf16)",
    "bf16-full": "bfloat16 base, adapters and inputs, no autocast (sd-scripts' --full_bf16)",
}


@dataclass(frozen=True)
class SliceCase:
    """One slice, its size, the precision it runs in and the adapter settings compared on it.

    ``tokens`` is the number of latent tokens of a transformer block or the pixel count of a ResNet block's feature
    map (a square: ``side = sqrt(tokens)``). Every implementation uses rank ``rank`` with alpha = rank; LoKr uses
    ``factor``. ``algos`` are the LyCORIS algorithms compared against PEFT LoRA at the same rank.
    """

    name: str
    kind: str
    width: int
    tokens: int
    precision: str = "fp32"
    rank: int = 8
    factor: int = 8
    algos: tuple[str, ...] = ("lokr", "loha")
    heads: int = 0  # 0: the real head count for the width (SDXL: width / 64; Anima: 16)
    context_tokens: int = 0  # 0: SDXL 77, Anima 512
    context_dim: int = 0  # 0: SDXL 2048, Anima 1024
    layers: int = 1  # BasicTransformerBlocks in an SDXL Transformer2DModel
    batch: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"slice kind must be one of {KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        side = math.isqrt(self.tokens)
        if side * side != self.tokens:
            raise ValueError(f"{self.name}: tokens must be a square number (a square latent), got {self.tokens}")
        unknown = set(self.algos) - {"lokr", "loha"}
        if unknown:
            raise ValueError(f"{self.name}: unknown algorithms {sorted(unknown)}")

    @property
    def side(self) -> int:
        return math.isqrt(self.tokens)

    @property
    def num_heads(self) -> int:
        if self.heads:
            return self.heads
        return 16 if self.kind == "anima-block" else max(1, self.width // 64)

    @property
    def text_tokens(self) -> int:
        return self.context_tokens or (512 if self.kind == "anima-block" else 77)

    @property
    def text_dim(self) -> int:
        return self.context_dim or (1024 if self.kind == "anima-block" else 2048)

    @property
    def base_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    @property
    def adapter_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16-full" else torch.float32

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16"

    def with_tokens(self, tokens: int) -> SliceCase:
        return replace(self, tokens=tokens)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Slice:
    """A built slice: the frozen block, the paths of the layers to adapt, and a call on fixed inputs."""

    case: SliceCase
    module: nn.Module
    targets: list[str]
    conv_targets: list[str]
    inputs: dict[str, torch.Tensor]  # the tensor that carries the gradient is ``inputs["x"]``
    call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _sdxl_transformer(case: SliceCase) -> tuple[nn.Module, Callable, dict[str, tuple[int, ...]]]:
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    module = Transformer2DModel(
        num_attention_heads=case.num_heads,
        attention_head_dim=case.width // case.num_heads,
        in_channels=case.width,
        num_layers=case.layers,
        cross_attention_dim=case.text_dim,
        norm_num_groups=32 if case.width % 32 == 0 else 1,
        use_linear_projection=True,  # SDXL's UNet config
    )

    def call(block: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return block(inputs["x"], encoder_hidden_states=inputs["context"], return_dict=False)[0]

    shapes = {
        "x": (case.batch, case.width, case.side, case.side),
        "context": (case.batch, case.text_tokens, case.text_dim),
    }
    return module, call, shapes


def _sdxl_resnet(case: SliceCase) -> tuple[nn.Module, Callable, dict[str, tuple[int, ...]]]:
    from diffusers.models.resnet import ResnetBlock2D

    temb = 1280  # SDXL's time-embedding width at every level
    module = ResnetBlock2D(
        in_channels=case.width,
        out_channels=case.width,
        temb_channels=temb,
        groups=32 if case.width % 32 == 0 else 1,
    )

    def call(block: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return block(inputs["x"], inputs["temb"])

    return module, call, {"x": (case.batch, case.width, case.side, case.side), "temb": (case.batch, temb)}


def _anima_block(case: SliceCase) -> tuple[nn.Module, Callable, dict[str, tuple[int, ...]]]:
    from peft_lyco.models.anima import AnimaConfig
    from peft_lyco.models.anima.dit import DiTBlock, RoPE3D

    config = AnimaConfig(model_channels=case.width, num_heads=case.num_heads, crossattn_emb_channels=case.text_dim)
    module = DiTBlock(case.width, case.text_dim, case.num_heads, config.mlp_ratio, config.adaln_lora_dim)
    angles = RoPE3D(config)((1, case.side, case.side))

    def call(block: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return block(inputs["x"], inputs["emb"], inputs["context"], inputs["angles"], inputs["adaln_lora"])

    shapes = {
        "x": (case.batch, 1, case.side, case.side, case.width),
        "emb": (case.batch, 1, case.width),
        "context": (case.batch, case.text_tokens, case.text_dim),
        "adaln_lora": (case.batch, 1, 3 * case.width),
    }
    return module, call, {**shapes, "angles": angles}


_BUILDERS = {"sdxl-transformer": _sdxl_transformer, "sdxl-resnet": _sdxl_resnet, "anima-block": _anima_block}
_ARCHITECTURE = {"sdxl-transformer": "unet", "sdxl-resnet": "unet", "anima-block": "anima_dit"}


def sd_scripts_targets(kind: str, module: nn.Module) -> tuple[list[str], list[str]]:
    """``(all targets, the kxk conv ones)``: what sd-scripts adapts inside this block with ``conv_dim`` set."""
    arch = next(a for a in architectures() if a.name == _ARCHITECTURE[kind])
    candidates = arch.candidates(module, conv=True, adapter=False)
    paths = [
        path for path, _ in candidates if not any(re.fullmatch(pattern, path) for pattern in arch.default_excludes)
    ]
    layers = dict(candidates)
    convs = [path for path in paths if isinstance(layers[path], nn.Conv2d) and layers[path].kernel_size != (1, 1)]
    return paths, convs


def slice_module(case: SliceCase) -> nn.Module:
    """The block of ``case`` alone (float32, on the default device: ``with torch.device("meta")`` builds a real-width
    one for free)."""
    return _BUILDERS[case.kind](case)[0]


def build_slice(case: SliceCase, device: str = "cpu", seed: int = 0) -> Slice:
    """The frozen block of ``case`` in its base dtype on ``device``, with random weights and inputs."""
    torch.manual_seed(seed)
    module, call, shapes = _BUILDERS[case.kind](case)
    targets, convs = sd_scripts_targets(case.kind, module)
    module = module.to(device=device, dtype=case.base_dtype).requires_grad_(False).train()
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = {}
    for name, shape in shapes.items():
        if isinstance(shape, torch.Tensor):  # precomputed (RoPE angles stay float32, as the model keeps them)
            inputs[name] = shape.to(device)
            continue
        inputs[name] = torch.randn(shape, generator=generator).to(device=device, dtype=case.base_dtype)
    inputs["x"].requires_grad_(True)  # the block sits inside a network with trainable layers before it
    return Slice(case, module, targets, convs, inputs, call)


# ----------------------------------------------------------------------------------------------------- case lists
def _sdxl_and_anima(precision: str) -> list[SliceCase]:
    tag = "" if precision == "fp32" else f"-{precision}"
    return [
        SliceCase(
            f"sdxl-attn1280-32{tag}",
            "sdxl-transformer",
            1280,
            1024,
            precision,
            source="SDXL mid/down-2 attention, 32² latent",
        ),
        SliceCase(
            f"sdxl-attn640-64{tag}",
            "sdxl-transformer",
            640,
            4096,
            precision,
            source="SDXL down-1 attention, 64² latent",
        ),
        SliceCase(f"sdxl-res1280-32{tag}", "sdxl-resnet", 1280, 1024, precision, source="SDXL ResNet, 1280 ch at 32²"),
        SliceCase(f"sdxl-res640-64{tag}", "sdxl-resnet", 640, 4096, precision, source="SDXL ResNet, 640 ch at 64²"),
        SliceCase(f"anima-block-1024{tag}", "anima-block", 2048, 1024, precision, source="Anima DiT block, 512² image"),
        SliceCase(
            f"anima-block-1024-lokr-f-1-r32{tag}",
            "anima-block",
            2048,
            1024,
            precision,
            rank=32,
            factor=-1,
            algos=("lokr",),
            source="Anima DiT block, sd-scripts' Anima LoKr example (dim 32, factor -1)",
        ),
    ]


FULL = _sdxl_and_anima("fp32") + _sdxl_and_anima("bf16")

# not in the default run (4096-token Anima blocks take ~4x as long); name them with --cases
EXTRA = [
    SliceCase("anima-block-4096", "anima-block", 2048, 4096, source="Anima DiT block, 1024² image"),
    SliceCase("anima-block-4096-bf16", "anima-block", 2048, 4096, "bf16", source="Anima DiT block, 1024² image"),
    *_sdxl_and_anima("bf16-full"),
]

# every kind at a tiny width: what --quick runs and the tests use
TINY = [
    SliceCase("tiny-sdxl-attn", "sdxl-transformer", 64, 16, heads=2, context_dim=48, context_tokens=5, source="test"),
    SliceCase("tiny-sdxl-res", "sdxl-resnet", 32, 16, source="test"),
    SliceCase("tiny-anima-block", "anima-block", 64, 16, heads=4, context_dim=48, context_tokens=5, source="test"),
]
QUICK = [TINY[0]]


def known_cases() -> dict[str, SliceCase]:
    return {case.name: case for case in FULL + EXTRA + TINY}
