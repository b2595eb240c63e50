"""Bad files get one clear ``LycoFileError`` that names every offending key or module (the pipeline-level "left
exactly as it was" checks are in tests/diffusers)."""

import pytest
import torch

from peft_lyco.convert import LycoFileError, kohya_to_peft
from tests.convert.helpers import fresh_pipe, lycoris_case
from tests.convert.test_lycoris_files import VARIANTS

PROJ_IN = "lora_unet_down_blocks_1_attentions_0_proj_in"
CONV_IN = "lora_unet_conv_in"


@pytest.fixture(scope="module")
def pipe():
    return fresh_pipe()


@pytest.fixture
def loha():
    return dict(lycoris_case(**VARIANTS["loha"])[0])


@pytest.fixture
def lokr():
    return dict(lycoris_case(**VARIANTS["lokr-f-1-dim2"])[0])


def convert(state_dict, pipe, **kwargs):
    return kohya_to_peft(state_dict, model=pipe, **kwargs)


def test_unknown_keys_are_listed_or_skipped_on_request(loha, pipe, caplog):
    loha[f"{PROJ_IN}.weight"] = torch.zeros(1)
    loha["lora_unet_input_blocks_99_1_proj_in.hada_w1_a"] = torch.zeros(1)
    with pytest.raises(LycoFileError) as err:
        convert(loha, pipe)
    message = str(err.value)
    assert f"{PROJ_IN}.weight" in message and "lora_unet_input_blocks_99_1_proj_in" in message
    assert "ignore_unknown_keys=True" in message
    conversion = convert(loha, pipe, ignore_unknown_keys=True)
    assert len(conversion["unet"].modules) == 183
    assert (
        "skipping keys with no known parameter name (1)" in caplog.text
        and "lora_unet_input_blocks_99_1_proj_in" in caplog.text
    )


def _orphan_alpha(sd):
    for key in [k for k in sd if k.startswith("lora_unet_conv_out.") and not k.endswith(".alpha")]:
        del sd[key]


