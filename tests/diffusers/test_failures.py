"""A file that cannot be loaded leaves the pipeline exactly as it was: same modules, tensors, adapters, flags."""

import pytest
import torch

import peft_lyco.diffusers as lyco_diffusers
from peft_lyco.convert import LycoFileError, save_kohya
from peft_lyco.diffusers import enable_lyco, load_lyco_weights
from tests.convert.helpers import COMPONENTS, fresh_pipe, lycoris_case

PROJ_IN = "lora_unet_down_blocks_1_attentions_0_proj_in"


def snapshot(pipe):
    """Everything a failed load could disturb: module types, all tensors, adapter configs, flags, trainability."""
    state = {}
    for component in COMPONENTS:
        model = getattr(pipe, component)
        state[component] = (
            [(name, type(module)) for name, module in model.named_modules()],
            {name: tensor.clone() for name, tensor in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            sorted(getattr(model, "peft_config", {})),
            model.__dict__.get("_hf_peft_config_loaded"),
        )
    return state, pipe.get_active_adapters()


def assert_unchanged(before, after):
    (state_a, active_a), (state_b, active_b) = before, after
    assert active_a == active_b
    for component in COMPONENTS:
        modules_a, tensors_a, grads_a, configs_a, flag_a = state_a[component]
        modules_b, tensors_b, grads_b, configs_b, flag_b = state_b[component]
        assert modules_a == modules_b and configs_a == configs_b and flag_a == flag_b and grads_a == grads_b
        assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


@pytest.fixture(params=["empty", "with-adapter"])
def pipe(request):
    """A fresh pipeline, or one already holding a LoKr adapter that a failed load must not disturb."""
    pipe = enable_lyco(fresh_pipe())
    if request.param == "with-adapter":
        load_lyco_weights(pipe, lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)[0], adapter_name="kept")
    return pipe


def damaged(kind):
    state_dict = dict(lycoris_case(algo="loha", use_tucker=True)[0])
    if kind == "unknown-key":
        state_dict[f"{PROJ_IN}.weight"] = torch.zeros(1)
    elif kind == "unmatched-name":
        state_dict["lora_unet_input_blocks_99_1_proj_in.hada_w1_a"] = torch.zeros(1)
    elif kind == "wrong-shape":
        state_dict[f"{PROJ_IN}.hada_w1_b"] = torch.zeros(4, 65)
    elif kind == "nan":
        name = "lora_te2_text_model_encoder_layers_4_mlp_fc2.hada_w2_a"
        state_dict[name] = torch.full_like(state_dict[name], float("nan"))
    elif kind == "incomplete":
        state_dict.pop("lora_te2_text_model_encoder_layers_4_mlp_fc2.hada_w2_b")
    elif kind == "dora-1d":  # refused: a 1-D dora_scale does not say its axis and the file has no ss_network_args
        state_dict = dict(lycoris_case(algo="lokr", factor=4, dora_wd=True)[0])
        name = "lora_te2_text_model_encoder_layers_4_mlp_fc2.dora_scale"
        state_dict[name] = state_dict[name].flatten()
    return state_dict


@pytest.mark.parametrize("kind", ["unknown-key", "unmatched-name", "wrong-shape", "nan", "incomplete", "dora-1d"])
def test_bad_files_leave_the_pipeline_unchanged(pipe, kind):
    before = snapshot(pipe)
    with pytest.raises(LycoFileError):
        pipe.load_lora_weights(damaged(kind), adapter_name="new")
    assert_unchanged(before, snapshot(pipe))


def test_bad_containers_leave_the_pipeline_unchanged(pipe, tmp_path):
    before = snapshot(pipe)
    pickled = tmp_path / "style.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="never unpickles"):
        load_lyco_weights(pipe, pickled)
    good = save_kohya(tmp_path / "good.safetensors", lycoris_case(algo="loha")[0])
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        load_lyco_weights(pipe, truncated)
    assert_unchanged(before, snapshot(pipe))


def test_a_failure_during_injection_is_rolled_back(pipe, monkeypatch):
    """Even a failure after some components were injected (here: the second text encoder) is undone."""
    before = snapshot(pipe)
    real_inject = lyco_diffusers._inject

    def failing_inject(model, component, adapter_name, low_cpu_mem_usage):
        real_inject(model, component, adapter_name, low_cpu_mem_usage)
        if component.name == "text_encoder_2":
            raise RuntimeError("simulated failure after injection")

    monkeypatch.setattr(lyco_diffusers, "_inject", failing_inject)
    with pytest.raises(RuntimeError, match="simulated"):
        load_lyco_weights(pipe, lycoris_case(algo="loha", use_tucker=True)[0], adapter_name="new")
    assert_unchanged(before, snapshot(pipe))


def test_adapter_name_in_use_is_refused(pipe):
    load_lyco_weights(pipe, lycoris_case(algo="loha")[0], adapter_name="taken")
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="'taken' is already used"):
        load_lyco_weights(pipe, lycoris_case(algo="loha")[0], adapter_name="taken")
    assert_unchanged(before, snapshot(pipe))
