"""Loading a kohya LoKr/LoHa file into an SDXL pipeline with peft_lyco vs diffusers loading an ordinary LoRA with the
same module count, and fuse/unfuse time of both. The UNet has SDXL's real size and random weights (``--quick``: an
SDXL-shaped tiny one), so the numbers are about the loaders, not about disk or model downloads."""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import inject_adapter_in_model
from safetensors.torch import save_file
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.convert import peft_to_kohya, save_kohya
from peft_lyco.diffusers import load_lyco_weights
from peft_lyco.models.sdxl import SDXL_UNET_CONFIG
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline
from peft_lyco.tuners.layer import LycoLayer

RANK = 16


def sdxl_pipeline(real_size: bool, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """The tiny offline SDXL pipeline, its UNet in ``dtype``; with ``real_size`` the UNet is swapped for one of SDXL's
    real size with random weights (the files are UNet-only, so the tiny text encoders and VAE do not matter)."""
    pipe = tiny_sdxl_pipeline()
    if not real_size:
        pipe.unet.to(dtype)
        return pipe
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet = unet.to(dtype=dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:
            tensor.normal_(std=0.02, generator=generator)
    return StableDiffusionXLPipeline(**{**pipe.components, "unet": unet.eval()})


def target_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of the down/mid/up blocks: attention, feed-forward, ResNet and resampler layers, as a
    LyCORIS "full" preset with conv_dim adapts them."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.startswith(("down_blocks.", "mid_block.", "up_blocks."))
    }


def lora_file(unet: nn.Module, dtype: torch.dtype, folder: str) -> str:
    """An ordinary rank-16 LoRA on every target module, in diffusers/PEFT key format, saved as safetensors."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in target_modules(unet).items():
        weight = module.weight
        down_shape = (RANK, *weight.shape[1:])
        up_shape = (weight.shape[0], RANK, *([1] * (weight.dim() - 2)))
        tensors[f"unet.{name}.lora_A.weight"] = (torch.randn(down_shape, generator=generator) * 0.01).to(dtype)
        tensors[f"unet.{name}.lora_B.weight"] = (torch.randn(up_shape, generator=generator) * 0.01).to(dtype)
    path = os.path.join(folder, "lora.safetensors")
    save_file(tensors, path)
    return path


def lyco_file(pipe: StableDiffusionXLPipeline, algo: str, dtype: torch.dtype, folder: str) -> str:
    """A kohya file (SGM names) of a LoKr (factor 8) or LoHa adapter on every target module, rank 16, written by
    peft_lyco's own exporter from an adapter injected for the purpose and removed again."""
    names = [f"^{name}$".replace(".", r"\.") for name in target_modules(pipe.unet)]
    config = LoKrConfig(r=RANK, factor=8) if algo == "lokr" else LoHaConfig(r=RANK)
    config.target_modules, config.init_weights = "|".join(names), False
    unet = inject_adapter_in_model(config, pipe.unet, adapter_name="export")
    state_dict, metadata = peft_to_kohya(unet, adapter_name="export", model_type="sdxl", naming="sgm", dtype=dtype)
    for name, module in list(unet.named_modules()):
        if isinstance(module, LycoLayer):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.get_base_layer())
    path = os.path.join(folder, f"{algo}.safetensors")
    save_kohya(path, state_dict, metadata)
    return path


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cycle(pipe: StableDiffusionXLPipeline, load: Callable[[], Any], adapter: str, reps: int) -> dict[str, float]:
    """Median seconds of load, fuse and unfuse over ``reps`` cycles, each from a UNet without tuner layers."""
    times: dict[str, list[float]] = {"load": [], "fuse": [], "unfuse": []}
    for _ in range(reps):
        times["load"].append(_seconds(load))
        times["fuse"].append(_seconds(lambda: pipe.fuse_lora(components=["unet"], adapter_names=[adapter])))
        times["unfuse"].append(_seconds(lambda: pipe.unfuse_lora(components=["unet"])))
        pipe.unload_lora_weights()
    return {name: statistics.median(values) for name, values in times.items()}


def run_loading(
    real_size: bool, reps: int, algos: tuple[str, ...] = ("lokr", "loha"), dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Load/fuse/unfuse seconds of diffusers' LoRA and of peft_lyco's LoKr/LoHa kohya files."""
    start = time.perf_counter()
    pipe = sdxl_pipeline(real_size, dtype)
    result: dict[str, Any] = {
        "unet": "SDXL real size" if real_size else "SDXL-shaped tiny",
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "modules": len(target_modules(pipe.unet)),
        "rank": RANK,
        "dtype": str(dtype).removeprefix("torch."),
        "reps": reps,
    }
    with tempfile.TemporaryDirectory() as folder:
        lora_path = lora_file(pipe.unet, dtype, folder)
        lyco_paths = {algo: lyco_file(pipe, algo, dtype, folder) for algo in algos}
        result["diffusers_lora"] = _cycle(
            pipe, lambda: pipe.load_lora_weights(lora_path, adapter_name="lora"), "lora", reps
        )
        for algo, path in lyco_paths.items():
            # low_cpu_mem_usage as diffusers loads LoRA by default (adapter tensors assigned from the file, not initialised)
            row = _cycle(
                pipe, functools.partial(load_lyco_weights, pipe, path, algo, low_cpu_mem_usage=True), algo, reps
            )
            row.update({f"{k}/diffusers": row[k] / result["diffusers_lora"][k] for k in ("load", "fuse", "unfuse")})
            result[f"peft_lyco_{algo}"] = row
    result["seconds"] = time.perf_counter() - start
    return result