DAMAGE = {
    "missing-factor": (
        lambda sd: sd.pop(f"{PROJ_IN}.hada_w2_b"),
        r"incomplete or mixed key set: missing \['hada_w2_b'\]",
    ),
    "half-tucker": (lambda sd: sd.update({f"{PROJ_IN}.hada_t1": torch.zeros(4, 4, 1, 1)}), "missing.*hada_t2"),
    "wrong-shape": (
        lambda sd: sd.update({f"{PROJ_IN}.hada_w1_b": torch.zeros(4, 33)}),
        "do not fit a Linear 64->64 layer",
    ),
    "nan": (
        lambda sd: sd.update({f"{PROJ_IN}.hada_w1_a": torch.full((64, 4), float("nan"))}),
        "hada_w1_a contains NaN",
    ),
    "int": (
        lambda sd: sd.update({f"{PROJ_IN}.hada_w1_a": torch.zeros(64, 4, dtype=torch.int32)}),
        "must be floating point",
    ),
    "alpha-vector": (lambda sd: sd.update({f"{PROJ_IN}.alpha": torch.ones(2)}), "alpha must hold one value"),
    "alpha-inf": (lambda sd: sd.update({f"{PROJ_IN}.alpha": torch.tensor(float("inf"))}), "alpha is inf"),
    "dora-1d": (lambda sd: sd.update({f"{PROJ_IN}.dora_scale": torch.ones(64)}), "does not say its axis"),
    "dora-shape": (lambda sd: sd.update({f"{PROJ_IN}.dora_scale": torch.ones(64, 2)}), "fits neither axis"),
    "alpha-huge": (  # finite, but the scaled ΔW makes the UNet output NaN (issue 9.6)
        lambda sd: sd.update({f"{PROJ_IN}.alpha": torch.tensor(1e30)}),
        rf"{PROJ_IN} .*alpha 1e\+30 / rank 4 makes ΔW reach",
    ),
    "scale": (lambda sd: sd.update({f"{PROJ_IN}.scale": torch.ones(())}), "'scale' tensor"),
    "orphan-alpha": (_orphan_alpha, "lora_unet_conv_out.*no adapter tensors"),
    "duplicate": (lambda sd: sd.update({"lora_unet_out_2.hada_w1_a": sd[f"{CONV_IN}.hada_w1_a"]}), "already adapted"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_invalid_modules_are_named(loha, pipe, kind):
    damage, expected = DAMAGE[kind]
    damage(loha)
    with pytest.raises(LycoFileError, match=expected):
        convert(loha, pipe)


def test_every_problem_is_reported_at_once(loha, pipe):
    loha.pop(f"{PROJ_IN}.hada_w2_b")
    loha[f"{CONV_IN}.hada_w1_a"] = loha[f"{CONV_IN}.hada_w1_a"] * float("inf")
    loha["lora_te1_encoder_layers_0_mlp_fc1.lora_mid.weight"] = torch.zeros(1)
    with pytest.raises(LycoFileError, match=r"invalid modules \(3\)") as err:
        convert(loha, pipe)
    assert all(name in str(err.value) for name in (PROJ_IN, CONV_IN, "lora_te1_encoder_layers_0_mlp_fc1"))


def test_lokr_shape_problems(lokr, pipe):
    lokr_w1 = next(k for k in lokr if k.endswith(".lokr_w1") and k.startswith(PROJ_IN))
    bad = dict(lokr)
    bad[lokr_w1] = torch.zeros(3, 3)  # no factor splits 64 into 3 x ...
    with pytest.raises(LycoFileError, match=f"{PROJ_IN}.*no LoKr layout of a Linear 64->64 layer at rank 2"):
        convert(bad, pipe)
    bad = dict(lokr)
    del bad[lokr_w1]
    with pytest.raises(LycoFileError, match="missing \\['lokr_w1'\\]"):
        convert(bad, pipe)
    bad = dict(lokr)
    name = lokr_w1.split(".")[0]
    bad.pop(lokr_w1)
    bad[f"{name}.lokr_w1_a"], bad[f"{name}.lokr_w1_b"] = torch.zeros(8, 3), torch.zeros(3, 8)
    with pytest.raises(LycoFileError, match="different ranks"):
        convert(bad, pipe)


def test_a_file_for_another_model_is_refused(loha, pipe):
    anima = {
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w1": torch.zeros(32, 32),
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w2": torch.zeros(64, 64),
    }
    with pytest.raises(LycoFileError, match="match no module of the sdxl model"):
        convert(anima, pipe, model_type="sdxl")
    bigger = {
        key: torch.cat([value, value]) if value.dim() == 2 and key.endswith("_a") else value
        for key, value in loha.items()
    }
    with pytest.raises(LycoFileError, match=r"invalid modules \(\d+\)"):
        convert(bigger, pipe)
    with pytest.raises(LycoFileError, match="no LoHa, LoKr or LoRA module"):
        convert({}, pipe, model_type="sdxl")


def test_1d_dora_scale_from_lycoris_files_is_refused_naming_every_module(pipe):
    state_dict = {
        k: v.flatten() if k.endswith(".dora_scale") else v
        for k, v in lycoris_case(algo="loha", dora_wd=True)[0].items()
    }
    with pytest.raises(LycoFileError, match=r"(?s)invalid modules \(243\).*does not say its axis") as err:
        convert(state_dict, pipe)
    assert PROJ_IN in str(err.value)


def test_missing_or_zero_alpha_means_alpha_equals_rank(loha, pipe):
    loha.pop(f"{PROJ_IN}.alpha")
    loha[f"{CONV_IN}.alpha"] = torch.tensor(0.0)
    modules = {m.name: m for m in convert(loha, pipe)["unet"].modules}
    assert modules[PROJ_IN].alpha == modules[PROJ_IN].rank == 4
    assert modules[CONV_IN].alpha == modules[CONV_IN].rank == 4


def test_degenerate_tensors_are_named(loha, pipe):
    loha[f"{PROJ_IN}.hada_w1_b"] = torch.zeros(4)
    loha[f"{CONV_IN}.hada_w1_b"] = torch.zeros(0, 36)
    with pytest.raises(LycoFileError, match=r"(?s)invalid modules \(2\).*must be a non-empty matrix") as err:
        convert(loha, pipe)
    assert PROJ_IN in str(err.value) and CONV_IN in str(err.value)


@pytest.mark.parametrize(
    "metadata",
    [
        {"ss_base_model_version": "sd_v1"},
        {"ss_base_model_version": "flux1"},
        {"modelspec.architecture": "stable-diffusion-v1/lora"},
    ],
)
def test_a_file_tagged_for_another_model_family_warns(loha, pipe, metadata):
    """An SD1.5/Flux-tagged file whose names happen to fit loaded silently (issue 9.11)."""
    with pytest.warns(UserWarning, match=f"{next(iter(metadata.values()))}.*sdxl"):
        convert(loha, pipe, metadata=metadata)


def test_files_tagged_for_the_same_family_load_quietly(loha, pipe, recwarn):
    convert(
        loha,
        pipe,
        metadata={
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        },
    )
    assert not [w for w in recwarn if "model family" in str(w.message)]
