"""The one rule by which ``W + ΔW`` is summed (``add_delta``/``add_delta_into``), bit for bit, in every dtype mix.

The rule: upcast both operands to the summation dtype ``S`` (at least float32), sum there (one rounding), round once
to the result dtype. The implementation takes shortcuts (one add in fp16/bf16, sums inside ΔW's buffer, float8
weights upcast to ΔW's half dtype); these tests hold each shortcut to an independent reference: the sum in float64,
which rounded to float32 is the correctly rounded float32 sum (53 >= 2 * 24 + 2 bits: double rounding through
float64 is innocuous for addition), then rounded to the result dtype. Operands are built to hit ties, sums that are
inexact in float32, subnormals, overflow, signed zeros, infinities and NaN.
"""

import itertools

import pytest
import torch

from benchmarks.modes import BITS, SUMMATION_DTYPES, differing_bits, summation_operands, summation_reference
from peft_lyco.functional import add_delta, add_delta_into
from peft_lyco.functional.delta import FLOAT8_DTYPES

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    differ = differing_bits(got, expected)
    assert differ == 0, f"{differ} elements differ"


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("weight_dtype, delta_dtype, dtype", SUMMATION_DTYPES)
def test_sum_is_the_float32_sum_rounded_once(weight_dtype, delta_dtype, dtype, sign, reuse):
    weight, delta = summation_operands(weight_dtype, delta_dtype)
    expected = summation_reference(weight, delta, sign, dtype)
    kept = weight.clone()
    if reuse:
        got = add_delta_into(weight, delta.clone(), sign, dtype=dtype)
    else:
        given = delta.clone()
        got = add_delta(weight, given, sign, dtype=dtype)
        assert torch.equal(given.view(BITS.get(delta_dtype, torch.int8)), delta.view(BITS.get(delta_dtype, torch.int8)))
    _assert_same_bits(got, expected)
    assert torch.equal(weight.view(torch.int8), kept.view(torch.int8))  # the weight itself is never written


@pytest.mark.parametrize("weight_dtype, delta_dtype", [(BF16, F32), (F16, F32), (BF16, BF16), (F32, F32)])
def test_default_result_dtype_is_the_weights_and_shapes_follow_the_weight(weight_dtype, delta_dtype):
    weight = torch.randn(6, 4, 3, 3).to(weight_dtype)
    delta = (torch.randn(6, 36) * 1e-2).to(delta_dtype)
    for got in (add_delta(weight, delta), add_delta_into(weight, delta.clone())):
        assert got.dtype == weight_dtype and got.shape == weight.shape
        _assert_same_bits(got, summation_reference(weight, delta, 1, weight_dtype))


@pytest.mark.parametrize("fp8", FLOAT8_DTYPES)
@pytest.mark.parametrize("half", [F16, BF16])
def test_every_float8_value_is_exact_in_fp16_and_bf16(fp8, half):
    """The float8 shortcut's premise: upcasting a float8 weight to ΔW's half dtype loses nothing."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(fp8)
    through_half = codes.to(half).double()
    direct = codes.double()
    assert torch.equal(through_half.isnan(), direct.isnan())
    finite = ~direct.isnan()
    assert torch.equal(through_half[finite], direct[finite])


def test_the_half_precision_shortcut_is_not_the_half_precision_sum():
    """A check that the tests above can fail: summing a bf16 weight and a float32 ΔW after rounding ΔW to bf16
    (one plausible cheaper scheme) gives other bits on the tie-breaking operands."""
    weight, delta = summation_operands(BF16, F32)
    wrong = torch.add(weight, delta.to(BF16))
    expected = summation_reference(weight, delta, 1, BF16)
    differ = (wrong.view(torch.int16) != expected.view(torch.int16)) & ~expected.isnan()
    assert differ.sum() > 100


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_sums_of_many_magnitudes_in_every_vector_lane(dtype):
    """Exhaustive over pairs of weight and ΔW drawn from a grid of exponents and mantissas (each pair in every
    position of a vector register and its tail)."""
    mantissas = torch.tensor([1.0, 1.0078125, 1.5, 1.9921875, 1.00390625])
    exponents = torch.arange(-30, 16, 3).double()
    values = (mantissas[:, None].double() * torch.exp2(exponents)[None]).flatten()
    values = torch.cat([values, -values])
    pairs = torch.tensor(list(itertools.product(range(len(values)), repeat=2)))
    weight = values[pairs[:, 0]].to(dtype)
    delta = values[pairs[:, 1]].to(dtype)
    for sign in (1, -1):
        _assert_same_bits(add_delta_into(weight, delta.clone(), sign), summation_reference(weight, delta, sign, dtype))
