"""Files written by lycoris-lora on the tiny SDXL pipeline load through ``pipe.load_lora_weights`` (after
``enable_lyco``) and reproduce lycoris' own applied forward on the UNet and both text encoders (fp32, <= 1e-5)."""

import pytest
import torch

from peft_lyco.convert import kohya_to_peft
from peft_lyco.diffusers import enable_lyco
from tests.convert.helpers import fresh_pipe, generic_lycoris, lycoris_case, max_diff, outputs, rename

TOL = 1e-5

# name -> lycoris kohya-wrapper arguments
VARIANTS = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "loha-conv-rank": dict(algo="loha", conv_dim=2, conv_alpha=1),
    "lokr-f-1": dict(algo="lokr", factor=-1),
    "lokr-f-1-dim2": dict(algo="lokr", factor=-1, dim=2, alpha=1),
    "lokr-f4": dict(algo="lokr", factor=4),
    "lokr-f8-decompose": dict(algo="lokr", factor=8, dim=2, alpha=1, decompose_both=True),
    "lokr-tucker": dict(algo="lokr", factor=-1, dim=2, alpha=1, use_tucker=True),
    "lokr-tucker-decompose": dict(algo="lokr", factor=4, dim=1, alpha=1, use_tucker=True, decompose_both=True),
    "lokr-full-matrix": dict(algo="lokr", factor=8, full_matrix=True),
    "lokr-dim100000": dict(algo="lokr", factor=8, dim=100000, alpha=3),
    "lokr-dim100000-fp16": dict(algo="lokr", factor=-1, dim=100000, alpha=3, dtype="float16"),  # alpha saved as inf
    "lokr-unbalanced": dict(algo="lokr", factor=4, dim=2, alpha=1, unbalanced_factorization=True),
    "loha-fp16": dict(algo="loha", dtype="float16"),
    "lokr-bf16": dict(algo="lokr", factor=4, dim=2, alpha=1, dtype="bfloat16"),
    "mixed-lora-loha-lokr": dict(
        algo="loha",
        module_algo_map=(("ResnetBlock2D", (("algo", "lora"),)), ("CLIPMLP", (("algo", "lokr"), ("factor", 4)))),
    ),
}
NAMINGS = ["lycoris", "sd-scripts", "lycoris_prefix", "dotted"]
# Every variant in the file's own naming, every naming on the two variants with the most layouts (conv + Tucker);
# the full cross product is the slow test below.
FAST = [(v, "lycoris") for v in VARIANTS] + [(v, n) for v in ("loha-tucker", "lokr-tucker") for n in NAMINGS[1:]]


def load_and_compare(variant: str, naming: str) -> dict[str, float]:
    state_dict, _, reference, base = lycoris_case(**VARIANTS[variant])
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(rename(state_dict, naming), adapter_name="lyco")
    ours = outputs(pipe)
    effect = max_diff(reference, base)
    assert min(effect.values()) > 1e-3, f"lycoris' adapter must change every output: {effect}"
    diffs = max_diff(ours, reference)
    assert max(diffs.values()) <= TOL, diffs
    return diffs


@pytest.mark.parametrize("variant,naming", FAST)
def test_lycoris_file_matches_lycoris_forward(variant, naming):
    load_and_compare(variant, naming)


@pytest.mark.slow
@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_in_every_naming(variant, naming):
    load_and_compare(variant, naming)


def test_file_layouts_become_per_module_patterns():
    state_dict, metadata, _, _ = lycoris_case(**VARIANTS["lokr-tucker"])
    conversion = kohya_to_peft(state_dict, metadata=metadata)
    unet = conversion["unet"].config
    assert unet.use_tucker and unet.factor == -1 and unet.r == 2
    # the 1x1 and Linear modules and the kxk Tucker convs share one default: no per-module overrides are needed
    assert unet.option_pattern == {} and unet.rank_pattern == {}
    state_dict, metadata, _, _ = lycoris_case(**VARIANTS["loha-conv-rank"])
    unet = kohya_to_peft(state_dict, metadata=metadata)["unet"].config
    convs = {"conv_in", "conv_out", "conv1", "conv2", "conv"}
    assert {key.lstrip("^").replace("\\.", ".").split(".")[-1] for key in unet.rank_pattern} <= convs and len(
        unet.rank_pattern
    ) == 28  # 12 resnets x 2 + conv_in, conv_out, down-, upsampler
    assert set(unet.rank_pattern.values()) == {2} and set(unet.alpha_pattern.values()) == {1.0}


def test_mixed_file_uses_peft_lora_for_lora_modules():
    state_dict, metadata, _, _ = lycoris_case(**VARIANTS["mixed-lora-loha-lokr"])
    conversion = kohya_to_peft(state_dict, metadata=metadata)
    assert set(conversion["unet"].parts) == {"lora", "loha"}
    assert set(conversion["text_encoder"].parts) == {"loha", "lokr"}
    with pytest.raises(ValueError, match="mixes"):
        _ = conversion["unet"].config
    lora = conversion["unet"].parts["lora"]
    assert lora.config.peft_type == "LORA" and all(
        ".lora_A.weight" in k or ".lora_B.weight" in k for k in lora.state_dict
    )


def test_fp16_file_keeps_its_tensors_exactly():
    state_dict, metadata, _, _ = lycoris_case(**VARIANTS["loha-fp16"])
    peft_state = kohya_to_peft(state_dict, metadata=metadata)["unet"].state_dict
    key = "down_blocks.1.attentions.0.proj_in.hada_w1_a"
    assert peft_state[key].dtype == torch.float16
    assert torch.equal(peft_state[key], state_dict["lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a"])


def test_generic_wrapper_file_with_lycoris_prefix():
    """A file from LyCORIS' generic ``create_lycoris`` on the UNet: ``lycoris_`` + diffusers paths."""
    theirs = fresh_pipe()
    base = outputs(theirs)["unet"]
    network, state_dict = generic_lycoris(
        theirs.unet, targets=("Linear", "Conv2d"), algo="lokr", linear_dim=2, linear_alpha=1, factor=4, use_tucker=True
    )
    assert len(network.loras) == 183 and all(key.startswith("lycoris_") for key in state_dict)
    reference = outputs(theirs)["unet"]
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(state_dict)
    assert (reference - base).abs().max() > 1e-3
    assert (outputs(pipe)["unet"] - reference).abs().max() <= TOL
