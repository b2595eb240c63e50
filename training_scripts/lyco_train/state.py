"""Exact resume: adapter tensors, optimizer, lr schedule, grad scaler, every RNG, step and position in the data.

A state folder holds only safetensors and JSON (nothing is unpickled on resume). Each save writes its tensors under
new names (``adapter-000003.safetensors``, ``optimizer-…``, ``rng_<process>-…``), each file atomically, and then commits
by atomically replacing ``training_state.json``, which names them; only after that are the older files removed. So at
every instant the folder holds one complete state (the old one until the commit, the new one after): a run killed
while saving can always resume. Files no ``training_state.json`` names are leftovers of a killed save, never read.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .files import run_output_names, save_tensors, write_text
from .sharded import gather_adapter, gather_optimizer_state, load_full_state, trainable_tensors

STATE_FILE = "training_state.json"
# the tensor files of a state: "<kind>-<generation>.safetensors" (states of earlier versions: "<kind>.safetensors")
STATE_TENSORS = re.compile(r"^(adapter|optimizer|rng_\d+)(-\d+)?\.safetensors$")
SECTIONS = {"position": dict, "optimizer": dict, "scheduler": dict, "fingerprint": dict, "num_processes": int}


class StateError(ValueError):
    """A state folder that cannot be resumed from (missing, corrupt, or from another run); the message names the
    file."""


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


def _optimizer_to_files(optimizer_state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    return _split_tensors(optimizer_state, "optimizer", tensors), tensors


def _optimizer_from_files(structure: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = _join_tensors(structure, tensors)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


def rng_snapshot() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every RNG state a resumed run needs (torch CPU/CUDA, numpy, python), for ``save_state``."""
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


def _file_names(generation: int, num_processes: int) -> dict[str, Any]:
    suffix = f"-{generation:06d}.safetensors"
    return {
        "adapter": "adapter" + suffix,
        "optimizer": "optimizer" + suffix,
        "rng": [f"rng_{index}{suffix}" for index in range(num_processes)],
    }


