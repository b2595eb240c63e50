"""diffusers' own save paths for LoHa/LoKr adapters trained with ``unet.add_adapter`` (issue 9 item 12): every
file they write either reloads through ``enable_lyco`` + ``load_lora_weights`` with the trained outputs, or is refused
with a message pointing at ``peft_to_kohya`` (never silently read with the wrong scale)."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.convert import LycoFileError
from peft_lyco.diffusers import enable_lyco
from tests.convert.helpers import fresh_pipe, outputs

TOL = 1e-5
TARGETS = ["to_q", "to_v", "proj_in", "conv1"]  # Linear and 3x3 conv; scale alpha/r = 0.5 and conv_alpha/r = 1.5


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request):
    """A pipeline whose UNet got a LoHa/LoKr adapter the diffusers way, with random (as if trained) factors."""
    config_cls = LoHaConfig if request.param == "loha" else LoKrConfig
    pipe = fresh_pipe()
    torch.manual_seed(0)
    pipe.unet.add_adapter(config_cls(r=2, alpha=1, conv_alpha=3, target_modules=TARGETS, init_weights=False))
    for name, param in pipe.unet.named_parameters():
        if param.requires_grad:
            param.data.normal_(std=0.3)
    return pipe, outputs(pipe)["unet"]


def reloaded(folder, **kwargs):
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(folder, **kwargs)
    return outputs(pipe)["unet"]


def test_the_adapter_changes_the_output(trained):
    _, expected = trained
    assert (expected - outputs(fresh_pipe())["unet"]).abs().max() > 1e-2


def test_save_lora_weights_without_the_config_is_refused_at_load(trained, tmp_path):
    """The class-level call writes tensors without alpha: reading them as alpha = rank was off by the whole scale."""
    pipe, _ = trained
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    with pytest.raises(LycoFileError, match="peft_to_kohya"):
        reloaded(tmp_path)


def test_save_lora_weights_with_the_config_reloads_equal(trained, tmp_path):
    pipe, expected = trained
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
    )
    assert (reloaded(tmp_path) - expected).abs().max() <= TOL


def test_save_lora_weights_on_an_enabled_pipeline_keeps_the_scale(trained, tmp_path):
    """After enable_lyco the pipeline's own save call adds the adapter config itself."""
    pipe, expected = trained
    enable_lyco(pipe)
    pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet), weight_name="x.safetensors")
    assert (reloaded(tmp_path, weight_name="x.safetensors") - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="peft_to_kohya"):
        pipe.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=False
        )


def test_save_lora_adapter_reloads_equal(trained, tmp_path):
    pipe, expected = trained
    pipe.unet.save_lora_adapter(tmp_path)
    assert (reloaded(tmp_path) - expected).abs().max() <= TOL


def test_save_lora_adapter_reloads_through_the_models_own_loader(trained, tmp_path):
    """unet.save_lora_adapter -> unet.load_lora_adapter failed with diffusers' LoRA-only loader."""
    pipe, expected = trained
    pipe.unet.save_lora_adapter(tmp_path)
    loaded = enable_lyco(fresh_pipe())
    loaded.unet.load_lora_adapter(tmp_path, prefix=None, adapter_name="trained")
    assert loaded.get_list_adapters() == {"unet": ["trained"]}
    assert (outputs(loaded)["unet"] - expected).abs().max() <= TOL
