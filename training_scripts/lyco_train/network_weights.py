"""``--network_weights`` / ``--dim_from_weights``: start training from a kohya/LyCORIS LoHa/LoKr file.

The file is read with the converter (every naming it reads: sd-scripts/kohya, LyCORIS, diffusers-style paths), its
modules are matched against the models before any adapter is added, and its tensors are copied bit for bit into the
adapters the run trains. Without ``--dim_from_weights`` the network is built from ``--network_dim/alpha/args`` as
usual and the file must fit it exactly (same modules, layouts and scales; modules the file lacks start fresh, as
sd-scripts loads with ``strict=False``); with it the network is the file's (modules, ranks, alphas, layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import inject_adapter_in_model

from peft_lyco.convert import kohya_to_peft, load_kohya
from peft_lyco.convert.kohya import KohyaConversion
from peft_lyco.convert.modules import ModuleAdapter
from peft_lyco.tuners import LycoLayer

from .network import ADAPTER_NAME, inject


class NetworkWeightsError(ValueError):
    """A ``--network_weights`` file that cannot start this run; the message names the file and the modules."""


@dataclass
class NetworkWeights:
    """A ``--network_weights`` file read against the models: its modules per component, its algorithm."""

    path: str
    conversion: KohyaConversion

    @property
    def algo(self) -> str:
        return next(iter(self.conversion.values())).modules[0].algo

    def modules(self, component: str) -> list[ModuleAdapter]:
        return self.conversion[component].modules if component in self.conversion else []

    def most_common(self, attribute: str):
        values = [getattr(m, attribute) for adapter in self.conversion.values() for m in adapter.modules]
        return max(set(values), key=values.count)


def read_network_weights(path: str, model_type: str, components: dict[str, torch.nn.Module]) -> NetworkWeights:
    """Read ``path`` against ``components`` (the models before any adapter is added); refuse LoRA and mixed files."""
    try:
        state_dict, metadata = load_kohya(path)
        conversion = kohya_to_peft(state_dict, metadata=metadata, model_type=model_type, model=components)
    except (ValueError, TypeError) as err:
        raise NetworkWeightsError(f"--network_weights '{path}': {err}") from err
    algos = {m.algo for adapter in conversion.values() for m in adapter.modules}
    if not algos <= {"loha", "lokr"} or len(algos) != 1:
        raise NetworkWeightsError(
            f"--network_weights '{path}' holds {sorted(algos)} modules; training continues one LoHa or LoKr network"
        )
    return NetworkWeights(str(path), conversion)


def inject_from_weights(weights: NetworkWeights, components: dict[str, torch.nn.Module]) -> dict[str, object]:
    """``--dim_from_weights``: add to each component the adapter the file describes; return the configs by component
    (components the file does not adapt get none)."""
    configs = {}
    for name, module in components.items():
        module.requires_grad_(False)
        if name in weights.conversion:
            config = weights.conversion[name].config
            inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
            configs[name] = config
    return configs


def _check_fits(layer, module: ModuleAdapter, path: str) -> str | None:
    """Why the file module cannot be copied into ``layer`` bit-exactly, or None."""
    if not isinstance(layer, LycoLayer) or ADAPTER_NAME not in layer.layouts:
        return "the network has no adapter there (other --network_args or targets?)"
    if layer.algorithm.name != module.algo:
        return f"the file holds {module.algo}, the network {layer.algorithm.name}"
    if layer.layouts[ADAPTER_NAME] != module.layout:
        return f"layout {module.layout} in the file, {layer.layouts[ADAPTER_NAME]} in the network (other rank/factor?)"
    file_scale = layer.algorithm.scale(module.layout, module.alpha, module.rank, layer.rs_lora[ADAPTER_NAME])
    if file_scale != layer.base_scale[ADAPTER_NAME]:
        return (
            f"scale alpha/dim = {file_scale:g} in the file (alpha {module.alpha:g}, dim {module.rank}), "
            f"{layer.base_scale[ADAPTER_NAME]:g} in the network"
        )
    return None


def load_network_weights(weights: NetworkWeights, components: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Copy the file's tensors into the adapters of ``components`` (the trained ones), bit for bit.

    Every file module of a trained component must fit its adapter exactly (else ``NetworkWeightsError`` listing the
    modules and the fix); returns per component how many modules were loaded and how many start fresh.
    """
    problems, fitting = [], []
    for component, model in components.items():
        for module in weights.modules(component):
            layer = model.get_submodule(module.path)
            problem = _check_fits(layer, module, module.path)
            if problem:
                problems.append(f"{module.name} ({component} '{module.path}'): {problem}")
            fitting.append((layer, module))
    if problems:  # checked before anything is copied
        raise NetworkWeightsError(
            f"--network_weights '{weights.path}' does not fit the network built from --network_dim/--network_alpha/"
            "--network_args (add --dim_from_weights to take the file's network):\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for layer, module in fitting:
            for name, tensor in module.tensors.items():
                getattr(layer, name)[ADAPTER_NAME].copy_(tensor)
    report = {}
    for component, model in components.items():
        loaded = len(weights.modules(component))
        adapted = sum(isinstance(m, LycoLayer) and ADAPTER_NAME in m.layouts for m in model.modules())
        report[component] = (loaded, adapted - loaded)
    return report


def add_network(
    args, model_type: str, components: dict[str, torch.nn.Module], trained: dict[str, torch.nn.Module], log=print
) -> dict[str, torch.nn.Module]:
    """Add the run's adapters to ``trained`` (a subset of all ``components``): from the options, or from
    ``--network_weights`` with ``--dim_from_weights``, then load ``--network_weights``. Returns the components that
    got an adapter (with ``--dim_from_weights``, those the file adapts)."""
    weights = read_network_weights(args.network_weights, model_type, components) if args.network_weights else None
    if weights is not None and args.dim_from_weights:
        args.algo = weights.algo
        args.network_dim, args.network_alpha = weights.most_common("rank"), weights.most_common("alpha")
        configs = inject_from_weights(weights, trained)
        skipped = sorted(set(trained) - set(configs))
        if skipped:
            log(f"--dim_from_weights: the file adapts nothing in {', '.join(skipped)}; not trained")
        trained = {name: model for name, model in trained.items() if name in configs}
        if not trained:
            raise NetworkWeightsError(f"--network_weights '{weights.path}' adapts none of the trained components")
    else:
        inject(args, trained)
    if weights is not None:
        report = load_network_weights(weights, trained)
        ignored = sorted(set(weights.conversion) - set(trained))
        log(
            f"loaded --network_weights {weights.path}: "
            + ", ".join(
                f"{name} {done} modules" + (f" ({fresh} start fresh)" if fresh else "")
                for name, (done, fresh) in report.items()
            )
            + (f"; not trained, ignored: {', '.join(ignored)}" if ignored else "")
        )
    return trained