def read_state(folder: str | Path) -> dict[str, Any]:
    """The committed ``training_state.json`` of ``folder``, checked for shape; raises ``StateError`` naming the file.

    States of earlier versions (fixed file names) get their ``files`` entry filled in.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise StateError(f"'{folder}' is not a state folder written by --save_state (no {STATE_FILE})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"cannot read state file '{path}' (corrupt or truncated?): {err}") from err
    if not isinstance(state, dict):
        raise StateError(f"state file '{path}' holds {type(state).__name__}, not a training state")
    wrong = [key for key, kind in SECTIONS.items() if not isinstance(state.get(key), kind)]
    position = state.get("position")
    if isinstance(position, dict) and (
        set(position) != {"step", "epoch", "batch"} or not all(isinstance(v, int) for v in position.values())
    ):
        wrong.append("position")
    fingerprint = state.get("fingerprint")
    if isinstance(fingerprint, dict) and not all(
        isinstance(fingerprint.get(key), int) for key in ("seed", "batches_per_epoch", "gradient_accumulation_steps")
    ):
        wrong.append("fingerprint")
    if wrong:
        raise StateError(f"state file '{path}' is missing or has malformed entries: {', '.join(wrong)}")
    if "files" not in state:
        state["files"] = {
            "adapter": "adapter.safetensors",
            "optimizer": "optimizer.safetensors",
            "rng": [f"rng_{index}.safetensors" for index in range(state["num_processes"])],
        }
    return state


def state_files(folder: str | Path) -> dict[str, Path]:
    """The committed tensor files of a state folder by kind: ``adapter``, ``optimizer``, ``rng_0``, ``rng_1``, …"""
    files = read_state(folder)["files"]
    rng = {f"rng_{index}": Path(folder) / name for index, name in enumerate(files["rng"])}
    return {"adapter": Path(folder) / files["adapter"], "optimizer": Path(folder) / files["optimizer"], **rng}


def check_state_folder(folder: str | Path) -> dict[str, Any]:
    """Everything about a state folder that needs no model: ``training_state.json`` and the header and size of every
    tensor file it names. Returns the state; raises ``StateError`` naming the first bad file."""
    state = read_state(folder)
    files = state["files"]
    for name in (files["adapter"], files["optimizer"], *files["rng"]):
        _open_tensors(Path(folder) / name, header_only=True)
    return state


def _open_tensors(path: Path, *, header_only: bool = False) -> dict[str, Any]:
    """Tensors (or just metadata, checking header and size) of one state file; ``StateError`` naming it otherwise."""
    if not path.is_file():
        raise StateError(f"state file '{path}' is missing (the folder is incomplete)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if header_only:
                return {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {"tensors": tensors, "metadata": metadata}
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        raise StateError(f"cannot read state file '{path}' (corrupt or truncated?): {err}") from err


def any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it at the same point)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([int(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item())


def save_state(
    folder: Path,
    accelerator,
    training,
    position: Position,
    fingerprint: dict[str, Any],
    rng: tuple[dict, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a complete resumable state of ``training`` (a ``loop.Training``) to ``folder``, replacing an older one
    only by the atomic commit of ``training_state.json``; every process saves its own RNG (``rng``: an earlier
    ``rng_snapshot`` to save instead of the current state, for a step whose successor failed after drawing noise).

    If a write fails on any process (a full disk), nothing is committed, every process raises ``OSError`` (the
    failing one its own error) and the folder keeps the state it had.
    """
    folder = Path(folder)
    accelerator.wait_for_everyone()
    try:
        generation = int(read_state(folder).get("generation", 0)) + 1
    except (StateError, TypeError, ValueError):  # no usable state yet: this save is the first
        generation = 1
    names = _file_names(generation, accelerator.num_processes)
    # whole tensors on the main process (under FSDP gathered from the shards: every process takes part)
    adapter = gather_adapter(accelerator, training.models)
    optimizer_state = gather_optimizer_state(accelerator, training.models, training.optimizer)
    error = None
    try:
        rng_info, rng_tensors = rng or rng_snapshot()
        rng_path = folder / names["rng"][accelerator.process_index]
        save_tensors(rng_path, rng_tensors, metadata={"info": json.dumps(rng_info)})
        if accelerator.is_main_process:
            save_tensors(folder / names["adapter"], adapter)
            structure, tensors = _optimizer_to_files(optimizer_state)
            save_tensors(folder / names["optimizer"], tensors)
    except OSError as err:
        error = err
    if any_process(accelerator, error is not None):
        raise error or OSError(f"saving the state '{folder}' failed on another process")
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {
            "generation": generation,
            "files": names,
            "position": asdict(position),
            "optimizer": structure,
            "scheduler": training.lr_scheduler.state_dict(),
            "grad_scaler": scaler,
            "num_processes": accelerator.num_processes,
            "fingerprint": fingerprint,
        }
        try:
            write_text(folder / STATE_FILE, json.dumps(state, indent=1))
            remove_unreferenced(folder)
        except OSError as err:
            error = err
    if any_process(accelerator, error is not None):
        raise error or OSError(f"saving the state '{folder}' failed on the main process")


def remove_unreferenced(folder: Path) -> list[Path]:
    """Remove the state tensor files ``training_state.json`` does not name (older generations, saves killed before
    their commit; a folder without a committed state loses all of them) and temporary files of killed writes. Returns
    what was removed."""
    try:
        files = read_state(folder)["files"]
        keep = {files["adapter"], files["optimizer"], *files["rng"]}
    except StateError:
        if (Path(folder) / STATE_FILE).is_file():
            return []  # a damaged commit: leave everything for the user to inspect
        keep = set()
    removed = [
        p
        for p in Path(folder).iterdir()
        if STATE_TENSORS.match(p.name) and p.name not in keep or p.name.startswith(".") and p.name.endswith(".tmp")
    ]
    for path in removed:
        path.unlink(missing_ok=True)
    if not keep and not any(Path(folder).iterdir()):
        Path(folder).rmdir()
    return removed


