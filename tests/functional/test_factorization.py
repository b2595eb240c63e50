"""factorization() and the LoKr/LoHa layouts against LyCORIS 4.1.3 and the reference tables."""

import pytest
from lycoris.functional import factorization as lycoris_factorization
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from peft_lyco.functional import factorization, loha_layout, lokr_layout

SDXL_DIMS = [4, 64, 68, 127, 128, 320, 512, 640, 768, 1024, 1280, 2048, 2560, 2816, 3072, 5120, 6144, 8192, 10240]
FACTORS = [-1, 1, 2, 3, 4, 5, 8, 16, 32, 64, 100]


@pytest.mark.parametrize("dim", SDXL_DIMS + list(range(1, 200)))
@pytest.mark.parametrize("factor", FACTORS)
def test_factorization_matches_lycoris(dim, factor):
    assert factorization(dim, factor) == tuple(lycoris_factorization(dim, factor))


# LyCORIS 4.1.3's factorization() results, recorded independently of this code.
@pytest.mark.parametrize(
    "dim, factor, expected",
    [
        (320, 8, (8, 40)),
        (320, 32, (10, 32)),
        (1280, 64, (20, 64)),
        (2048, 64, (32, 64)),
        (4, 4, (1, 4)),
        (64, 16, (4, 16)),
        (5120, -1, (64, 80)),
        (10240, 64, (64, 160)),
        (1024, 3, (2, 512)),
        (12, 5, (3, 4)),
        (17, -1, (1, 17)),
    ],
)
def test_factorization_reference_rows(dim, factor, expected):
    assert factorization(dim, factor) == expected


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_bad_factor_is_refused(bad):
    with pytest.raises(ValueError, match="factor"):
        factorization(64, bad)


def _lycoris_shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters() if name.startswith(("lokr_", "hada_"))}


LAYERS = {
    "linear": lambda: nn.Linear(320, 640),
    "linear_big": lambda: nn.Linear(1280, 5120),
    "conv1x1": lambda: nn.Conv2d(640, 320, 1),
    "conv3x3": lambda: nn.Conv2d(320, 640, 3),
    "tiny": lambda: nn.Linear(4, 4),
}


def _geometry(layer):
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, ()
    return layer.out_channels, layer.in_channels, tuple(layer.kernel_size)


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("factor", [-1, 4, 8, 16, 32])
@pytest.mark.parametrize("rank", [1, 4, 8, 64, 100000])
@pytest.mark.parametrize(
    "extra",
    [{}, {"decompose_both": True}, {"use_tucker": True}, {"unbalanced_factorization": True}, {"full_matrix": True}],
)
def test_lokr_layout_matches_lycoris(layer_name, factor, rank, extra):
    layer = LAYERS[layer_name]()
    theirs = LokrModule("m", layer, lora_dim=rank, alpha=1, factor=factor, **extra)
    ours = lokr_layout(*_geometry(layer), rank, factor=factor, warn=False, **extra)
    assert ours.shapes == _lycoris_shapes(theirs)
    both_full = theirs.use_w1 and theirs.use_w2
    assert ours.both_full == both_full


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("rank", [1, 8, 32])
@pytest.mark.parametrize("use_tucker", [False, True])
def test_loha_layout_matches_lycoris(layer_name, rank, use_tucker):
    layer = LAYERS[layer_name]()
    theirs = LohaModule("m", layer, lora_dim=rank, alpha=1, use_tucker=use_tucker)
    ours = loha_layout(*_geometry(layer), rank, use_tucker)
    assert ours.shapes == _lycoris_shapes(theirs)


def test_tucker_on_1x1_conv_falls_back_to_flat():
    assert loha_layout(8, 4, (1, 1), 2, True).tucker is False
    assert "lokr_t2" not in lokr_layout(64, 64, (1, 1), 2, use_tucker=True).shapes
    assert "lokr_t2" in lokr_layout(64, 64, (3, 3), 2, use_tucker=True).shapes


def test_full_matrix_threshold_is_half_of_the_larger_w2_side():
    # 320 -> 640 at factor 8: w2 is (80, 40); the switch happens at rank 40 = 80 / 2
    assert lokr_layout(640, 320, (), 39, factor=8).w2_mode == "lowrank"
    assert lokr_layout(640, 320, (), 40, factor=8).w2_mode == "full"


def test_full_matrix_warning_is_logged(caplog):
    with caplog.at_level("WARNING"):
        lokr_layout(640, 320, (), 41, factor=8)
    assert "using full matrix mode" in caplog.text
