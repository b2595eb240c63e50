"""LoHa/LoKr as registered PEFT methods: save/load, state dicts, multiple adapters, merge, and PEFT's own beside them."""

import copy
import importlib
import json

import peft
import pytest
import torch
from peft import (
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.utils import PeftType
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.lin1 = nn.Linear(32, 8)

    def forward(self, x, img):
        return self.lin1(torch.relu(self.lin0(x))), self.proj(self.conv(img))


TARGETS = ["lin0", "conv", "proj", "lin1"]
CONFIGS = {
    "loha": lambda **kw: LoHaConfig(r=2, alpha=1, target_modules=TARGETS, init_weights=False, **kw),
    "loha-tucker": lambda **kw: LoHaConfig(r=2, alpha=1, use_tucker=True, target_modules=TARGETS, init_weights=False, **kw),
    "lokr": lambda **kw: LoKrConfig(r=2, alpha=1, factor=2, target_modules=TARGETS, init_weights=False, **kw),
    "lokr-tucker": lambda **kw: LoKrConfig(
        r=1, alpha=1, factor=2, use_tucker=True, decompose_both=True, target_modules=TARGETS, init_weights=False, **kw
    ),
}
INPUTS = (torch.randn(3, 16), torch.randn(2, 8, 6, 6))


def _out(model):
    with torch.no_grad():
        return model(*INPUTS)


def _close(a, b, atol=1e-6):
    return all(torch.allclose(x, y, atol=atol) for x, y in zip(a, b))


def test_types_are_registered_and_idempotent():
    assert PeftType("LYCO_LOHA") is PeftType.LYCO_LOHA and PeftType["LYCO_LOKR"] is PeftType.LYCO_LOKR
    assert {"LYCO_LOHA", "LYCO_LOKR"} <= {t.value for t in PeftType}
    peft_lyco.register()
    importlib.reload(peft_lyco)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LYCO_LOHA] is peft_lyco.LoHaModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LYCO_LOKR"] is peft_lyco.LoKrConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOHA] is peft.LoHaModel
    assert LoHaConfig().peft_type == "LYCO_LOHA" and LoKrConfig().peft_type == "LYCO_LOKR"


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_pretrained_and_from_pretrained_round_trip(kind, tmp_path):
    torch.manual_seed(1)
    base = Net()
    model = get_peft_model(copy.deepcopy(base), CONFIGS[kind]())
    expected = _out(model)
    assert not _close(expected, _out(base), atol=1e-4)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("LYCO_LOHA" if kind.startswith("loha") else "LYCO_LOKR")
    assert isinstance(PeftConfig.from_pretrained(tmp_path), LoHaConfig if kind.startswith("loha") else LoKrConfig)
    fresh = Net()
    fresh.load_state_dict(base.state_dict())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert _close(_out(loaded), expected, atol=0)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_state_dict_round_trip_and_injection_from_state_dict(kind):
    model = get_peft_model(Net(), CONFIGS[kind]())
    state = get_peft_model_state_dict(model)
    prefix = "hada_" if kind.startswith("loha") else "lokr_"
    assert state and all(f".{prefix}" in key for key in state)

    target = copy.deepcopy(model.get_base_model())
    target = target.__class__()
    target.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if f".{prefix}" not in k})
    plain_state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    inject_adapter_in_model(CONFIGS[kind](), target, state_dict=plain_state)
    result = set_peft_model_state_dict(target, plain_state)
    assert not result.unexpected_keys
    assert _close(_out(target), _out(model), atol=0)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_merge_unmerge_and_merge_and_unload(kind):
    torch.manual_seed(2)
    model = get_peft_model(Net(), CONFIGS[kind]())
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = _out(model)
    model.merge_adapter()
    assert _close(_out(model), unmerged, atol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            assert (param - weights[name]).abs().max() <= 1e-6
    assert _close(_out(model), unmerged, atol=1e-6)
    merged_model = model.merge_and_unload()
    assert not any(isinstance(m, (LoHaLayer, LoKrLayer)) for m in merged_model.modules())
    assert _close(_out(merged_model), unmerged, atol=1e-5)


def test_disable_adapter_and_unload_give_base_output():
    base = Net()
    model = get_peft_model(copy.deepcopy(base), CONFIGS["lokr"]())
    with model.disable_adapter():
        assert _close(_out(model), _out(base), atol=0)
    assert not _close(_out(model), _out(base), atol=1e-4)
    assert _close(_out(model.unload()), _out(base), atol=0)


def test_multiple_adapters_add_set_delete():
    torch.manual_seed(3)
    model = get_peft_model(Net(), CONFIGS["loha"](), adapter_name="first")
    model.add_adapter("second", CONFIGS["loha-tucker"]())
    # PEFT's add_adapter keeps "first" active
    out_first = _out(model)
    model.set_adapter("second")
    out_second = _out(model)
    assert not _close(out_first, out_second, atol=1e-4)
    model.set_adapter("first")
    assert _close(_out(model), out_first, atol=0)
    model.delete_adapter("second")
    assert _close(_out(model), out_first, atol=0)
    assert all("second" not in m.layouts for m in model.modules() if isinstance(m, LoHaLayer))


def test_loha_and_lokr_stacked_on_one_model_add_up():
    torch.manual_seed(5)
    base = Net()
    model = inject_adapter_in_model(CONFIGS["loha"](), copy.deepcopy(base), adapter_name="style")
    model = inject_adapter_in_model(CONFIGS["lokr"](), model, adapter_name="char")
    outer = model.conv
    assert isinstance(outer, LoKrLayer) and isinstance(outer.base_layer, LoHaLayer)
    weight = base.conv.weight + outer.base_layer.get_delta_weight("style") + outer.get_delta_weight("char")
    img = INPUTS[1]
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(img, weight, base.conv.bias, padding=1)
        assert torch.allclose(outer(img), expected, atol=1e-5)


def test_two_adapters_of_one_type_active_together_sum_their_deltas():
    torch.manual_seed(4)
    base = Net()
    model = get_peft_model(copy.deepcopy(base), CONFIGS["lokr"](), adapter_name="one")
    model.add_adapter("two", CONFIGS["lokr"]())
    layer = model.base_model.model.lin0
    x = INPUTS[0]
    with torch.no_grad():
        outputs = {}
        for active in (["one"], ["two"], ["one", "two"]):
            model.base_model.set_adapter(active)
            outputs[tuple(active)] = layer(x) - base.lin0(x)
    assert outputs[("one",)].abs().max() > 1e-3 and outputs[("two",)].abs().max() > 1e-3
    assert torch.allclose(outputs[("one", "two")], outputs[("one",)] + outputs[("two",)], atol=1e-5)


def test_peft_builtin_loha_and_lokr_still_work_beside_ours():
    builtin = get_peft_model(Net(), peft.LoHaConfig(r=2, alpha=2, target_modules=["lin0", "lin1"]))
    assert isinstance(builtin.base_model, peft.LoHaModel)
    assert type(builtin.base_model.model.lin0).__module__.startswith("peft.tuners.loha")
    builtin_kr = get_peft_model(Net(), peft.LoKrConfig(r=2, alpha=2, target_modules=["lin0"]))
    assert isinstance(builtin_kr.base_model, peft.LoKrModel)
    _out(builtin)
    _out(builtin_kr)
    ours = get_peft_model(Net(), CONFIGS["loha"]())
    assert isinstance(ours.base_model, peft_lyco.LoHaModel)


def test_rank_and_alpha_patterns_and_conv_rank():
    config = LoHaConfig(
        r=4, alpha=2, conv_r=3, conv_alpha=6, target_modules=TARGETS, rank_pattern={"lin1": 5}, alpha_pattern={"^lin0": 1}
    )
    model = get_peft_model(Net(), config).base_model.model
    assert (model.lin0.r["default"], model.lin0.scaling["default"]) == (4, 0.25)
    assert (model.lin1.r["default"], model.lin1.scaling["default"]) == (5, 0.4)
    assert (model.conv.r["default"], model.conv.scaling["default"]) == (3, 2.0)  # kxk conv: conv_r / conv_alpha
    assert (model.proj.r["default"], model.proj.scaling["default"]) == (4, 0.5)  # 1x1 conv counts as Linear
    assert model.conv.hada_w1_b["default"].shape == (3, 8 * 9)


def test_option_pattern_sets_per_module_layout():
    config = LoKrConfig(r=1, factor=2, target_modules=TARGETS, option_pattern={"conv": {"use_tucker": True, "factor": -1}})
    model = get_peft_model(Net(), config).base_model.model
    assert "default" in model.conv.lokr_t2 and "default" not in model.proj.lokr_t2
    with pytest.raises(ValueError, match="unknown options"):
        LoKrConfig(option_pattern={"conv": {"rank": 3}})
    with pytest.raises(ValueError, match="factor"):
        LoKrConfig(option_pattern={"conv": {"factor": 0}})


def test_full_matrix_lokr_scale_is_one_and_alpha_ignored():
    model = get_peft_model(Net(), LoKrConfig(r=64, alpha=7, target_modules=["lin0"])).base_model.model
    assert model.lin0.layouts["default"].both_full
    assert model.lin0.scaling["default"] == 1.0
    low = get_peft_model(Net(), LoKrConfig(r=2, alpha=1, factor=2, target_modules=["lin0"])).base_model.model
    assert low.lin0.scaling["default"] == 0.5