def remove_stale_state_files(output_dir: str | Path, output_name: str) -> list[Path]:
    """``remove_unreferenced`` on every state folder of ``output_name`` in ``output_dir``."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    ours = run_output_names(output_name)
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.endswith("-state") and ours.fullmatch(p.name)]
    return [path for folder in folders for path in remove_unreferenced(folder)]


def check_same_run(
    folder: str | Path,
    state: dict[str, Any],
    fingerprint: dict[str, Any],
    num_processes: int,
    components: tuple[str, ...] | None = None,
) -> None:
    """Raise ``StateError`` naming every difference between the saved run and this one (network, seed, data layout,
    process count and, when given, the trained components, read from the adapter file's tensor names)."""
    changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if state["num_processes"] != num_processes:
        changed["num_processes"] = (state["num_processes"], num_processes)
    if components is not None:
        path = Path(folder) / state["files"]["adapter"]
        with safe_open(str(path), framework="pt") as handle:
            saved = sorted({key.split(".")[0] for key in handle.keys()})  # noqa: SIM118 (safe_open is no dict)
        if saved != sorted(components):
            changed["trained components"] = (saved, sorted(components))
    if changed:
        detail = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise StateError(f"cannot resume exactly from '{folder}': the run differs from the saved one ({detail})")


def load_state(folder: Path, accelerator, training, fingerprint: dict[str, Any]) -> Position:
    """Restore into ``training`` everything ``save_state`` wrote; refuse (naming what differs) if the run is not the
    same run, and (naming the file) if a file is damaged. Nothing is changed unless every file reads."""
    folder = Path(folder)
    state = read_state(folder)
    check_same_run(folder, state, fingerprint, accelerator.num_processes)
    files = state["files"]
    saved = _open_tensors(folder / files["adapter"])["tensors"]
    optimizer_tensors = _open_tensors(folder / files["optimizer"])["tensors"]
    rng_path = folder / files["rng"][accelerator.process_index]
    rng = _open_tensors(rng_path)
    try:
        rng_info = json.loads(rng["metadata"]["info"])
    except (KeyError, json.JSONDecodeError) as err:
        raise StateError(f"state file '{rng_path}' has no readable RNG description: {err!r}") from err
    current = trainable_tensors({k: accelerator.unwrap_model(m) for k, m in training.models.items()})
    if set(saved) != set(current):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise StateError(
            f"adapter in '{folder}' does not match this network: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in current.items():
        if tensor.shape != saved[name].shape:
            raise StateError(
                f"adapter tensor {name} has shape {tuple(saved[name].shape)} in '{folder}', "
                f"{tuple(tensor.shape)} in this network"
            )
    try:
        optimizer_state = _optimizer_from_files(state["optimizer"], optimizer_tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(f"optimizer state in '{folder}' does not match its tensor file: {err!r}") from err
    load_full_state(accelerator, training.models, training.optimizer, saved, optimizer_state)
    training.lr_scheduler.load_state_dict(state["scheduler"])
    if state["grad_scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    _rng_restore(rng_info, rng["tensors"])
    return Position(**state["position"])


def steps_planned(state: dict[str, Any], max_train_steps: int, max_train_epochs: int | None) -> int:
    """The total number of steps a run resuming ``state`` with these options trains (epochs win over steps, an
    epoch being the saved run's optimizer steps per epoch)."""
    if not max_train_epochs:
        return max_train_steps
    saved = state["fingerprint"]
    return max_train_epochs * math.ceil(saved["batches_per_epoch"] / saved["gradient_accumulation_steps"])


def state_folder_name(output_name: str, step: int | None = None, epoch: int | None = None) -> str:
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
    return int(read_state(folder)["fingerprint"]["seed"])
