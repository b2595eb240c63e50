"""PEFT's built-in LoHa/LoKr adapters exported as kohya files and turned into our types, with PEFT's own ΔW."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model, set_peft_model_state_dict

from peft_lyco.cli.adapters import read_peft_folder
from peft_lyco.convert import load_kohya, peft_to_kohya, save_kohya
from peft_lyco.convert.builtin import builtin_to_lyco, check_reloaded, file_module_delta
from peft_lyco.convert.names import SDXL, NameResolver
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

TARGETS = ["to_q", "to_k", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj"]
CONFIGS = {
    "lokr": {"cls": peft.LoKrConfig, "r": 4, "alpha": 2, "target_modules": TARGETS},
    "lokr-tucker-both": {
        "cls": peft.LoKrConfig,
        "r": 2,
        "alpha": 3,
        "decompose_both": True,
        "use_effective_conv2d": True,
        "target_modules": TARGETS,
    },
    # factor 16 > sqrt(64): PEFT splits 64 as (16, 4), larger half first (LyCORIS never does)
    "lokr-factor16-full": {
        "cls": peft.LoKrConfig,
        "r": 16,
        "alpha": 4,
        "decompose_factor": 16,
        "target_modules": TARGETS,
    },
    "loha": {"cls": peft.LoHaConfig, "r": 4, "alpha": 8, "target_modules": TARGETS},
    "loha-tucker": {
        "cls": peft.LoHaConfig,
        "r": 3,
        "alpha": 2,
        "use_effective_conv2d": True,
        "target_modules": TARGETS,
    },
}


@pytest.fixture(scope="module")
def base_unet():
    return tiny_sdxl_pipeline(seed=0).unet


def builtin_unet(base_unet, name):
    settings = dict(CONFIGS[name])
    cls = settings.pop("cls")
    model = get_peft_model(copy.deepcopy(base_unet), cls(init_weights=False, **settings))
    return model


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Module path -> PEFT's own ΔW (its get_delta_weight, with its scale)."""
    found = {}
    for path, layer in model.base_model.model.named_modules():
        if isinstance(layer, (peft.tuners.lokr.layer.LoKrLayer, peft.tuners.loha.layer.LoHaLayer)):
            found[path] = layer.get_delta_weight("default").detach()
    return found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_builtin_export_reloads_with_peft_delta(base_unet, name, tmp_path):
    model = builtin_unet(base_unet, name)
    state_dict, metadata = peft_to_kohya(model)
    path = save_kohya(tmp_path / "out.safetensors", state_dict, metadata)
    resolver = NameResolver(SDXL)
    expected = {resolver.kohya_name("unet", p, "sgm"): d for p, d in peft_deltas(model).items()}
    errors = check_reloaded(path, expected, rtol=1e-6)
    assert len(errors) == len(expected) > 20
    assert max(errors.values()) < 1e-6
    # the independent check: every module's file ΔW against PEFT's, element by element
    reloaded, _ = load_kohya(path)
    name0 = next(iter(expected))
    params = {k.split(".", 1)[1]: v for k, v in reloaded.items() if k.startswith(name0 + ".")}
    torch.testing.assert_close(
        file_module_delta(params).float(), expected[name0].reshape(expected[name0].shape[0], -1), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("name", ["lokr", "lokr-tucker-both", "loha", "loha-tucker"])
def test_builtin_to_lyco_gives_the_same_delta(base_unet, name):
    model = builtin_unet(base_unet, name)
    conversion = builtin_to_lyco(model if name.startswith("lokr") else {"unet": model})
    part = conversion["unet"]
    ours = inject_adapter_in_model(part.config, copy.deepcopy(base_unet), "default")
    assert not set_peft_model_state_dict(ours, part.state_dict, "default").unexpected_keys
    expected = peft_deltas(model)
    layers = dict(ours.named_modules())
    assert len(expected) > 20
    for path, delta in expected.items():
        got = layers[path].get_delta_weight("default")
        torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-5, atol=1e-7, msg=path)


def test_builtin_split_our_layouts_cannot_hold_is_named(base_unet):
    model = builtin_unet(base_unet, "lokr-factor16-full")
    with pytest.raises(ValueError, match="(?s)cannot hold these PEFT adapters.*attn1.to_q.*in all"):
        builtin_to_lyco({"unet": model})


@pytest.mark.parametrize("name", ["lokr", "loha-tucker"])
def test_peft_folder_reads_like_the_model(base_unet, name, tmp_path):
    model = builtin_unet(base_unet, name)
    model.save_pretrained(tmp_path / "adapter")
    adapter = read_peft_folder(tmp_path / "adapter")
    modules = adapter.modules
    assert adapter.model_type == "sdxl"
    expected = peft_deltas(model)
    assert sorted(m.path for m in modules) == sorted(expected)
    from_model = {m.path: m for m in peft_to_kohya_modules(model)}
    for module in modules:
        assert module.geometry == from_model[module.path].geometry
        assert module.alpha == from_model[module.path].alpha
        for param, tensor in module.tensors.items():
            assert torch.equal(tensor, from_model[module.path].tensors[param]), (module.path, param)


def peft_to_kohya_modules(model):
    from peft_lyco.convert.builtin import builtin_modules

    return builtin_modules("unet", model.get_base_model())
