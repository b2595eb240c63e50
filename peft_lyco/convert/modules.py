"""One adapted module of a kohya/LyCORIS file: read its tensors (algorithm, layout, rank, alpha, options inferred from
shapes and checked against the algorithms' layouts) and write them back in the layouts every consumer reads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..functional import LOHA, LOHA_PARAMS, LOKR, LOKR_PARAMS, LoHaLayout, LoKrLayout, delta_weight, rebuild_tucker
from ..functional.dora import magnitude_shape
from ..functional.lokr import lokr_w1

LORA_PARAMS = ("lora_down.weight", "lora_up.weight")
REFUSED_PARAMS = {
    "lora_mid.weight": "LoCon with a Tucker core (lora_mid) is not supported",
    "lokr_t1": "lokr_t1 is never written by LyCORIS or sd-scripts",
    "scale": "a 'scale' tensor overrides alpha in A1111 only; its meaning is ambiguous",
    "bias": "adapter biases are not supported",
}
FILE_PARAMS = (*LOHA_PARAMS, *LOKR_PARAMS, *LORA_PARAMS, "alpha", "dora_scale", *REFUSED_PARAMS)
# A scaled ΔW entry beyond sqrt(float32 max) overflows to inf as soon as a norm or attention squares the layer's
# output, so the pipeline outputs NaN: such a module (e.g. alpha 1e30) is refused at load.
MAX_SCALED_DELTA = math.sqrt(torch.finfo(torch.float32).max)

Layout = LoHaLayout | LoKrLayout


class LycoFileError(ValueError):
    """A kohya/LyCORIS state dict that cannot be converted; the message lists every offending key or module."""


class ModuleError(ValueError):
    """One module of a file is invalid; collected by the caller and reported together with the module's name."""


@dataclass(frozen=True)
class Geometry:
    """Weight shape ``(out, in, *kernel)`` of the layer an adapter targets (``kernel`` is ``()`` for Linear)."""

    out_features: int
    in_features: int
    kernel: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        """``(out, in, kernel)``, the arguments ``Algorithm.layout`` takes first."""
        return self.out_features, self.in_features, self.kernel

    def describe(self) -> str:
        kind = f"Conv2d {'x'.join(map(str, self.kernel))}" if self.kernel else "Linear"
        return f"{kind} {self.in_features}->{self.out_features}"


@dataclass
class ModuleAdapter:
    """An adapted module: where it lives, its algorithm, its tensors (kohya names, PEFT layouts), rank and alpha.

    ``options`` are the layout options that reproduce ``layout`` through ``loha_layout``/``lokr_layout``;
    ``candidates`` lists every option set found to reproduce it (the converter picks shared defaults from them).
    """

    component: str
    path: str
    algo: str
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    geometry: Geometry
    layout: Layout | None = None
    options: dict[str, Any] = field(default_factory=dict)
    candidates: tuple[dict[str, Any], ...] = ()
    name: str = ""
    dora_scale: torch.Tensor | None = None  # DoRA magnitude, in the shape our layers hold it
    wd_on_output: bool | None = None  # DoRA's axis (None: no DoRA)

    @property
    def dora_options(self) -> dict[str, bool]:
        """The module's DoRA options as config fields (``weight_decompose``, ``wd_on_output``)."""
        return {"weight_decompose": self.dora_scale is not None, "wd_on_output": self.wd_on_output is not False}


# ------------------------------------------------------------------------------------------------------- reading
def algo_of(params: Mapping[str, Any]) -> str | None:
    """``"loha"``, ``"lokr"``, ``"lora"`` or ``None`` from a module's parameter names."""
    if any(name in params for name in LOHA_PARAMS):
        return "loha"
    if any(name in params for name in LOKR_PARAMS):
        return "lokr"
    if any(name in params for name in LORA_PARAMS):
        return "lora"
    return None


