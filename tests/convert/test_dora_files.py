"""Files with ``dora_scale`` (LyCORIS DoHa/DoKr) and the other LyCORIS options, through ``kohya_to_peft`` and
``pipe.load_lora_weights``: both axes reproduce lycoris-lora's applied forward, the axis follows from the shape (1-D or
ambiguous tensors from ``ss_network_args``, refused otherwise), and kohya -> PEFT -> kohya is bit-exact."""

import copy
import json

import pytest
import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from peft_lyco import LoKrConfig
from peft_lyco.convert import LycoFileError, kohya_to_peft, peft_to_kohya
from peft_lyco.diffusers import enable_lyco, load_lyco_weights
from tests.conftest import adapted_layer
from tests.convert.helpers import fresh_pipe, lycoris_case, max_diff, outputs, rename
from tests.convert.test_export import check_writer_rules

TOL = 1e-5

VARIANTS = {
    "loha-dora-out": dict(algo="loha", dora_wd=True),
    "loha-dora-in": dict(algo="loha", dora_wd=True, wd_on_output=False),
    "lokr-dora-out": dict(algo="lokr", factor=4, dim=2, alpha=1, dora_wd=True),
    "lokr-dora-in-tucker": dict(algo="lokr", factor=4, dim=2, alpha=1, dora_wd=True, wd_on_output=False, use_tucker=True),
    "lokr-scalar-rs-lora": dict(algo="lokr", factor=4, dim=2, alpha=1, use_scalar=True, rs_lora=True),
}  # fmt: skip


# the two axes of each algorithm are covered fast by the other algorithm's variant; the rest run with -m slow
SLOW = ("loha-dora-in", "lokr-dora-out")


@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW else v for v in sorted(VARIANTS)]
)
def test_lycoris_dora_file_matches_lycoris_forward(variant):
    state_dict, _, reference, base = lycoris_case(**VARIANTS[variant])
    if "dora" in variant:
        axis_in = "dora-in" in variant
        scales = [v for k, v in state_dict.items() if k.endswith(".dora_scale")]
        assert scales and all((s.shape[0] == 1) == axis_in for s in scales)
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(state_dict, adapter_name="lyco")
    effect = max_diff(reference, base)
    assert min(effect.values()) > 1e-3, effect
    diffs = max_diff(outputs(pipe), reference)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("variant", ["loha-dora-out", "lokr-dora-in-tucker"])
def test_dora_round_trip_is_bit_exact(variant):
    state_dict, metadata, _, _ = lycoris_case(**VARIANTS[variant])
    source = rename(state_dict, "sd-scripts")  # the writer's naming: SGM UNet, text_model_ CLIP-L
    conversion = kohya_to_peft(source, metadata=metadata)
    written, written_meta = peft_to_kohya(conversion, lokr_tucker=True)
    assert written.keys() == source.keys()
    for key, tensor in source.items():  # dora_scale included, bit for bit
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    check_writer_rules(written, written_meta, lokr_tucker=True)
    args = json.loads(written_meta["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == str("dora-out" in variant)
    # through a pipeline: load, export
    pipe = fresh_pipe()
    load_lyco_weights(pipe, source, adapter_name="style")
    again, _ = peft_to_kohya(pipe, adapter_name="style", lokr_tucker=True)
    assert again.keys() == source.keys()
    assert all(torch.equal(again[key], tensor) for key, tensor in source.items())


def test_trained_dora_adapter_exports_and_loads_back_equal():
    """A DoRA LoKr trained in PEFT (use_scalar folded, rs_lora alpha) written as a kohya file and loaded back gives the
    same outputs, for both axes."""
    torch.manual_seed(0)
    for on_output in (True, False):
        model = nn.Sequential(nn.Linear(16, 12))
        config = LoKrConfig(r=2, factor=4, init_weights=False, weight_decompose=True, wd_on_output=on_output)
        config.use_scalar, config.rs_lora = True, True
        layer = adapted_layer(model[0], config)
        with torch.no_grad():
            layer.dora_scale["default"].mul_(1.5)
        holder = nn.Module()
        holder.layer = layer
        written, meta = peft_to_kohya({"text_encoder": holder}, model_type="sdxl", strict=False)
        target = nn.Module()
        target.layer = copy.deepcopy(layer.get_base_layer())
        conversion = kohya_to_peft(written, metadata=meta, model_type="sdxl", model={"text_encoder": target})
        part = conversion["text_encoder"].parts["lokr"]
        inject_adapter_in_model(part.config, target)
        set_peft_model_state_dict(target, part.state_dict)
        x = torch.randn(3, 16)
        with torch.no_grad():
            assert torch.allclose(target.layer(x), layer(x), atol=1e-6)


def _dora_module(shape):
    """A one-module LoKr file for a 16->12 CLIP q_proj-like layer with a ``dora_scale`` of ``shape``."""
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    return {
        f"{name}.lokr_w1": torch.randn(4, 4),
        f"{name}.lokr_w2": torch.randn(3, 4),
        f"{name}.alpha": torch.tensor(1.0),
        f"{name}.dora_scale": torch.rand(shape) + 0.5,
    }


@pytest.mark.parametrize(
    "shape,args,axis",
    [
        ((12, 1), None, True),
        ((1, 16), None, False),
        ((12,), {"dora_wd": "True"}, True),  # LyCORIS' default axis
        ((16,), {"dora_wd": "True", "wd_on_output": "False"}, False),
    ],
)
def test_dora_axis_follows_from_shape_or_network_args(shape, args, axis):
    metadata = {"ss_network_args": json.dumps(args)} if args else None
    conversion = kohya_to_peft(_dora_module(shape), metadata=metadata, model_type="sdxl")
    (module,) = conversion["text_encoder"].modules
    assert module.wd_on_output is axis
    assert module.dora_scale.shape == ((12, 1) if axis else (1, 16))
    config = conversion["text_encoder"].parts["lokr"].config
    assert (config.weight_decompose, config.wd_on_output) == (True, axis)


@pytest.mark.parametrize(
    "shape,args,message",
    [
        ((12,), None, "does not say its axis"),
        ((12, 2), None, "fits neither axis"),
        ((16,), {"dora_wd": "True"}, "wd_on_output=True, which needs"),
    ],
)
def test_ambiguous_or_wrong_dora_scale_is_refused_saying_why(shape, args, message):
    metadata = {"ss_network_args": json.dumps(args)} if args else None
    with pytest.raises(LycoFileError, match=message) as err:
        kohya_to_peft(_dora_module(shape), metadata=metadata, model_type="sdxl")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in str(err.value)
