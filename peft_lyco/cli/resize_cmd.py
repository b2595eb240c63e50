"""``peft-lyco resize``: lower the rank of LoRA/LoCon and LoKr low-rank factors by SVD (LoHa: refit), or turn any
module into LoRA/LoCon of a given rank (``--to-lora``) for consumers that read only LoRA."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..convert.modules import ModuleAdapter
from ..functional import lokr_layout
from ..functional.approximate import lokr_factors
from ..functional.lokr import lokr_w1, lokr_w2
from .adapters import DTYPES, Adapter, make_module, module_delta, module_scale, read_adapter, write_kohya
from .extract_cmd import compute_device, fit_module, print_errors


def target_rank(module: ModuleAdapter, rank: int | None, ratio: float | None) -> int:
    """The new rank: ``rank``, or ``ratio`` times the module's rank rounded up (at least 1)."""
    return rank if rank is not None else max(1, math.ceil(ratio * module.rank))


def resize_module(
    module: ModuleAdapter, new_rank: int, *, to_lora: bool, seed: int, device: torch.device | str = "cpu"
) -> tuple[ModuleAdapter, float]:
    """The module at ``new_rank`` (scale 1: alpha = rank) and the Frobenius error of its ΔW (fits in float32 on
    ``device``, the error in float64)."""
    delta = module_delta(module, torch.float64)
    g = module.geometry
    if to_lora or module.algo in ("lora", "loha"):
        algo = "lora" if to_lora else module.algo
        if not to_lora and module.algo == "lora" and new_rank >= module.rank:
            return module, 0.0
        tensors, _ = fit_module(delta.to(device, torch.float32), algo, new_rank, seed=seed)
    else:
        layout = module.layout
        if new_rank >= module.rank and not layout.both_full:
            return module, 0.0
        t = {name: tensor.double() for name, tensor in module.tensors.items()}
        w1, w2 = lokr_w1(t), lokr_w2(t)
        new_layout = lokr_layout(g.out_features, g.in_features, g.kernel, new_rank, **module.options, warn=False)
        if (new_layout.out_l, new_layout.in_m) != (layout.out_l, layout.in_m):
            raise ValueError(f"{module.name}: the LoKr split changes at rank {new_rank}")
        tensors = lokr_factors(w1 * module_scale(module), w2, new_layout)
    dtype = next(iter(module.tensors.values())).dtype
    tensors = {name: tensor.to("cpu", dtype) for name, tensor in tensors.items()}
    algo = "lora" if to_lora else module.algo
    resized = make_module(module.component, module.path, module.name, algo, tensors, new_rank, g)
    error = float((module_delta(resized, torch.float64) - delta).norm())
    return resized, error


def run(args) -> int:
    device = compute_device(args.device)
    adapter = read_adapter(args.file, args.model_type)
    modules, report = [], []
    for module in tqdm(adapter.modules, desc="resizing", unit="module"):
        new_rank = target_rank(module, args.rank, args.ratio)
        resized, error = resize_module(module, new_rank, to_lora=args.to_lora, seed=args.seed, device=device)
        modules.append(resized)
        norm = float(module_delta(module, torch.float64).norm())
        report.append(
            (
                f"{module.name} ({module.algo} r{module.rank} -> {resized.algo} r{resized.rank})",
                error / max(norm, 1e-30),
            )
        )
    dtype = DTYPES[args.dtype] if args.dtype else None
    write_kohya(args.out, Adapter(adapter.model_type, modules, adapter.metadata), dtype=dtype)
    print_errors(report)
    print(f"wrote {Path(args.out)}")
    return 0
