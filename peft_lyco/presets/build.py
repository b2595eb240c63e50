"""``build_config``: sd-scripts' LoHa/LoKr module selection and per-module ranks as an explicit PEFT config.

Selection (sd-scripts ``networks/network_base.py`` semantics): candidates come from the architecture's containers;
a candidate is dropped when an exclude regex (user's + the architecture's defaults) fullmatches its path unless an
include regex also does; its rank is the first fullmatching ``network_reg_dims`` entry (alpha = network_alpha), else
``network_dim``/``network_alpha`` for Linear and 1x1 convs, else ``conv_dim``/``conv_alpha`` for kxk convs (kxk convs
are skipped without ``conv_dim``); rank 0 skips the module.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..functional import check_alpha
from ..tuners import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer, LycoConfig
from ..tuners.options import layer_geometry, resolve_layer_spec
from ..tuners.targets import adaptable_layers, exact_pattern_key, exact_target_modules, unwrap
from .architectures import detect_architecture
from .network_args import NetworkArgs, NetworkArgsError, parse_network_args

logger = logging.getLogger(__name__)

ALGORITHMS = {"loha": (LoHaConfig, LoHaLayer), "lokr": (LoKrConfig, LoKrLayer)}
LOKR_ONLY = ("factor", "decompose_both", "full_matrix", "unbalanced_factorization")
CONFIG_PASSTHROUGH = ("init_weights", "modules_to_save", "inference_mode")


@dataclass(frozen=True)
class ModuleRow:
    """One adapted module as the tuner will build it."""

    name: str
    algo: str
    mode: str
    rank: int
    alpha: float
    scale: float
    params: int


def _is_kxk(layer: nn.Module) -> bool:
    return any(k != 1 for k in layer_geometry(layer)[2])


def _fullmatch_any(patterns: Sequence[str], path: str) -> bool:
    return any(re.fullmatch(pattern, path) for pattern in patterns)


def _rank_alpha(
    path: str, layer: nn.Module, args: NetworkArgs, network_dim: int, network_alpha: float, *, preset: bool
) -> tuple[int, float] | None:
    """Per-module (rank, alpha), or None when the module is skipped.

    With a preset, kxk convs are adapted only with ``conv_dim`` (sd-scripts); with explicit ``target_modules`` they
    fall back to ``network_dim``/``network_alpha`` unless ``conv_dim`` is given (as a PEFT config would).
    """
    for pattern, dim in args.network_reg_dims:
        if re.fullmatch(pattern, path):
            return (dim, network_alpha) if dim else None
    if _is_kxk(layer) and (preset or args.conv_dim is not None):
        return (args.conv_dim, _conv_alpha(args)) if args.conv_dim else None
    return (network_dim, network_alpha) if network_dim else None


def _conv_alpha(args: NetworkArgs) -> float:
    """sd-scripts: ``conv_alpha`` defaults to 1.0 when ``conv_dim`` is given alone."""
    return 1.0 if args.conv_alpha is None else args.conv_alpha


def _candidates(model: nn.Module, args: NetworkArgs, target_modules) -> list[tuple[str, nn.Module]]:
    if target_modules is None:
        arch = detect_architecture(model)
        return arch.candidates(model, conv=args.conv_dim is not None, adapter=args.train_llm_adapter)
    probe = LoHaConfig(target_modules=target_modules)
    return [(path, layer) for path, layer in adaptable_layers(model) if check_target_module_exists(probe, path)]


def build_config(
    algo: str,
    model: nn.Module,
    *,
    network_dim: int | None = 4,
    network_alpha: float | None = 1.0,
    network_args: Sequence[str] | None = None,
    target_modules: list[str] | str | None = None,
    **kwargs: Any,
) -> LoHaConfig | LoKrConfig:
    """A ``LoHaConfig``/``LoKrConfig`` for ``model`` that adapts exactly the modules sd-scripts would.

    ``network_args`` takes sd-scripts strings (``["conv_dim=16", "factor=4", ...]``); the same options may be
    keywords with Python values. ``init_weights``, ``modules_to_save`` and ``inference_mode`` pass through to the
    config. ``target_modules`` (PEFT names/suffixes/regex) replaces the architecture's selection (needed for
    unknown models); then kxk convs use ``conv_dim`` or, without it, ``network_dim``. The result lists every module
    path in ``target_modules`` with per-module ``rank_pattern``/``alpha_pattern`` where they differ from the
    defaults. ``verbose=True`` prints the per-module table.
    """
    algo_key = str(algo).lower()
    if algo_key not in ALGORITHMS:
        raise ValueError(f"algo must be 'loha' or 'lokr', got {algo!r}")
    config_cls, _ = ALGORITHMS[algo_key]
    passthrough = {name: kwargs.pop(name) for name in CONFIG_PASSTHROUGH if name in kwargs}
    args = parse_network_args(network_args, **kwargs)
    network_dim, network_alpha = _check_network_dim_alpha(network_dim, network_alpha)
    if algo_key == "loha":
        given = [name for name in LOKR_ONLY if getattr(args, name) is not None]
        if given:
            raise NetworkArgsError(f"network arguments {given} apply only to algo='lokr'")
    model = unwrap(model)
    plan = _plan(model, args, network_dim, network_alpha, target_modules)
    if not plan:
        raise ValueError(
            f"no module of {type(model).__name__} is selected (check exclude_patterns, network_reg_dims and "
            "network_dim/conv_dim)"
        )
    config = _make_config(config_cls, plan, args, network_dim, network_alpha, passthrough)
    config.target_modules = exact_target_modules(config.target_modules, (name for name, _ in model.named_modules()))
    # the rows validate every layout now and log LoKr's full-matrix fallback at build time, as sd-scripts does
    rows = describe(config, model, modules=[(path, layer) for path, layer, _, _ in plan])
    if args.verbose:
        print(format_table(rows))
    return config


def _check_network_dim_alpha(network_dim: Any, network_alpha: Any) -> tuple[int, float]:
    """sd-scripts defaults: ``network_dim`` None → 4, ``network_alpha`` None → 1.0."""
    network_dim = 4 if network_dim is None else network_dim
    network_alpha = 1.0 if network_alpha is None else network_alpha
    if isinstance(network_dim, bool) or not isinstance(network_dim, int) or network_dim < 0:
        raise ValueError(f"network_dim must be an integer >= 0, got {network_dim!r}")
    check_alpha(network_alpha, "network_alpha")
    if network_alpha < 0:
        raise ValueError(f"network_alpha must be a finite number >= 0, got {network_alpha!r}")
    return network_dim, float(network_alpha)


def _plan(model, args, network_dim, network_alpha, target_modules) -> list[tuple[str, nn.Module, int, float]]:
    """``(path, layer, rank, alpha)`` of every module to adapt, after excludes/includes and rank resolution."""
    excludes = args.exclude_patterns
    if target_modules is None:
        excludes = excludes + detect_architecture(model).default_excludes
    candidates = _candidates(model, args, target_modules)
    plan = []
    for path, layer in candidates:
        if _fullmatch_any(excludes, path) and not _fullmatch_any(args.include_patterns, path):
            continue
        ranked = _rank_alpha(path, layer, args, network_dim, network_alpha, preset=target_modules is None)
        if ranked is not None:
            plan.append((path, layer, *ranked))
    _log_unused_patterns(args, [path for path, _ in candidates])
    return plan


def _log_unused_patterns(args: NetworkArgs, paths: list[str]) -> None:
    """Patterns that match no candidate usually target another component or another naming (e.g. SGM paths)."""
    named = [("exclude_patterns", p) for p in args.exclude_patterns] + [
        ("include_patterns", p) for p in args.include_patterns
    ]
    named += [("network_reg_dims", p) for p, _ in args.network_reg_dims]
    for option, pattern in named:
        if not any(re.fullmatch(pattern, path) for path in paths):
            logger.info("%s pattern %r matches no module of this model", option, pattern)


def _make_config(config_cls, plan, args: NetworkArgs, network_dim, network_alpha, passthrough) -> LycoConfig:
    """The config whose defaults are network_dim/alpha (and conv_dim/alpha); exceptions become exact-path patterns."""
    linear_ranks = Counter(rank for _, layer, rank, _ in plan if not _is_kxk(layer))
    r = network_dim or (linear_ranks.most_common(1)[0][0] if linear_ranks else plan[0][2])
    conv_r = args.conv_dim or None
    conv_alpha = _conv_alpha(args) if conv_r else None
    rank_pattern, alpha_pattern = {}, {}
    for path, layer, rank, alpha in plan:
        kxk = _is_kxk(layer)
        default_rank = conv_r if kxk and conv_r else r
        default_alpha = conv_alpha if kxk and conv_r else network_alpha
        key = exact_pattern_key(path)
        if rank != default_rank:
            rank_pattern[key] = rank
        if alpha != default_alpha:
            alpha_pattern[key] = alpha
    options: dict[str, Any] = {
        "r": r,
        "alpha": network_alpha,
        "conv_r": conv_r,
        "conv_alpha": conv_alpha,
        "use_tucker": args.use_tucker,
        "rank_dropout": args.rank_dropout,
        "module_dropout": args.module_dropout,
        "dropout": args.dropout or 0.0,
        "weight_decompose": args.dora_wd,
        "wd_on_output": args.wd_on_output,
        "use_scalar": args.use_scalar,
        "rs_lora": args.rs_lora,
        "target_modules": [path for path, _, _, _ in plan],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        **passthrough,
    }
    if args.rank_dropout_scale is not None:
        options["rank_dropout_scale"] = args.rank_dropout_scale
    if config_cls is LoKrConfig:
        options["factor"] = -1 if args.factor is None else args.factor
        for name in LOKR_ONLY[1:]:
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    return config_cls(**options)


def describe(
    config: LycoConfig, model: nn.Module, modules: Sequence[tuple[str, nn.Module]] | None = None
) -> list[ModuleRow]:
    """The adapter each targeted module of ``model`` gets under ``config`` (same resolution as the tuner).

    ``modules`` limits the rows to given ``(path, layer)`` pairs; by default every Linear/Conv2d the config targets.
    """
    algo = "lokr" if isinstance(config, LoKrConfig) else "loha"
    layer_cls = ALGORITHMS[algo][1]
    if modules is None:
        modules = [
            (path, layer) for path, layer in adaptable_layers(unwrap(model)) if check_target_module_exists(config, path)
        ]
    rows = []
    for path, layer in modules:
        spec = resolve_layer_spec(config, path, layer)
        layout = layer_cls.algorithm.layout(*layer_geometry(layer, path), spec.rank, spec.options)
        scale = layer_cls.algorithm.scale(layout, spec.alpha, spec.rank)
        params = sum(prod(shape) for shape in layout.shapes.values())
        rows.append(ModuleRow(path, algo, layout.mode, spec.rank, spec.alpha, scale, params))
    return rows


def format_table(rows: Sequence[ModuleRow]) -> str:
    """A fixed-width table: module, algo, mode, rank, alpha, scale, parameter count, plus a total line."""
    width = max([len("module")] + [len(row.name) for row in rows])
    lines = [f"{'module':<{width}}  algo  {'mode':<11} {'rank':>6} {'alpha':>9} {'scale':>9} {'params':>12}"]
    for row in rows:
        lines.append(
            f"{row.name:<{width}}  {row.algo:<4}  {row.mode:<11} {row.rank:>6} {row.alpha:>9g} {row.scale:>9.4g} "
            f"{row.params:>12,}"
        )
    lines.append(f"{len(rows)} modules, {sum(row.params for row in rows):,} parameters")
    return "\n".join(lines)
