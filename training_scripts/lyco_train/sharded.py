"""FSDP (accelerate's ``fsdp_version: 2``, torch's ``fully_shard``): whole tensors for the writers and the state.

Under FSDP every parameter, the adapter's included, is a ``DTensor`` holding 1/N of its rows on each process, and the
optimizer's moments are sharded the same way. The adapter files and the resumable state are written from whole
tensors: each save first gathers them with torch's distributed-checkpoint helpers (``full_state_dict`` on CPU, only
the trainable parameters), a collective that every process enters at the same point, then the main process writes.
A resume reads the same whole tensors on every process and lets the helpers shard them again. The files are those of
a single-process or DDP run: the same names, the same optimizer layout (torch's integer parameter ids).

Without FSDP every function here is the plain single-process operation, so callers need no branches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn


def is_sharded(accelerator) -> bool:
    """Whether ``accelerate launch`` runs this process under FSDP (a stand-in without ``distributed_type``, as tests
    pass for one process, is not sharded)."""
    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def trainable_tensors(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor as ``<component>.<parameter name>`` (under FSDP: this process's ``DTensor`` shards)."""
    return {
        f"{component}.{name}": parameter.detach()
        for component, model in models.items()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _full_options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def same_adapter_everywhere(accelerator, models: dict[str, nn.Module]) -> None:
    """Under FSDP, before ``accelerator.prepare``: copy the main process's freshly initialised trainable parameters to
    every process. Each process seeds its RNG with ``--seed`` + its index, so their random adapter inits differ; DDP
    broadcasts the main process's parameters when it wraps a model, but FSDP shards what each process holds, which
    would stitch the adapter together from different inits. Without FSDP nothing happens."""
    if not is_sharded(accelerator):
        return
    for parameter in trainable_tensors(models).values():
        torch.distributed.broadcast(parameter, src=0)


def gather_adapter(accelerator, models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The whole trainable tensors of the (accelerate-prepared) ``models`` by ``<component>.<name>``.

    Under FSDP a collective (call it on every process): the main process gets the tensors on CPU, the others an
    empty dict; frozen parameters are neither gathered nor returned. Otherwise the parameters themselves (detached).
    """
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    if not is_sharded(accelerator):
        return trainable_tensors(unwrapped)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    wanted = trainable_tensors(unwrapped).keys()
    full = get_model_state_dict(
        nn.ModuleDict(unwrapped), options=_full_options(cpu_offload=True, ignore_frozen_params=True)
    )
    return {name: tensor for name, tensor in full.items() if name in wanted}


def gather_optimizer_state(accelerator, models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state in ``torch.optim.Optimizer.state_dict()`` layout (integer ids in the order of the
    parameter groups). Under FSDP a collective: the main process gets it (tensors on CPU), the others ``{}``."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    unwrapped = nn.ModuleDict({name: accelerator.unwrap_model(model) for name, model in models.items()})
    full = get_optimizer_state_dict(unwrapped, _torch_optimizer(optimizer), options=_full_options(cpu_offload=True))
    if not full:
        return {}
    ids: dict[str, int] = {}
    groups = [
        {**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]}
        for group in full["param_groups"]
    ]
    return {"state": {ids[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def load_full_state(
    accelerator,
    models: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict,
) -> None:
    """Put whole ``adapter`` tensors (``<component>.<name>``) and a whole ``optimizer_state`` (``state_dict()``
    layout) into the models and optimizer. Under FSDP a collective: every process passes the same whole tensors and
    keeps its shard."""
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    if not is_sharded(accelerator):
        current = trainable_tensors(unwrapped)
        with torch.no_grad():
            for name, tensor in current.items():
                tensor.copy_(adapter[name])
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    container = nn.ModuleDict(unwrapped)
    inner = _torch_optimizer(optimizer)
    set_model_state_dict(container, adapter, options=_full_options(strict=False))
    names = {parameter: name for name, parameter in container.named_parameters()}
    order = [names[parameter] for group in inner.param_groups for parameter in group["params"]]
    by_name = {
        "state": {order[index]: value for index, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [order[index] for index in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(container, inner, by_name, options=_full_options())


@contextlib.contextmanager
def whole_adapter(accelerator, models: dict[str, nn.Module]) -> Iterator[None]:
    """While the writers read the adapter from the modules (kohya export, PEFT folders): under FSDP, gather it (a
    collective: enter on every process) and, on the main process, put the whole tensors in place of the shards,
    restoring the shards on exit. Without FSDP nothing happens."""
    if not is_sharded(accelerator):
        yield
        return
    tensors = gather_adapter(accelerator, models)
    swapped = []
    try:
        if accelerator.is_main_process:
            for component, model in models.items():
                model = accelerator.unwrap_model(model)
                for name, parameter in list(model.named_parameters()):
                    key = f"{component}.{name}"
                    if key not in tensors:
                        continue
                    path, _, attribute = name.rpartition(".")
                    module = model.get_submodule(path)
                    swapped.append((module, attribute, parameter))
                    module._parameters[attribute] = nn.Parameter(tensors[key], requires_grad=parameter.requires_grad)
        yield
    finally:
        for module, attribute, parameter in swapped:
            module._parameters[attribute] = parameter


@contextlib.contextmanager
def whole_model(accelerator, models: dict[str, nn.Module]) -> Iterator[None]:
    """Under FSDP: every sharded module of ``models`` gathered whole and kept whole through forward calls until exit,
    so the main process alone can render samples (and call submodules directly, as pipelines do) without the other
    processes. Enter on every process (the gathering is a collective); each holds the whole model meanwhile. Without
    FSDP nothing happens."""
    if not is_sharded(accelerator):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    from peft_lyco.compat import fsdp2_reshard_settings, restore_fsdp2_reshard_settings

    sharded = [
        module
        for model in models.values()
        for module in accelerator.unwrap_model(model).modules()
        if isinstance(module, FSDPModule)
    ]
    settings = [fsdp2_reshard_settings(module) for module in sharded]
    try:
        for module in sharded:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        yield
    finally:
        for module, setting in zip(sharded, settings):
            module.reshard()
            restore_fsdp2_reshard_settings(module, setting)


def clip_gradients(accelerator, parameters: list[nn.Parameter], max_norm: float) -> None:
    """Clip the trained parameters' gradients to a total norm of ``max_norm``.

    Under FSDP, accelerate 1.15's ``clip_grad_norm_`` given a subset of a model's parameters (the adapter of a frozen
    base) unscales the gradients twice, so an fp16 run stops at its first clip with GradScaler's "unscale_() has
    already been called"; here they are unscaled once and clipped by torch, whose norm of sharded (``DTensor``)
    gradients spans all processes."""
    if not is_sharded(accelerator):
        accelerator.clip_grad_norm_(parameters, max_norm)
        return
    accelerator.unscale_gradients()
    torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