def read_module(
    params: Mapping[str, torch.Tensor],
    component: str,
    path: str,
    geometry: Geometry | None,
    kernel_hint: tuple[int, ...] | None = None,
    preferred_factor: int | None = None,
    wd_on_output_hint: bool | None = None,
) -> ModuleAdapter:
    """Infer one module from its file tensors; ``geometry`` is the target layer's (``None``: inferred from the tensors).

    ``wd_on_output_hint`` (from the file's ``ss_network_args``) resolves the axis of a ``dora_scale`` whose shape does
    not say it. Raises ``ModuleError`` with a message that names the problem; the caller adds the module name.
    """
    refused = [f"{name}: {REFUSED_PARAMS[name]}" for name in params if name in REFUSED_PARAMS]
    if refused:
        raise ModuleError("; ".join(refused))
    peaks = {}
    for name, tensor in params.items():
        if not torch.is_floating_point(tensor):
            raise ModuleError(f"{name} has dtype {tensor.dtype}; adapter tensors must be floating point")
        if name == "alpha":
            continue
        if name == "dora_scale":
            if tensor.numel() == 0 or not torch.isfinite(tensor.abs().amax()):
                raise ModuleError(f"dora_scale must be a non-empty finite tensor, got shape {tuple(tensor.shape)}")
            continue
        if tensor.dim() < 2 or tensor.numel() == 0:
            raise ModuleError(f"{name} must be a non-empty matrix or conv kernel, got shape {tuple(tensor.shape)}")
        peaks[name] = float(tensor.abs().amax())  # one reduction: NaN and inf propagate (5x faster than .all())
        if not math.isfinite(peaks[name]):
            raise ModuleError(f"{name} contains NaN or infinite values")
    algo = algo_of(params)
    tensors = {name: tensor for name, tensor in params.items() if name not in ("alpha", "dora_scale")}
    alpha = _alpha(params.get("alpha"))
    if algo == "loha":
        module = _read_loha(tensors, alpha, geometry, kernel_hint)
    elif algo == "lokr":
        module = _read_lokr(tensors, alpha, geometry, kernel_hint, preferred_factor)
    elif algo == "lora":
        module = _read_lora(tensors, alpha, geometry)
    else:
        raise ModuleError(f"no adapter tensors, only {sorted(params)}")
    if not math.isfinite(module.alpha):
        raise ModuleError(f"alpha is {module.alpha}; only LoKr modules with both halves full may carry any alpha")
    if "dora_scale" in params:
        if algo == "lora":
            raise ModuleError("dora_scale on a plain LoRA module is not supported (PEFT's LoRA DoRA uses another axis)")
        module.wd_on_output, module.dora_scale = read_dora_scale(
            params["dora_scale"], module.geometry, wd_on_output_hint
        )
    _check_scaled_delta(module, peaks)
    module.component, module.path = component, path
    return module


def read_dora_scale(tensor: torch.Tensor, geometry: Geometry, hint: bool | None) -> tuple[bool, torch.Tensor]:
    """``(on_output, magnitude)`` of a file's ``dora_scale`` on a layer: the axis follows from the shape (``(out, 1,
    …)`` per output row, ``(1, in, …)`` per input column); a 1-D or otherwise ambiguous tensor takes ``hint`` (the
    file's ``ss_network_args``) and is refused without one. The magnitude comes back in our layers' shape."""
    weight_shape = (geometry.out_features, geometry.in_features, *geometry.kernel)
    shapes = {axis: magnitude_shape(weight_shape, axis) for axis in (True, False)}
    if tensor.dim() >= 2:
        fits = [axis for axis, shape in shapes.items() if _fits(tuple(tensor.shape), shape)]
    else:
        fits = [axis for axis, shape in shapes.items() if tensor.numel() == math.prod(shape)]
    if not fits:
        raise ModuleError(
            f"dora_scale has shape {tuple(tensor.shape)}, which fits neither axis of a {geometry.describe()} layer "
            f"(expected {shapes[True]} per output row or {shapes[False]} per input column)"
        )
    if len(fits) == 1 and tensor.dim() >= 2:
        axis = fits[0]
    elif hint is None:
        raise ModuleError(
            f"dora_scale of shape {tuple(tensor.shape)} does not say its axis on a {geometry.describe()} layer and the "
            "file's ss_network_args has no dora_wd/wd_on_output to tell it; refusing to guess (a wrong axis decodes "
            "to noise)"
        )
    elif hint not in fits:
        raise ModuleError(
            f"dora_scale has shape {tuple(tensor.shape)}, but ss_network_args says wd_on_output={hint}, which needs "
            f"{shapes[hint]}"
        )
    else:
        axis = hint
    return axis, tensor.reshape(shapes[axis])


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """``shape`` equals ``expected`` up to trailing size-1 dims (2-D magnitudes of 1x1 convs)."""

    def strip(dims):
        dims = tuple(dims)
        while len(dims) > 2 and dims[-1] == 1:
            dims = dims[:-1]
        return dims

    return strip(shape) == strip(expected)


