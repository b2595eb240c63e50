"""Approximation math against independent computations: SVD truncation errors, nearest Kronecker products,
exact recovery of LoKr/LoHa factorizations, and the determinism of the LoHa fit."""

from __future__ import annotations

import pytest
import torch

from peft_lyco.functional import delta_weight, lokr_layout
from peft_lyco.functional.approximate import (
    fit_loha,
    fit_lokr,
    lowrank_svd,
    nearest_kronecker,
    rearrange_kronecker,
    truncated_svd,
    tucker_decompose,
)
from peft_lyco.functional.tucker import rebuild_tucker


def test_truncated_svd_error_is_the_discarded_singular_values():
    matrix = torch.randn(40, 24, dtype=torch.float64)
    singular = torch.linalg.svdvals(matrix)
    for rank in (1, 5, 24, 30):
        low = truncated_svd(matrix, rank)
        assert low.up.shape == (40, rank) and low.down.shape == (rank, 24)
        residual = float((matrix - low.up @ low.down).norm())
        assert low.error == pytest.approx(float(singular[rank:].norm()), abs=1e-10)
        assert residual == pytest.approx(low.error, abs=1e-10)


def test_lowrank_svd_matches_the_svd_of_the_product():
    left, right = torch.randn(50, 8, dtype=torch.float64), torch.randn(8, 30, dtype=torch.float64)
    fast, slow = lowrank_svd(left, right, 3), truncated_svd(left @ right, 3)
    torch.testing.assert_close(fast.up @ fast.down, slow.up @ slow.down)
    assert fast.error == pytest.approx(slow.error, rel=1e-9)


def test_rearrangement_maps_a_kronecker_product_to_rank_one():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    rearranged = rearrange_kronecker(torch.kron(a, b), 3, 5)
    torch.testing.assert_close(rearranged, a.reshape(-1, 1) @ b.reshape(1, -1))


def test_nearest_kronecker_error_is_the_rest_of_the_spectrum():
    matrix = torch.randn(12, 10, dtype=torch.float64)
    a, b, error = nearest_kronecker(matrix, 3, 2)
    assert float((matrix - torch.kron(a, b)).norm()) == pytest.approx(error, rel=1e-9)
    # no other Kronecker product of the split is closer (a perturbed one as a witness)
    assert float((matrix - torch.kron(a * 1.01, b)).norm()) > error


LAYOUTS = [
    ((96, 64), (), 4, {}),
    ((96, 64), (), 2, {"decompose_both": True, "factor": 8}),
    ((64, 48), (3, 3), 3, {"factor": 4}),
    ((64, 48), (3, 3), 2, {"factor": 4, "use_tucker": True}),
    ((64, 48), (1, 1), 2, {"factor": 8, "decompose_both": True}),
    ((32, 32), (), 8, {}),  # both halves full
]


@pytest.mark.parametrize(("dims", "kernel", "rank", "options"), LAYOUTS)
def test_fit_lokr_recovers_an_exact_lokr(dims, kernel, rank, options):
    layout = lokr_layout(*dims, kernel, rank, warn=False, **options)
    generator = torch.Generator().manual_seed(1)
    tensors = {
        name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in layout.shapes.items()
    }
    delta = delta_weight(tensors).reshape(*dims, *kernel)
    fitted = fit_lokr(delta, layout)
    assert {name: tuple(t.shape) for name, t in fitted.tensors.items()} == layout.shapes
    rebuilt = delta_weight(fitted.tensors).reshape(delta.shape)
    relative = float((rebuilt - delta).norm() / delta.norm())
    assert relative <= 1e-10 and fitted.error / float(delta.norm()) <= 1e-10


def test_tucker_decompose_is_exact_for_tucker_kernels():
    core, w_a, w_b = (
        torch.randn(3, 3, 3, 3, dtype=torch.float64),
        torch.randn(3, 16, dtype=torch.float64),
        torch.randn(3, 8, dtype=torch.float64),
    )
    kernel = rebuild_tucker(core, w_a, w_b)
    torch.testing.assert_close(rebuild_tucker(*tucker_decompose(kernel, 3)), kernel)


def test_fit_loha_is_deterministic_and_never_worse_than_the_lora_of_its_rank():
    generator = torch.Generator().manual_seed(2)
    factors = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((48, 4), (4, 36)) * 2]
    delta = (factors[0] @ factors[1]) * (factors[2] @ factors[3])
    fitted = fit_loha(delta, 4, seed=3)
    rebuilt = (fitted.tensors["hada_w1_a"] @ fitted.tensors["hada_w1_b"]) * (
        fitted.tensors["hada_w2_a"] @ fitted.tensors["hada_w2_b"]
    )
    assert float((rebuilt - delta).norm()) == pytest.approx(fitted.error, rel=1e-9)
    assert fitted.error <= truncated_svd(delta, 4).error
    again = fit_loha(delta, 4, seed=3)
    assert all(torch.equal(fitted.tensors[k], again.tensors[k]) for k in fitted.tensors)


def test_fit_loha_beats_the_lora_of_the_same_parameter_count_on_a_hadamard_target():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(64, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 64, generator=generator, dtype=torch.float64
    )
    b = torch.randn(64, 6, generator=generator, dtype=torch.float64) @ torch.randn(
        6, 64, generator=generator, dtype=torch.float64
    )
    target = a * b + 0.01 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
    loha = fit_loha(target, 4)  # 2·4·(64+64) parameters, as many as LoRA rank 8
    assert loha.error < truncated_svd(target, 8).error
