"""Reuse an unmerged adapted layer's ``W + ΣΔW`` across calls without gradients (sampling, diffusers inference).

Without gradients an adapted layer runs one op on ``W + ΣΔW``, which it builds afresh on every call: a weight-sized
ΔW per adapter and a weight-sized sum, each step of every image. This cache keeps, per layer, the weight exactly as
that call builds it (same function, same compute dtype, so outputs are bit for bit the uncached ones) and hands it
back while nothing it was built from changed:

* the base weight and every tensor of the active adapters (factors, ``use_scalar``'s scalar, DoRA's magnitude):
  the same objects (held by weak reference), the same storage (``data_ptr``), the same in-place version
  (``_version``, bumped by optimizer steps, ``copy_``, ``load_state_dict``), dtype and device;
* which adapters are active and in which order, each one's scale and DoRA multiplier (``set_scale``,
  ``scale_layer``, diffusers' ``set_adapters`` weights), the call's compute dtype (input dtype, autocast) and whether
  the layer sums into its base weight or adds ΣΔW to its base's output.

It is consulted only when gradients are off, the layer is in eval mode (training draws rank and module dropout per
call), no rank-dropout mask is present and no ``torch.compile`` trace is running (a compiled call builds the weight
inside its graph, as without the cache). Merging, unmerging and deleting adapters free the layer's entry.

Memory: a budget in bytes across all layers (0 turns the cache off; the default, see ``DEFAULT_BUDGET``). Entries
are admitted first come, first served and stay while valid: a denoiser calls every layer once per step in the same
order, so an LRU cache smaller than the model would evict each entry just before its next use and never hit, while
first-come keeps a fixed share of the layers hitting. A layer whose entry went stale replaces it (the old one is
freed first); when a new entry does not fit, entries whose tensors changed or whose layer is gone are freed first.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..functional import DeltaTerm
from ..functional.adapted import compute_dtype, inference_weight

if TYPE_CHECKING:
    from .layer import LycoLayer

__all__ = [
    "DEFAULT_BUDGET",
    "CacheInfo",
    "clear_inference_cache",
    "inference_cache",
    "inference_cache_info",
    "set_inference_cache_budget",
]

# Off unless asked for: caching W + ΣΔW holds one more weight-sized tensor per adapted layer (docs/performance.md
# measures what it buys); a pipeline that fit in memory must keep fitting after an upgrade.
DEFAULT_BUDGET = 0


@dataclass(frozen=True)
class CacheInfo:
    """What the cache holds and how it has served calls since it was last cleared."""

    budget: int  # bytes
    used: int  # bytes held by entries
    entries: int
    hits: int
    misses: int  # calls that built the weight (stored or not)
    over_budget: int  # misses whose weight did not fit and was not stored


@dataclass
class _Entry:
    refs: tuple[weakref.ref, ...]  # the tensors the weight was built from, by identity
    state: tuple  # their versions, storages, dtypes, devices; the terms' scales; compute dtype
    weight: torch.Tensor
    nbytes: int

    def alive(self) -> bool:
        """Whether every tensor it was built from still exists unchanged (scales are checked only by a lookup)."""
        tensors = [ref() for ref in self.refs]
        return all(t is not None for t in tensors) and _tensor_state(tensors) == self.state[: len(tensors)]


def _tensor_state(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _sources(layer: LycoLayer, name: str, term: DeltaTerm) -> list[torch.Tensor]:
    """The layer's tensors the term's ΔW is built from: its factors (the layer's own parameters) and DoRA magnitude;
    with ``use_scalar`` the term holds a per-call product, so the stored factors and the scalar instead."""
    if name in layer.scalar:
        return list(layer.adapter_parameters(name).values())
    tensors = list(term.params.values())
    if term.decompose is not None:
        tensors.append(term.decompose.magnitude)
    return tensors


class _InferenceCache:
    """The process-wide store: one entry per layer (weakly keyed), a byte budget, counters."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: weakref.WeakKeyDictionary[LycoLayer, _Entry] = weakref.WeakKeyDictionary()
        self.only: weakref.WeakSet[nn.Module] | None = None  # when set, only these layers are cached
        self.max_rows: int | None = None  # when set, only calls with at most this many input rows are cached
        self._hits = self._misses = self._over_budget = 0

    def used(self) -> int:
        return sum(entry.nbytes for entry in list(self._entries.values()))

    def info(self) -> CacheInfo:
        return CacheInfo(self.budget, self.used(), len(self._entries), self._hits, self._misses, self._over_budget)

    def clear(self) -> None:
        self._entries.clear()
        self._hits = self._misses = self._over_budget = 0

    def forget(self, layer: LycoLayer) -> None:
        self._entries.pop(layer, None)

    def _free_stale(self) -> None:
        for layer, entry in list(self._entries.items()):
            if not entry.alive():
                self._entries.pop(layer, None)

    def weight(
        self,
        layer: LycoLayer,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        active: Sequence[tuple[str, DeltaTerm]],
        shape: torch.Size,
    ) -> torch.Tensor | None:
        """``inference_weight(x, weight, terms, shape)``, kept or reused; ``None`` where the cache does not apply
        (then the caller runs ``adapted_op`` as usual)."""
        if torch.compiler.is_compiling() or self.budget <= 0 or torch.is_grad_enabled() or layer.training:
            return None
        if self.only is not None and layer not in self.only:
            return None
        if (
            self.max_rows is not None
            and x.numel() // (x.shape[1] if layer.kernel_size else x.shape[-1]) > self.max_rows
        ):
            return None
        terms = [term for _, term in active]
        if any(term.row_mask is not None for term in terms):
            return None
        tensors = [] if weight is None else [weight]
        for name, term in active:
            tensors.extend(_sources(layer, name, term))
        try:
            state = _tensor_state(tensors)
        except RuntimeError:  # inference-mode tensors keep no version counter: nothing to key on
            return None
        scales = tuple(
            (
                name,
                term.scale,
                None if term.decompose is None else (term.decompose.on_output, term.decompose.multiplier),
            )
            for name, term in active
        )
        state = (*state, scales, weight is None, compute_dtype(x, weight))
        entry = self._entries.get(layer)
        if (
            entry is not None
            and entry.state == state
            and len(entry.refs) == len(tensors)
            and all(ref() is t for ref, t in zip(entry.refs, tensors))
        ):
            self._hits += 1
            return entry.weight
        self._entries.pop(layer, None)  # stale: freed before the new weight is built
        del entry
        self._misses += 1
        merged = inference_weight(x, weight, terms, shape)
        nbytes = merged.numel() * merged.element_size()
        if self.used() + nbytes > self.budget:
            self._free_stale()
        if self.used() + nbytes > self.budget:
            self._over_budget += 1
            return merged
        self._entries[layer] = _Entry(tuple(weakref.ref(t) for t in tensors), state, merged, nbytes)
        return merged


_CACHE = _InferenceCache(DEFAULT_BUDGET)


def cached_inference_weight(
    layer: LycoLayer,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    active: Sequence[tuple[str, DeltaTerm]],
    shape: torch.Size,
) -> torch.Tensor | None:
    """The layer's hook: the weight its no-grad call runs on, from the cache, or ``None`` to run uncached."""
    return _CACHE.weight(layer, x, weight, active, shape)


def forget_layer(layer: LycoLayer) -> None:
    """Free the layer's entry (its base weight or adapters changed in a way it need not wait to notice)."""
    _CACHE.forget(layer)


def set_inference_cache_budget(budget: int) -> None:
    """Set how many bytes cached ``W + ΣΔW`` may hold across all adapted layers (0: off, and everything is freed).

    Lowering the budget frees every entry (they are rebuilt, first come, on the next calls)."""
    if budget < 0:
        raise ValueError(f"the inference cache budget is a number of bytes >= 0, got {budget}")
    if budget < _CACHE.budget:
        _CACHE.clear()
    _CACHE.budget = int(budget)


def clear_inference_cache() -> None:
    """Free every cached weight and reset the counters (the budget stays)."""
    _CACHE.clear()


def inference_cache_info() -> CacheInfo:
    """Budget, bytes held, entries and hit/miss counters."""
    return _CACHE.info()


@contextmanager
def inference_cache(budget: int, *modules: nn.Module, max_rows: int | None = None) -> Iterator[None]:
    """Cache unmerged adapted layers' ``W + ΣΔW`` for calls without gradients inside the block, within ``budget``
    bytes; on exit every entry is freed and the previous budget restored.

    Args:
        budget: bytes the cached weights may hold across all layers (0: nothing is cached).
        modules: when given, only the adapted layers inside these modules are cached, e.g. a pipeline's denoiser,
            which runs every step, and not its text encoders, which run once per prompt.
        max_rows: when given, only calls whose input has at most this many rows (batch × tokens; batch × pixels for
            a convolution) are cached: where rebuilding the weight costs most next to the product (e.g. SDXL's
            cross-attention keys/values on 2 × 77 text tokens), for a fraction of the memory.

    Example: ``with torch.no_grad(), peft_lyco.inference_cache(4 << 30, pipe.unet): images = pipe(prompt).images``
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1 (or None for every call), got {max_rows}")
    previous = _CACHE.budget, _CACHE.only, _CACHE.max_rows
    _CACHE.clear()
    set_inference_cache_budget(budget)
    if modules:
        _CACHE.only = weakref.WeakSet(layer for module in modules for layer in module.modules())
    _CACHE.max_rows = max_rows
    try:
        yield
    finally:
        _CACHE.clear()
        _CACHE.budget, _CACHE.only, _CACHE.max_rows = previous
