"""sd-scripts --network_args parsing: every option as a string and as a keyword, and errors that name the argument."""

from dataclasses import fields

import pytest

from peft_lyco.presets import NetworkArgs, NetworkArgsError, parse_network_args
from peft_lyco.presets.network_args import OPTIONS

ALL_STRINGS = [
    "conv_dim=16",
    "conv_alpha=8",
    "use_tucker=True",
    "factor=4",
    "rank_dropout=0.1",
    "module_dropout=0.2",
    r"exclude_patterns=[r'.*attn2.*', '.*ff\.net.*']",
    "include_patterns=['.*attn2\\.to_q']",
    r"network_reg_dims=.*attn1.*=8,up_blocks\.0.*=32",
    "network_reg_lrs=.*attn1.*=1e-4,.*ff.*=0",
    "train_llm_adapter=true",
    "loraplus_lr_ratio=4",
    "loraplus_unet_lr_ratio=8",
    "loraplus_text_encoder_lr_ratio=2",
    "verbose=False",
    "dropout=None",
    "rank_dropout_scale=false",
    "dora_wd=True",
    "wd_on_output=False",
    "use_scalar=true",
    "rs_lora=True",
    "decompose_both=True",
    "full_matrix=False",
    "unbalanced_factorization=False",
]


def test_every_option_has_a_parser_and_a_field():
    assert {f.name for f in fields(NetworkArgs)} == set(OPTIONS) == {item.split("=", 1)[0] for item in ALL_STRINGS}


def test_every_option_parses_from_sd_scripts_strings():
    args = parse_network_args(ALL_STRINGS)
    assert args == NetworkArgs(
        conv_dim=16,
        conv_alpha=8.0,
        use_tucker=True,
        factor=4,
        rank_dropout=0.1,
        module_dropout=0.2,
        exclude_patterns=(".*attn2.*", r".*ff\.net.*"),
        include_patterns=(r".*attn2\.to_q",),
        network_reg_dims=((".*attn1.*", 8), (r"up_blocks\.0.*", 32)),
        network_reg_lrs=((".*attn1.*", 1e-4), (".*ff.*", 0.0)),
        train_llm_adapter=True,
        loraplus_lr_ratio=4.0,
        loraplus_unet_lr_ratio=8.0,
        loraplus_text_encoder_lr_ratio=2.0,
        verbose=False,
        dropout=None,
        rank_dropout_scale=False,
        dora_wd=True,
        wd_on_output=False,
        use_scalar=True,
        rs_lora=True,
        decompose_both=True,
        full_matrix=False,
        unbalanced_factorization=False,
    )
    assert args.training_options() == {
        "reg_lrs": {".*attn1.*": 1e-4, ".*ff.*": 0.0},
        "loraplus_lr_ratio": 4.0,
        "loraplus_unet_lr_ratio": 8.0,
        "loraplus_text_encoder_lr_ratio": 2.0,
    }


def test_keywords_take_python_values_and_mix_with_strings():
    args = parse_network_args(
        ["conv_dim=4"],
        use_tucker=True,
        exclude_patterns=".*norm.*",
        network_reg_dims={"a.*": 2, "b.*": 0},
        network_reg_lrs=[("c.*", 1e-3)],
        factor=-1,
    )
    assert (args.conv_dim, args.conv_alpha, args.use_tucker, args.factor) == (4, None, True, -1)
    assert args.exclude_patterns == (".*norm.*",)
    assert args.network_reg_dims == (("a.*", 2), ("b.*", 0))
    assert args.network_reg_lrs == (("c.*", 1e-3),)
    assert parse_network_args() == NetworkArgs()


def test_reg_dims_regexes_may_contain_commas_and_equals():
    args = parse_network_args([r"network_reg_dims=blocks\.[0-9]{1,2}\.mlp.*=16,(?:x=1,y)=4, ,z=2"])
    assert args.network_reg_dims == ((r"blocks\.[0-9]{1,2}\.mlp.*", 16), ("(?:x=1,y)", 4), ("z", 2))


@pytest.mark.parametrize(
    "network_args, message",
    [
        (["conv_dims=4"], "unknown network argument 'conv_dims'. Did you mean 'conv_dim'"),
        (["algo=lokr"], "'algo' is not supported"),
        (["use_tucker=1"], r"use_tucker='1': expected True or False"),
        (["factor=0"], "factor='0': must be -1"),
        (["factor=2.5"], "factor='2.5': expected an integer"),
        (["conv_dim=-1"], "conv_dim='-1': must be >= 0"),
        (["rank_dropout=1.5"], r"rank_dropout='1.5': must be in \[0, 1\)"),
        (["module_dropout=abc"], "module_dropout='abc': expected a number"),
        (["exclude_patterns=.*attn.*"], "exclude_patterns='.*attn.*': expected a Python literal"),
        (["exclude_patterns=['(']"], "invalid regex '\\('"),
        (["include_patterns=[1, 2]"], "expected a regex string or a list"),
        (["network_reg_dims=.*=4,nonsense"], "cannot read 'nonsense' as regex=value"),
        (["network_reg_dims=.*attn.*=4.5"], r"value of '\.\*attn\.\*': expected an integer"),
        (["network_reg_lrs=.*=-1"], "must be >= 0"),
        (["loraplus_lr_ratio=0"], "must be > 0"),
        (["conv_alpha=4"], "conv_alpha needs conv_dim"),
        (["dropout=1.5"], r"dropout='1.5': must be in \[0, 1\)"),
        (["dora_wd=yes"], "dora_wd"),
        (["conv_dim=4", "conv_dim=8"], "'conv_dim' is given twice"),
        (["conv_dim"], "'conv_dim' is not of the form key=value"),
        ("conv_dim=4", "network_args must be a list"),
    ],
)
def test_malformed_or_unknown_arguments_raise_naming_them(network_args, message):
    with pytest.raises(NetworkArgsError, match=message):
        parse_network_args(network_args)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"use_tucker": "True"}, "use_tucker='True': expected a bool"),
        ({"conv_dim": True}, "expected an integer"),
        ({"rank_dropout": float("nan")}, "expected a finite number"),
        ({"network_reg_dims": {"a": -2}}, "value of 'a': must be >= 0"),
        ({"verbos": True}, "Did you mean 'verbose'"),
    ],
)
def test_bad_keyword_values_raise_naming_them(options, message):
    with pytest.raises(NetworkArgsError, match=message):
        parse_network_args(**options)


def test_same_option_in_both_forms_is_an_error():
    with pytest.raises(NetworkArgsError, match="given both in network_args and as a keyword"):
        parse_network_args(["factor=4"], factor=8)
