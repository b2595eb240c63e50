"""``peft-lyco extract``: an adapter approximating tuned − base, module by module (LoRA/LoCon, LoKr or LoHa)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..convert.modules import Geometry
from ..convert.names import NameResolver, model_names
from ..functional import lokr_layout
from ..functional.approximate import fit_loha, fit_lokr, truncated_svd
from .adapters import DTYPES, Adapter, make_module, write_kohya
from .checkpoints import Checkpoint


def fit_module(delta: torch.Tensor, algo: str, rank: int, *, factor: int = -1, decompose_both: bool = False,
               use_tucker: bool = False, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:  # fmt: skip
    """Kohya tensors (scale 1 at alpha = rank) approximating ``delta`` ``(out, in, *k)``, and the Frobenius error."""
    out, inn, *kernel = delta.shape
    if algo == "lora":
        low = truncated_svd(delta.reshape(out, -1), rank)
        down = low.down.reshape(rank, inn, *kernel)
        up = low.up.reshape(out, rank, *([1] * len(kernel)))
        return {"lora_down.weight": down, "lora_up.weight": up}, low.error
    if algo == "loha":
        fitted = fit_loha(delta, rank, seed=seed)
        return fitted.tensors, fitted.error
    layout = lokr_layout(out, inn, tuple(kernel), rank, factor=factor, decompose_both=decompose_both,
                         use_tucker=use_tucker, warn=False)  # fmt: skip
    fitted = fit_lokr(delta, layout)
    return fitted.tensors, fitted.error


def compute_device(name: str) -> torch.device:
    """The device the fits run on; a CUDA device that is not there is an error, not a silent CPU run."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def extract(args) -> list[tuple[str, float]]:
    """Fit every differing module (float64 difference, float32 fit on ``args.device``) and write the file."""
    device = compute_device(args.device)
    base, tuned = Checkpoint(args.base), Checkpoint(args.tuned)
    if base.model_type != tuned.model_type:
        raise ValueError(f"{args.base} is {base.model_type} but {args.tuned} is {tuned.model_type}")
    missing = sorted(set(base.slots) - set(tuned.slots))
    if missing:
        raise ValueError(f"{args.tuned} lacks modules of {args.base}, e.g. {missing[:3]} (different models?)")
    resolver = NameResolver(model_names(base.model_type))
    modules, report, skipped = [], [], []
    for (component, path), slot in tqdm(sorted(base.slots.items()), desc="extracting", unit="module"):
        weight_a = base.read(slot).double()
        weight_b = tuned.read(tuned.slots[(component, path)]).double()
        if weight_a.shape != weight_b.shape:
            raise ValueError(f"{component} '{path}': base {tuple(weight_a.shape)} vs tuned {tuple(weight_b.shape)}")
        delta = weight_b - weight_a
        if float(delta.abs().max()) <= args.min_diff:
            continue
        kernel = tuple(delta.shape[2:])
        spatial = any(k != 1 for k in kernel)
        rank = args.conv_rank if spatial else args.rank
        if rank is None:
            skipped.append(path)
            continue
        tensors, error = fit_module(delta.to(device, torch.float32), args.algo, rank, factor=args.factor, decompose_both=args.decompose_both,
                                    use_tucker=args.use_tucker, seed=args.seed)  # fmt: skip
        geometry = Geometry(delta.shape[0], delta.shape[1], kernel)
        tensors = {name: tensor.float().cpu() for name, tensor in tensors.items()}
        name = resolver.kohya_name(component, path)
        modules.append(make_module(component, path, name, args.algo, tensors, rank, geometry))
        report.append((name, error / max(float(delta.norm()), 1e-30)))
    if skipped:
        print(f"skipped {len(skipped)} kxk convolutions (pass --conv_rank to extract them)")
    if not modules:
        raise ValueError("the models do not differ in any adaptable module (nothing to extract)")
    adapter = Adapter(base.model_type, modules)
    write_kohya(args.out, adapter, dtype=DTYPES[args.dtype])
    return report


def print_errors(report: list[tuple[str, float]], verbose: bool = True) -> None:
    if verbose:
        for name, error in report:
            print(f"{error:10.3e}  {name}")
    errors = [e for _, e in report]
    print(f"{len(errors)} modules; relative error max {max(errors):.3e}, mean {sum(errors) / len(errors):.3e}")


def run(args) -> int:
    report = extract(args)
    print_errors(report)
    print(f"wrote {Path(args.out)}")
    return 0
