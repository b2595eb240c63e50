"""Approximating a weight difference by adapter factors: truncated SVD (LoRA/LoCon), nearest Kronecker product (LoKr),
fitted Hadamard product (LoHa), and rank reduction of existing factors.

Everything here is pure tensor math in float64/float32 on whatever device the inputs live on; the callers (extract,
resize) decide which layout a module gets and report the errors these functions return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .factorization import LoKrLayout
from .lokr import lokr_w1, lokr_w2


@dataclass(frozen=True)
class LowRank:
    """``up @ down`` approximating a matrix; ``error`` is the Frobenius norm of what was left out."""

    up: torch.Tensor
    down: torch.Tensor
    error: float


def truncated_svd(matrix: torch.Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of a 2-D ``matrix`` (Eckart–Young), split evenly as ``up @ down``.

    ``up`` is ``U·√S`` and ``down`` is ``√S·Vᵀ``, so both factors carry the same magnitude (what fp16 files need);
    ``error`` is the norm of the discarded singular values, which equals ``‖matrix − up @ down‖_F``.
    """
    if matrix.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _split(u, s, vh, rank)


def lowrank_svd(left: torch.Tensor, right: torch.Tensor, rank: int) -> LowRank:
    """``truncated_svd(left @ right, rank)`` without forming the product: QR of both factors, SVD of the small core.

    ``left`` is ``(m, k)`` and ``right`` ``(k, n)``; the cost is ``O((m + n)·k²)`` instead of an ``m×n`` SVD.
    """
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return _split(q_left @ u, s, vh @ q_right.T, rank)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> LowRank:
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    up, down = u[:, :kept] * root, root[:, None] * vh[:kept]
    if kept < rank:  # pad with zero directions so the factors have the rank asked for
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - kept)], dim=1)
        down = torch.cat([down, down.new_zeros(rank - kept, down.shape[1])], dim=0)
    return LowRank(up, down, float(s[kept:].double().norm()))


