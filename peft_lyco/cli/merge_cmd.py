"""``peft-lyco merge``: bake adapters into a model checkpoint (W + Σ weight·ΔW summed in fp32, stored in W's dtype)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..functional import add_delta
from .adapters import module_delta, read_adapter
from .checkpoints import Checkpoint, read_file, write_checkpoint


def parse_adapter(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` (a trailing ``:number``; Windows drive letters are left alone)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def merge(model: str, adapters: list[tuple[str, float]], out: str, model_type: str | None = None) -> dict[str, int]:
    """Merge ``adapters`` (path, weight) into the checkpoint at ``model`` and write it to ``out``.

    Every adapter is read and every module located in the checkpoint before anything is written; ΔW of all adapters
    on a weight are summed in float32 (float64 for float64 weights) and added once, like ``add_delta``.
    """
    checkpoint = Checkpoint(model)
    plan: dict = {}
    for path, weight in adapters:
        adapter = read_adapter(path, model_type)
        if adapter.model_type != checkpoint.model_type:
            raise ValueError(f"{path} is a {adapter.model_type} adapter; {model} is a {checkpoint.model_type} model")
        for module in adapter.modules:
            slot = checkpoint.slot(module.component, module.path)
            plan.setdefault(slot.file, []).append((slot, module, weight, path))
    changed = {}
    for file, entries in plan.items():
        tensors, metadata = read_file(file)
        sums: dict = {}
        for slot, module, weight, path in tqdm(entries, desc=f"merging into {file.name}", unit="module"):
            current = checkpoint.read(slot, tensors)
            delta = module_delta(module, torch.promote_types(current.dtype, torch.float32))
            if delta.numel() != current.numel():
                raise ValueError(
                    f"{path}: module {module.name} has ΔW of shape {tuple(delta.shape)} but {slot.key} is "
                    f"{tuple(current.shape)} (an adapter for another model?)"
                )
            key = (slot.key, slot.rows)
            sums[key] = sums.get(key, 0) + weight * delta.reshape(current.shape)
        for (key, rows), delta in sums.items():
            tensor = tensors[key].clone() if rows is None else tensors[key]
            if rows is None:
                tensors[key] = add_delta(tensor, delta)
            else:
                tensors[key] = tensor.clone()
                tensors[key][rows[0] : rows[1]] = add_delta(tensor[rows[0] : rows[1]], delta)
        changed[file] = (tensors, metadata)
    write_checkpoint(checkpoint, Path(out), changed)
    return {str(file): len(entries) for file, entries in plan.items()}


def run(args) -> int:
    counts = merge(args.model, [parse_adapter(a) for a in args.adapter], args.out, args.model_type)
    print(f"merged {sum(counts.values())} modules into {args.out}")
    return 0
