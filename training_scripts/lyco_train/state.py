"""Exact resume: adapter tensors, optimizer, lr schedule, grad scaler, every RNG, step and position in the data.

A state folder holds only safetensors and JSON (nothing is unpickled on resume). It is written under a temporary name
and renamed when complete, so an interrupted save never leaves a folder that looks usable.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .cache import atomic_save

STATE_FILE = "training_state.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, current epoch (0-based), batches of that epoch already used."""

    step: int
    epoch: int
    batch: int


def _split_tensors(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting the tensors under dotted names."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    return tree


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    return _split_tensors(optimizer.state_dict(), "optimizer", tensors), tensors


def _optimizer_from_files(structure: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = _join_tensors(structure, tensors)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


def _rng_snapshot() -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    python_version, python_state, python_gauss = random.getstate()
    info = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [python_version, list(python_state), python_gauss],
    }
    return info, tensors


def _rng_restore(info: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = info["python"]
    random.setstate((version, tuple(state), gauss))


def adapter_tensors(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor as ``<component>.<parameter name>``: exactly what training changes."""
    return {
        f"{component}.{name}": parameter.detach()
        for component, model in models.items()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def save_state(folder: Path, accelerator, training, position: Position, fingerprint: dict[str, Any]) -> None:
    """Write a complete resumable state of ``training`` (a ``loop.Training``) to ``folder``, replacing an older one;
    every process saves its own RNG."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_info, rng_tensors = _rng_snapshot()
    atomic_save(
        rng_tensors, partial / f"rng_{accelerator.process_index}.safetensors", metadata={"info": json.dumps(rng_info)}
    )
    if accelerator.is_main_process:
        atomic_save(
            adapter_tensors({k: accelerator.unwrap_model(m) for k, m in training.models.items()}),
            partial / ADAPTER_FILE,
        )
        structure, tensors = _optimizer_to_files(training.optimizer)
        atomic_save(tensors, partial / OPTIMIZER_FILE)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {
            "position": asdict(position),
            "optimizer": structure,
            "scheduler": training.lr_scheduler.state_dict(),
            "grad_scaler": scaler,
            "num_processes": accelerator.num_processes,
            "fingerprint": fingerprint,
        }
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    accelerator.wait_for_everyone()


def load_state(folder: Path, accelerator, training, fingerprint: dict[str, Any]) -> Position:
    """Restore into ``training`` everything ``save_state`` wrote; refuse (naming what differs) if the run is not the
    same run."""
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if state["num_processes"] != accelerator.num_processes:
        changed["num_processes"] = (state["num_processes"], accelerator.num_processes)
    if changed:
        detail = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume exactly from '{folder}': the run differs from the saved one ({detail})")
    saved = load_file(folder / ADAPTER_FILE)
    current = adapter_tensors({k: accelerator.unwrap_model(m) for k, m in training.models.items()})
    if set(saved) != set(current):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise ValueError(
            f"adapter in '{folder}' does not match this network: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, tensor in current.items():
            if tensor.shape != saved[name].shape:
                raise ValueError(
                    f"adapter tensor {name} has shape {tuple(saved[name].shape)} in '{folder}', "
                    f"{tuple(tensor.shape)} in this network"
                )
            tensor.copy_(saved[name])
    training.optimizer.load_state_dict(_optimizer_from_files(state["optimizer"], load_file(folder / OPTIMIZER_FILE)))
    training.lr_scheduler.load_state_dict(state["scheduler"])
    if state["grad_scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng_path = folder / f"rng_{accelerator.process_index}.safetensors"
    rng_tensors = load_file(rng_path)
    with safe_open(rng_path, "pt") as handle:
        rng_info = json.loads(handle.metadata()["info"])
    _rng_restore(rng_info, rng_tensors)
    return Position(**state["position"])


def state_folder_name(output_name: str, step: Optional[int] = None, epoch: Optional[int] = None) -> str:
    """sd-scripts' state folder names: ``NAME-step00000100-state``, ``NAME-000002-state``, or ``NAME-state``."""
    if step is not None:
        return f"{output_name}-step{step:08d}-state"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}-state"
    return f"{output_name}-state"


def run_fingerprint(args, batches_per_epoch: int) -> dict[str, Any]:
    """What must not change between a saved state and the run resuming it (network, seed, data layout)."""
    return {
        "algo": args.algo,
        "network_dim": args.network_dim,
        "network_alpha": args.network_alpha,
        "network_args": list(args.network_args),
        "seed": args.seed,
        "batches_per_epoch": batches_per_epoch,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }


def saved_seed(folder: str | Path) -> int:
    """The seed a state folder was trained with (a resumed run must keep it for the same data order)."""
    state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    return int(state["fingerprint"]["seed"])