# ------------------------------------------------------------------------------------------------------ Kronecker
def rearrange_kronecker(matrix: torch.Tensor, out_l: int, in_m: int) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement: ``R`` with ``kron(A, B) ↦ vec(A) vec(B)ᵀ``.

    ``matrix`` is ``(out_l·out_k, in_m·in_n)``; row ``a·in_m + c`` of ``R`` holds block ``(a, c)`` of ``matrix``
    (size ``out_k × in_n``) flattened, so ``‖matrix − kron(A, B)‖_F = ‖R − vec(A) vec(B)ᵀ‖_F``.
    """
    rows, cols = matrix.shape
    out_k, in_n = rows // out_l, cols // in_m
    if out_l * out_k != rows or in_m * in_n != cols:
        raise ValueError(f"a {rows}x{cols} matrix has no ({out_l}x{in_m}) ⊗ (.x.) Kronecker split")
    blocks = matrix.reshape(out_l, out_k, in_m, in_n).permute(0, 2, 1, 3)
    return blocks.reshape(out_l * in_m, out_k * in_n)


def nearest_kronecker(matrix: torch.Tensor, out_l: int, in_m: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, error)`` with ``kron(A, B)`` the nearest Kronecker product to ``matrix`` in the Frobenius norm.

    ``A`` is ``(out_l, in_m)``, ``B`` ``(out_k, in_n)``: the leading singular pair of the rearranged matrix, its
    singular value split evenly between the two halves. ``error`` is ``‖matrix − kron(A, B)‖_F``.
    """
    rows, cols = matrix.shape
    rearranged = rearrange_kronecker(matrix, out_l, in_m)
    u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
    root = s[0].sqrt()
    first = (u[:, 0] * root).reshape(out_l, in_m)
    second = (vh[0] * root).reshape(rows // out_l, cols // in_m)
    return first, second, float(s[1:].double().norm())


@dataclass(frozen=True)
class FittedFactors:
    """Adapter factors (kohya parameter names) fitted to a ΔW at scale 1, and the Frobenius error of the fit."""

    tensors: dict[str, torch.Tensor]
    error: float


def tucker_decompose(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD of a conv kernel ``(out, in, *k)`` into ``(core (r, r, *k), w_a (r, out), w_b (r, in))``.

    ``rebuild_tucker(core, w_a, w_b)`` gives the approximation; it is exact when the kernel's output and input mode
    ranks are at most ``rank`` (as for any Tucker adapter of that rank).
    """
    out, inn = weight.shape[:2]
    w_a = _mode_basis(weight.reshape(out, -1), rank)  # (r, out)
    w_b = _mode_basis(weight.transpose(0, 1).reshape(inn, -1), rank)  # (r, in)
    core = torch.einsum("o i ..., r o, s i -> r s ...", weight, w_a, w_b)
    return core, w_a, w_b


def _mode_basis(unfolded: torch.Tensor, rank: int) -> torch.Tensor:
    """The leading ``rank`` left singular vectors of a mode unfolding, as rows (zero rows past its rank)."""
    u, _, _ = torch.linalg.svd(unfolded, full_matrices=False)
    basis = u[:, :rank].T
    if basis.shape[0] < rank:
        basis = torch.cat([basis, basis.new_zeros(rank - basis.shape[0], basis.shape[1])])
    return basis


def lokr_factors(w1: torch.Tensor, w2: torch.Tensor, layout: LoKrLayout) -> dict[str, torch.Tensor]:
    """Write the Kronecker halves ``w1`` ``(out_l, in_m)`` and ``w2`` ``(out_k, in_n, *k)`` in ``layout``'s parameters.

    Low-rank halves are truncated SVDs at ``layout.rank`` and a Tucker ``w2`` a truncated HOSVD; full halves are kept.
    """
    tensors: dict[str, torch.Tensor] = {}
    if layout.w1_decomposed:
        low = truncated_svd(w1, layout.rank)
        tensors["lokr_w1_a"], tensors["lokr_w1_b"] = low.up, low.down
    else:
        tensors["lokr_w1"] = w1
    if layout.w2_mode == "full":
        tensors["lokr_w2"] = w2.reshape(layout.out_k, layout.in_n, *layout.kernel)
    elif layout.w2_mode == "tucker":
        core, w_a, w_b = tucker_decompose(w2.reshape(layout.out_k, layout.in_n, *layout.kernel), layout.rank)
        tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"] = core, w_a, w_b
    else:
        low = truncated_svd(w2.reshape(layout.out_k, -1), layout.rank)
        tensors["lokr_w2_a"], tensors["lokr_w2_b"] = low.up, low.down
    return tensors


def fit_lokr(delta: torch.Tensor, layout: LoKrLayout) -> FittedFactors:
    """LoKr factors of ``layout`` whose ``kron(w1, w2)`` (scale 1) approximates ``delta`` ``(out, in, *k)`` or 2-D.

    Nearest Kronecker product of the flattened ΔW (the kernel belongs to ``w2``'s columns), then each half written in
    its layout (truncated SVD or HOSVD at the layout's rank). A ΔW that is exactly such a LoKr is recovered exactly.
    """
    flat = delta.reshape(layout.out_l * layout.out_k, -1)
    w1, w2, _ = nearest_kronecker(flat, layout.out_l, layout.in_m)
    w1, w2 = _balance(w1, w2)
    tensors = lokr_factors(w1, w2, layout)
    return FittedFactors(tensors, _error(delta, _lokr_rebuild(tensors, layout)))


def _lokr_rebuild(tensors: dict[str, torch.Tensor], layout: LoKrLayout) -> torch.Tensor:
    return torch.kron(lokr_w1(tensors), lokr_w2(tensors).reshape(layout.out_k, -1))


def _balance(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the two Kronecker halves to equal Frobenius norms (the product is unchanged)."""
    a, b = float(first.norm()), float(second.norm())
    if a == 0 or b == 0:
        return first, second
    ratio = math.sqrt(b / a)
    return first * ratio, second / ratio


def _error(delta: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((delta.reshape(approximation.shape) - approximation).double().norm())


# ---------------------------------------------------------------------------------------------------------- LoHa
def fit_loha(
    delta: torch.Tensor, rank: int, *, steps: int = 40, restarts: int = 4, seed: int = 0, ridge: float = 1e-9
) -> FittedFactors:
    """Flat LoHa factors with ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (scale 1) fitted to ``delta`` by alternating least squares.

    Each step solves one factor exactly given the other three (an ``r × r`` linear system per row or column, damped
    by ``ridge`` relative to its diagonal), so the error never increases. Starts: the rank-``rank`` SVD of ΔW times an
    all-ones second product (so the result is never worse than the LoRA of the same rank) and ``restarts`` Gaussian
    draws from ``seed``; each runs a few steps, the best one runs ``steps`` more, and the best iterate is returned.
    Deterministic given ``seed``. ``delta`` is ``(out, in, *k)`` or 2-D; kernels are flattened into the columns.
    """
    target = delta.reshape(delta.shape[0], -1)
    out, inn = target.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rms = float(target.double().square().mean().sqrt()) or 1.0
    size = rms**0.25 / rank**0.25  # each product then has entries of size √rms, their Hadamard product about rms

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * size).to(target)

    low = truncated_svd(target, rank)
    ones_a, ones_b = target.new_zeros(out, rank), target.new_zeros(rank, inn)
    ones_a[:, 0], ones_b[0] = 1.0, 1.0
    starts = [(low.up, low.down, ones_a, ones_b)]
    starts += [(draw(out, rank), draw(rank, inn), draw(out, rank), draw(rank, inn)) for _ in range(restarts)]
    warm = [_loha_als(target, factors, min(5, steps), ridge) for factors in starts]
    _, factors = min(warm, key=lambda found: found[0])
    _, factors = _loha_als(target, factors, steps, ridge)
    w1_a, w1_b, w2_a, w2_b = _balance_loha(*factors)
    tensors = {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b}
    return FittedFactors(tensors, _loha_error(target, w1_a, w1_b, w2_a, w2_b))


def _loha_als(target: torch.Tensor, factors, steps: int, ridge: float):
    """``steps`` rounds of alternating least squares; ``(error, factors)`` of the best iterate (the start included)."""
    w1_a, w1_b, w2_a, w2_b = factors
    best = (_loha_error(target, *factors), factors)
    for _ in range(steps):
        w1_a = _solve_rows(target, w1_b, w2_a @ w2_b, ridge)
        w1_b = _solve_rows(target.T, w1_a.T, (w2_a @ w2_b).T, ridge).T
        w2_a = _solve_rows(target, w2_b, w1_a @ w1_b, ridge)
        w2_b = _solve_rows(target.T, w2_a.T, (w1_a @ w1_b).T, ridge).T
        error = _loha_error(target, w1_a, w1_b, w2_a, w2_b)
        if error < best[0]:
            best = (error, (w1_a, w1_b, w2_a, w2_b))
    return best


def _solve_rows(target: torch.Tensor, right: torch.Tensor, weights: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ``left`` minimising ``‖(left @ right) ⊙ weights − target‖_F``, one ``r × r`` normal equation per row."""
    # row i: (left_i @ right) * weights_i ≈ target_i  →  left_i (right diag(w_i²) rightᵀ) = (target_i * w_i) rightᵀ
    rank = right.shape[0]
    outer = (right[:, None, :] * right[None, :, :]).reshape(rank * rank, -1)  # (r², k): right_r ⊙ right_s
    gram = (weights.square() @ outer.T).reshape(-1, rank, rank)
    rhs = (target * weights) @ right.T
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(gram.dtype).tiny)
    gram = gram + (ridge * scale)[:, None, None] * torch.eye(right.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)


def _loha_error(target, w1_a, w1_b, w2_a, w2_b) -> float:
    return float(((w1_a @ w1_b) * (w2_a @ w2_b) - target).double().norm())


def _balance_loha(w1_a, w1_b, w2_a, w2_b):
    """Equal norms within each pair and across the pairs (ΔW unchanged), so no factor under- or overflows fp16."""
    pairs = []
    for a, b in ((w1_a, w1_b), (w2_a, w2_b)):
        na, nb = float(a.norm()), float(b.norm())
        ratio = math.sqrt(nb / na) if na > 0 and nb > 0 else 1.0
        pairs.append((a * ratio, b / ratio))
    (w1_a, w1_b), (w2_a, w2_b) = pairs
    n1, n2 = float(w1_a.norm()), float(w2_a.norm())
    ratio = math.sqrt(math.sqrt(n2 / n1)) if n1 > 0 and n2 > 0 else 1.0
    return w1_a * ratio, w1_b * ratio, w2_a / ratio, w2_b / ratio