def _check_scaled_delta(module: ModuleAdapter, peaks: Mapping[str, float]) -> None:
    """Refuse a module whose scaled ΔW has entries beyond ``MAX_SCALED_DELTA`` (or non-finite ones).

    A cheap bound (each factor's largest entry times its largest dimension, which bounds every contraction) clears
    ordinary modules without computing ΔW; only modules over the bound get their ΔW built and measured.
    """
    scale = abs(module.alpha / module.rank)
    bound = scale * math.prod(peaks[name] * max(tensor.shape) for name, tensor in module.tensors.items())
    if bound < MAX_SCALED_DELTA:
        return
    factors = {name: tensor.to(torch.float32) for name, tensor in module.tensors.items()}
    if module.algo == "lora":
        delta = (factors["lora_up.weight"].flatten(1) @ factors["lora_down.weight"].flatten(1)) * scale
    else:
        delta = delta_weight(factors, scale)
    peak = float(delta.abs().amax())
    if not peak < MAX_SCALED_DELTA:
        raise ModuleError(
            f"alpha {module.alpha:g} / rank {module.rank} makes ΔW reach {peak:.3g}; beyond {MAX_SCALED_DELTA:.3g} a "
            "float32 forward overflows to inf/NaN (a corrupt alpha or diverged training)"
        )


def _alpha(tensor: torch.Tensor | None) -> float | None:
    """The module's alpha; ``None`` when missing or 0 (both mean alpha = rank, as LyCORIS and sd-scripts read it)."""
    if tensor is None:
        return None
    if tensor.numel() != 1:
        raise ModuleError(f"alpha must hold one value, got shape {tuple(tensor.shape)}")
    value = float(tensor.reshape(()).item())
    return None if value == 0 else value


def _require(tensors: Mapping[str, torch.Tensor], required: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in tensors]
    extra = [name for name in tensors if name not in allowed]
    if missing or extra:
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
        raise ModuleError("incomplete or mixed key set: " + ", ".join(p for p in parts if p))


def _dims(tensors: Mapping[str, torch.Tensor], names: dict[str, int]) -> None:
    for name, ndim in names.items():
        if name in tensors and tensors[name].dim() != ndim:
            raise ModuleError(f"{name} must be {ndim}-D, got shape {tuple(tensors[name].shape)}")


def _check_layout(tensors: dict[str, torch.Tensor], layout: Layout, geometry: Geometry) -> None:
    expected = layout.shapes
    got = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if got != expected:
        raise ModuleError(f"shapes {got} do not fit a {geometry.describe()} layer (expected {expected})")


