"""Differentiating a small product inside a custom backward, in a way ``torch.compile`` can trace.

The fused op's backward gets some factor gradients by differentiating a product of the factors (LoKr's Kronecker
product, the structured routes' ΔW-free products). ``torch.autograd.grad`` there breaks ``torch.compile`` graphs
(dynamo cannot trace it inside a custom backward); ``torch.func.vjp`` traces, but refuses to run under saved-tensor
hooks (``torch.autograd.graph.saved_tensors_hooks``, activation offloading). So compiled code takes ``torch.func.vjp``
and eager code ``torch.autograd.grad``: the same derivative either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def pullback(
    fn: Callable[..., Outputs], primals: Sequence[torch.Tensor]
) -> tuple[Outputs, Callable[[Outputs], tuple[torch.Tensor, ...]]]:
    """``(fn(*primals), pull)`` where ``pull(cotangents)`` gives ``∂⟨fn(*primals), cotangents⟩/∂primals`` (one
    gradient per primal; call it once). ``fn`` must be a pure function of its arguments."""
    if torch.compiler.is_compiling():
        return torch.func.vjp(fn, *primals)
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in primals]
        outputs = fn(*leaves)
    single = isinstance(outputs, torch.Tensor)
    roots = (outputs,) if single else tuple(outputs)

    def pull(cotangents: Outputs) -> tuple[torch.Tensor, ...]:
        grads = (cotangents,) if single else tuple(cotangents)
        return torch.autograd.grad(roots, leaves, grads)

    values = tuple(r.detach() for r in roots)
    return (values[0] if single else values), pull