def _with_kernel(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` viewed as ``shape`` when the two differ only by trailing size-1 dims (2-D 1x1-conv factors)."""

    def strip(dims):
        dims = tuple(dims)
        while dims and dims[-1] == 1 and len(dims) > 2:
            dims = dims[:-1]
        return dims

    return tensor.reshape(shape) if strip(tensor.shape) == strip(shape) else tensor


def _flat_in(flat: int, kernel: tuple[int, ...], what: str) -> int:
    size = math.prod(kernel)
    if flat % size:
        raise ModuleError(f"{what} has {flat} columns, not a multiple of the kernel size {size}")
    return flat // size


def _read_loha(tensors, alpha, geometry, kernel_hint) -> ModuleAdapter:
    tucker = "hada_t1" in tensors or "hada_t2" in tensors
    factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    _require(tensors, factors + (("hada_t1", "hada_t2") if tucker else ()), LOHA_PARAMS)
    _dims(tensors, {"hada_w1_a": 2, "hada_w2_a": 2, "hada_t1": 4, "hada_t2": 4})
    rank = tensors["hada_w1_b"].shape[0]
    if not tucker:  # a 4-D flat factor (r, in, kh, kw) is written 2-D (r, in*kh*kw)
        for name in ("hada_w1_b", "hada_w2_b"):
            tensors[name] = tensors[name].reshape(tensors[name].shape[0], -1)
    if geometry is None:
        if tucker:
            geometry = Geometry(
                tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1], tuple(tensors["hada_t1"].shape[2:])
            )
        else:
            kernel = kernel_hint or ()
            in_features = _flat_in(tensors["hada_w1_b"].shape[1], kernel, "hada_w1_b")
            geometry = Geometry(tensors["hada_w1_a"].shape[0], in_features, kernel)
    options = {"use_tucker": tucker}
    layout = LOHA.layout(*geometry.shape, rank, options)
    _check_layout(tensors, layout, geometry)
    # use_tucker only matters for kxk convs; elsewhere both values reproduce the module and both get a vote
    candidates = tuple(
        {"use_tucker": value}
        for value in (tucker, not tucker)
        if LOHA.layout(*geometry.shape, rank, {"use_tucker": value}) == layout
    )
    return ModuleAdapter(
        "", "", "loha", tensors, rank, rank if alpha is None else alpha, geometry, layout, options, candidates
    )


def _read_lokr(tensors, alpha, geometry, kernel_hint, preferred_factor) -> ModuleAdapter:
    w1_decomposed = "lokr_w1_a" in tensors or "lokr_w1_b" in tensors
    w2_mode = "full" if "lokr_w2" in tensors else ("tucker" if "lokr_t2" in tensors else "lowrank")
    w1 = ("lokr_w1_a", "lokr_w1_b") if w1_decomposed else ("lokr_w1",)
    w2 = {"full": ("lokr_w2",), "tucker": ("lokr_w2_a", "lokr_w2_b", "lokr_t2"), "lowrank": ("lokr_w2_a", "lokr_w2_b")}
    _require(tensors, w1 + w2[w2_mode], w1 + w2[w2_mode])
    _dims(tensors, {"lokr_w1": 2, "lokr_w1_a": 2, "lokr_w1_b": 2, "lokr_w2_a": 2, "lokr_t2": 4})
    if w2_mode == "lowrank":
        tensors["lokr_w2_b"] = tensors["lokr_w2_b"].reshape(tensors["lokr_w2_b"].shape[0], -1)
    if w2_mode == "full" and tensors["lokr_w2"].dim() not in (2, 4):
        raise ModuleError(f"lokr_w2 must be 2-D or 4-D, got shape {tuple(tensors['lokr_w2'].shape)}")
    ranks = {name: tensors[name].shape[0] for name in ("lokr_t2", "lokr_w2_b", "lokr_w1_b") if name in tensors}
    if "lokr_t2" in ranks:
        ranks.pop("lokr_w2_b")  # Tucker w2_b is (r, in_n) too, same rank
    if len(set(ranks.values())) > 1:
        raise ModuleError(f"w1 and w2 have different ranks {ranks}; LyCORIS uses one rank for both halves")
    if ranks:
        rank = next(iter(ranks.values()))
    else:  # both halves full: the rank is not in the tensors; writers store alpha = rank and readers use scale 1.
        # An fp16 file of a "full dimension" run stores alpha 100000 as inf; any alpha is ignored here.
        rank = int(alpha) if alpha is not None and math.isfinite(alpha) and alpha >= 1 and alpha == int(alpha) else 1
        alpha = float(rank)
    if geometry is None:
        geometry = _lokr_geometry(tensors, w1_decomposed, w2_mode, kernel_hint)
    if w2_mode == "full" and geometry.kernel:  # sd-scripts writes a 1x1 conv's full w2 2-D
        tensors["lokr_w2"] = _with_kernel(tensors["lokr_w2"], (*tensors["lokr_w2"].shape[:2], *geometry.kernel))
    shapes = tuple(sorted((name, tuple(tensor.shape)) for name, tensor in tensors.items()))
    candidates = lokr_candidates(geometry, rank, shapes, preferred_factor)
    if not candidates:
        raise ModuleError(
            f"no LoKr layout of a {geometry.describe()} layer at rank {rank} reproduces the shapes {dict(shapes)} "
            "(tried every factor, full_matrix and unbalanced_factorization)"
        )
    candidates = tuple(dict(options) for options in candidates)  # the cached tuple is shared
    options = candidates[0]
    layout = LOKR.layout(*geometry.shape, rank, options, warn=False)
    return ModuleAdapter(
        "", "", "lokr", tensors, rank, rank if alpha is None else alpha, geometry, layout, options, candidates
    )


def _lokr_geometry(tensors, w1_decomposed, w2_mode, kernel_hint) -> Geometry:
    if w1_decomposed:
        out_l, in_m = tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]
    else:
        out_l, in_m = tensors["lokr_w1"].shape
    if w2_mode == "full":
        out_k, in_n = tensors["lokr_w2"].shape[:2]
        kernel = tuple(tensors["lokr_w2"].shape[2:]) or (kernel_hint or ())
    elif w2_mode == "tucker":
        out_k, in_n = tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1]
        kernel = tuple(tensors["lokr_t2"].shape[2:])
    else:
        kernel = kernel_hint or ()
        out_k, in_n = tensors["lokr_w2_a"].shape[0], _flat_in(tensors["lokr_w2_b"].shape[1], kernel, "lokr_w2_b")
    return Geometry(out_l * out_k, in_m * in_n, kernel)


@lru_cache(maxsize=4096)
def lokr_candidates(
    geometry: Geometry,
    rank: int,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    preferred_factor: int | None = None,
) -> tuple[dict[str, Any], ...]:
    """Every LoKr option set that reproduces ``shapes`` on this layer, plainest first (flags off before on).

    Factors tried: the file's own (from metadata), -1, the four Kronecker halves; only if none fits, every integer up
    to the largest half (a non-dividing factor acts like the largest divisor below it, so that range covers all).
    """
    wanted = dict(shapes)
    out_l = wanted["lokr_w1"][0] if "lokr_w1" in wanted else wanted["lokr_w1_a"][0]
    in_m = wanted["lokr_w1"][1] if "lokr_w1" in wanted else wanted["lokr_w1_b"][1]
    halves = (out_l, in_m, geometry.out_features // out_l, geometry.in_features // in_m)
    first = [f for f in (preferred_factor, -1, *halves) if f is not None and (f == -1 or f > 0)]
    flags = ("decompose_both", "use_tucker", "full_matrix", "unbalanced_factorization")
    found: list[dict[str, Any]] = []
    for factors in (list(dict.fromkeys(first)), range(1, 1 + max(halves))):
        for factor, *values in itertools.product(factors, *[(False, True)] * len(flags)):
            options = {"factor": factor, **dict(zip(flags, values))}
            if options not in found and LOKR.layout(*geometry.shape, rank, options, warn=False).shapes == wanted:
                found.append(options)
        if found:
            break
    return tuple(found)


def _read_lora(tensors, alpha, geometry) -> ModuleAdapter:
    _require(tensors, LORA_PARAMS, LORA_PARAMS)
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = down.shape[0]
    if geometry is None:
        geometry = Geometry(up.shape[0], down.shape[1], tuple(down.shape[2:]))
    g = geometry
    if g.kernel:  # PEFT LoRA on a conv: lora_A (r, in, kh, kw), lora_B (out, r, 1, 1); 1x1 files may be 2-D
        expected = {
            "lora_down.weight": (rank, g.in_features, *g.kernel),
            "lora_up.weight": (g.out_features, rank, 1, 1),
        }
    else:
        expected = {"lora_down.weight": (rank, g.in_features), "lora_up.weight": (g.out_features, rank)}
    tensors = {
        name: _with_kernel(tensor, expected[name])
        for name, tensor in (("lora_down.weight", down), ("lora_up.weight", up))
    }
    got = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if got != expected:
        raise ModuleError(f"shapes {got} do not fit a {g.describe()} layer (expected {expected})")
    return ModuleAdapter("", "", "lora", tensors, rank, rank if alpha is None else alpha, geometry)


# ------------------------------------------------------------------------------------------------------- writing
def kohya_tensors(module: ModuleAdapter, lokr_tucker: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors and alpha a file gets for ``module`` (the writer rules of docs/conversion.md).

    Tucker LoKr is rebuilt into a full 4-D ``lokr_w2`` unless ``lokr_tucker`` (ComfyUI skips ``lokr_t2`` layers); w1 is
    then made full too and the module's scale is baked into ``lokr_w1`` with alpha = rank, because readers use scale 1
    for two full halves. Both-full modules always get alpha = rank.
    """
    layout = module.layout
    if module.algo == "lokr" and layout.w2_mode == "tucker" and not lokr_tucker:
        t = module.tensors
        compute = torch.promote_types(t["lokr_t2"].dtype, torch.float32)
        w2 = rebuild_tucker(t["lokr_t2"].to(compute), t["lokr_w2_a"].to(compute), t["lokr_w2_b"].to(compute))
        w1 = lokr_w1({name: tensor.to(compute) for name, tensor in t.items()})
        dtype = t["lokr_t2"].dtype
        baked = (w1 * (module.alpha / module.rank)).to(dtype)
        return _with_dora({"lokr_w1": baked, "lokr_w2": w2.contiguous().to(dtype)}, module), float(module.rank)
    if module.algo == "lokr" and layout.both_full:
        return _with_dora(dict(module.tensors), module), float(module.rank)
    return _with_dora(dict(module.tensors), module), float(module.alpha)


def _with_dora(tensors: dict[str, torch.Tensor], module: ModuleAdapter) -> dict[str, torch.Tensor]:
    """The module's tensors plus its ``dora_scale`` (LyCORIS' shapes: ``(out, 1, …)`` or ``(1, in, …)``)."""
    if module.dora_scale is not None:
        tensors["dora_scale"] = module.dora_scale
    return tensors
