"""Continuing and keeping runs: --network_weights / --dim_from_weights, --save_last_n_*, text-encoder-only training,
--scale_weight_norms (max-norm), and the optimizer names (case-insensitive, bitsandbytes' AdamW8bit)."""

import importlib.util
import sys

import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as trainer
from lyco_train import network_weights
from lyco_train.args import UsageError
from lyco_train.max_norm import adapted_layers, apply_max_norm
from lyco_train.network_weights import NetworkWeightsError
from lyco_train.pruning import Retention, prune
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from peft import inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.convert import kohya_to_peft, load_kohya, peft_to_kohya, save_kohya
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def run(tmp_path, *extra, name="run", module=trainer):
    """A tiny run without the embedded default's closing reload check (its own tests cover it; it costs 8 s)."""
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=2, size=64, repeats=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "check_reload", lambda *args, **kwargs: None)
        return module.main(
            ["--train_data_dir", str(data), "--output_dir", str(tmp_path / name), "--sample_every_n_steps", "1000",
             *extra]
        )  # fmt: skip


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ optimizer names
@pytest.mark.parametrize("spelling", ["adamw8bit", "AdamW8bit", "ADAMW8BIT", "adamw", "AdamW"])
def test_optimizer_names_are_case_insensitive(spelling):
    args = trainer.parse_args(["--optimizer_type", spelling, "--max_train_steps", "1"])
    assert args.optimizer_type == {"adamw8bit": "AdamW8bit", "adamw": "AdamW"}[spelling.lower()]


def test_unknown_optimizer_is_refused_listing_the_choices(capsys):
    with pytest.raises(SystemExit):
        trainer.parse_args(["--optimizer_type", "adamw9bit"])
    assert "unknown optimizer 'adamw9bit'; choose from AdamW, AdamW8bit" in capsys.readouterr().err


@pytest.mark.parametrize("module, loader", [(trainer, "load_pipeline"), (anima_trainer, "load_models")])
def test_adamw8bit_without_bitsandbytes_fails_at_start_naming_the_extra(tmp_path, monkeypatch, module, loader):
    """Works whether or not bitsandbytes is installed: the module is hidden (import fails, find_spec is None)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(module, loader, lambda *a: pytest.fail("model loaded before the input was checked"))
    make_shapes_dataset(tmp_path / "data", count=1, size=64, repeats=1)
    with pytest.raises(
        UsageError, match=r"--optimizer_type AdamW8bit needs bitsandbytes: pip install 'peft_lyco\[bnb\]'"
    ):
        module.main(["--train_data_dir", str(tmp_path / "data"), "--optimizer_type", "adamw8bit"])


# --------------------------------------------------------------------------------------------------------- pruning
def _touch_saves(folder, name, kind, numbers):
    for n in numbers:
        stem = f"{name}-{n:06d}" if kind == "epoch" else f"{name}-step{n:08d}"
        (folder / f"{stem}.safetensors").write_bytes(b"x")
        (folder / f"{stem}_peft").mkdir()
        (folder / f"{stem}-state").mkdir()


def test_save_last_n_epochs_keeps_exactly_the_last_n(tmp_path):
    _touch_saves(tmp_path, "run", "epoch", [2, 4, 6, 8, 10])
    (tmp_path / "run.safetensors").write_bytes(b"final")
    (tmp_path / "other-000002.safetensors").write_bytes(b"another run")
    removed = prune(tmp_path, "run", Retention(last_n_epochs=3), kind="epoch", number=10, every=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        ["run.safetensors", "other-000002.safetensors"]
        + [f"run-{n:06d}{s}" for n in (6, 8, 10) for s in (".safetensors", "_peft", "-state")]
    )
    assert len(removed) == 6
    # the state override keeps more states than files
    _touch_saves(tmp_path, "b", "epoch", [1, 2, 3, 4])
    prune(tmp_path, "b", Retention(last_n_epochs=1, last_n_epochs_state=3), kind="epoch", number=4, every=1)
    assert sorted(p.name for p in tmp_path.glob("b-*")) == ["b-000002-state", "b-000003-state", "b-000004-state",
                                                             "b-000004.safetensors", "b-000004_peft"]  # fmt: skip


@pytest.mark.parametrize("step, every, keep", [(50, 10, 30), (60, 10, 30), (7, 1, 2), (40, 20, 10)])
def test_save_last_n_steps_follows_sd_scripts(tmp_path, step, every, keep):
    """sd-scripts removes the save at (step - N - 1) rounded down to a multiple of every: the saves of the last N
    steps stay (e.g. steps 20..50 at step 50 with every 10, N 30)."""
    numbers = list(range(every, step + 1, every))
    _touch_saves(tmp_path, "r", "step", numbers)
    prune(tmp_path, "r", Retention(last_n_steps=keep), kind="step", number=step, every=every)
    removed_at = step - keep - 1
    removed_at -= removed_at % every
    expected = [n for n in numbers if n > removed_at]
    assert sorted(int(p.name[6:14]) for p in tmp_path.glob("r-step*.safetensors")) == expected


# ------------------------------------------------------------------------------------------------------- max-norm
def _hand_delta(layer, algo):
    """ΔW from the factors by the LoHa/LoKr formulas (an independent computation), times alpha/rank."""
    p = {k: v.detach().double() for k, v in layer.adapter_parameters("default").items()}
    scale = layer.scaling["default"]
    if algo == "loha":
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta = torch.kron(w1, w2)
    return delta * scale


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_max_norm_scales_each_module_above_the_cap_to_the_cap(algo):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 96) for _ in range(6)])
    targets = [str(i) for i in range(6)]
    config = (
        LoHaConfig(r=4, alpha=2.0, target_modules=targets)
        if algo == "loha"
        else LoKrConfig(r=2, alpha=1.0, factor=8, target_modules=targets)
    )
    inject_adapter_in_model(config, model)
    layers = adapted_layers([model])
    assert len(layers) == 6
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for tensor in layer.adapter_parameters("default").values():
                tensor.copy_(torch.randn_like(tensor) * (0.3 + 0.3 * i))
    before = [_hand_delta(layer, algo) for layer in layers]
    norms = [float(d.norm()) for d in before]
    cap = sorted(norms)[2] * 1.001  # three modules below the cap, three above
    report = apply_max_norm([model], cap)
    after = [_hand_delta(layer, algo) for layer in layers]
    over = [n > cap for n in norms]
    assert report.keys_scaled == sum(over) == 3
    for was, now, norm, scaled in zip(before, after, norms, over):
        if scaled:
            assert float(now.norm()) == pytest.approx(cap, rel=1e-6)
            torch.testing.assert_close(
                now, was * (cap / norm), rtol=1e-5, atol=1e-6 * float(now.abs().max())
            )  # direction kept
        else:
            assert torch.equal(now, was)
    expected = [min(n, cap) for n in norms]
    assert report.mean_norm == pytest.approx(sum(expected) / 6, rel=1e-6)
    assert report.max_norm == pytest.approx(max(expected), rel=1e-6)


# ------------------------------------------------------------------------------- trainer runs (tiny SDXL, CPU)
@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """3 one-step epochs, a save every epoch, --save_last_n_epochs 1 (+ states): the start file of the
    continuation tests."""
    tmp_path = tmp_path_factory.mktemp("first")
    result = run(tmp_path, "--max_train_epochs", "3", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1",
                 "--save_state", "--learning_rate", "2e-2", "--network_args", "conv_dim=2", "conv_alpha=1")  # fmt: skip
    yield tmp_path, result
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_save_last_n_epochs_in_a_run_keeps_the_last_epoch_save(first_run):
    tmp_path, result = first_run
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != "data")
    # epoch 3 is the final save; after the save of epoch 2 that of epoch 1 is removed (file and state)
    assert names == [
        "tiny_sdxl_lokr-000002-state",
        "tiny_sdxl_lokr-000002.safetensors",
        "tiny_sdxl_lokr-state",
        "tiny_sdxl_lokr.safetensors",
    ]
    assert all(path.exists() for path in result.files)  # the run's list no longer names removed files


class Loaded(Exception):
    """Stops a run right after its adapter was built and --network_weights loaded (nothing else is under test)."""


def load_only(monkeypatch, tmp_path, *argv, name="run", module=trainer, model_type="sdxl"):
    """The run's adapter, as a kohya state dict, right after --network_weights was loaded, and the run's options."""
    captured = {}
    original = network_weights.add_network

    def add_network(args, *rest, **kwargs):
        trained = original(args, *rest, **kwargs)
        captured.update({k: v.clone() for k, v in peft_to_kohya(trained, model_type=model_type)[0].items()})
        captured["args"] = args
        raise Loaded

    monkeypatch.setattr(module, "add_network", add_network)
    with pytest.raises(Loaded):
        run(tmp_path, *argv, name=name, module=module)
    return captured.pop("args"), captured


def test_network_weights_starts_bit_exactly_from_the_file(first_run, tmp_path, monkeypatch):
    _, start = first_run
    start_file = load_file(start.final)
    _, loaded = load_only(monkeypatch, tmp_path, "--network_weights", str(start.final), "--network_args",
                          "conv_dim=2", "conv_alpha=1")  # fmt: skip
    assert same_tensors(loaded, start_file)

    # the same file in LyCORIS/diffusers naming, the network taken from the file (--network_dim is then ignored)
    state_dict, metadata = load_kohya(start.final)
    conversion = kohya_to_peft(state_dict, metadata=metadata, model=tiny_sdxl_pipeline(seed=0))
    renamed, meta = peft_to_kohya(conversion, model_type="sdxl", naming="diffusers")
    assert set(renamed) != set(state_dict)  # really another naming
    save_kohya(tmp_path / "diffusers_names.safetensors", renamed, metadata=meta)
    args, loaded = load_only(monkeypatch, tmp_path, "--network_weights", str(tmp_path / "diffusers_names.safetensors"),
                             "--dim_from_weights", "--network_dim", "7", name="run2")  # fmt: skip
    assert same_tensors(loaded, start_file)
    assert args.network_dim == 2 and args.algo == "lokr"


def test_network_weights_that_do_not_fit_name_the_modules_and_the_fix(first_run, tmp_path):
    _, start = first_run
    with pytest.raises(NetworkWeightsError, match=r"(?s)--dim_from_weights.*lora_unet_.*layout"):
        run(tmp_path, "--network_weights", str(start.final), "--network_dim", "3", "--max_train_steps", "1")
    with pytest.raises(NetworkWeightsError, match="scale alpha/dim"):
        run(tmp_path, "--network_weights", str(start.final), "--network_alpha", "2", "--max_train_steps", "1",
            "--network_args", "conv_dim=2", "conv_alpha=1")  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--network_weights", "missing.safetensors"], "--network_weights file 'missing.safetensors' does not exist"),
        (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
        (["--save_last_n_epochs", "2"], "--save_last_n_epochs needs --save_every_n_epochs"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
        (["--scale_weight_norms", "0"], "--scale_weight_norms must be > 0"),
        (["--scale_weight_norms", "1", "--network_args", "dora_wd=True"], "DoRA"),
    ],
)
def test_bad_continuation_options_fail_before_any_model_loads(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the input was checked"))
    with pytest.raises(UsageError, match=message):
        trainer.main(["--train_data_dir", str(tmp_path), *argv])


def test_truncated_network_weights_are_reported_before_any_model_loads(first_run, tmp_path, monkeypatch):
    _, start = first_run
    data = start.final.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the input was checked"))
    with pytest.raises(UsageError, match="cut.safetensors"):
        trainer.main(["--network_weights", str(tmp_path / "cut.safetensors")])


def test_pickled_network_weights_are_refused_unopened(tmp_path, monkeypatch):
    (tmp_path / "w.ckpt").write_bytes(b"\x80\x04 pickle")
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the input was checked"))
    with pytest.raises(UsageError, match="not a .safetensors file"):
        trainer.main(["--network_weights", str(tmp_path / "w.ckpt")])


def test_text_encoder_only_with_max_norm_and_adamw8bit(tmp_path):
    """Only text-encoder modules are trained and saved; after every step each module's ΔW norm is at most the cap."""
    cap = 0.01
    optimizer = ["--optimizer_type", "adamw8bit"] if HAS_BNB else []
    result = run(tmp_path, "--network_train_text_encoder_only", "--scale_weight_norms", str(cap), "--max_train_steps",
                 "1", "--learning_rate", "5e-2", "--save_state", *optimizer)  # fmt: skip
    state_dict, _ = load_kohya(result.final)
    assert state_dict and all(k.startswith(("lora_te1_", "lora_te2_")) for k in state_dict)
    assert not adapted_layers([result.pipe.unet])
    layers = adapted_layers([result.pipe.text_encoder, result.pipe.text_encoder_2])
    norms = [float(layer.get_delta_weight("default").double().norm()) for layer in layers]
    assert max(norms) <= cap * (1 + 1e-5) and sum(n > cap * (1 - 1e-5) for n in norms) > len(norms) // 2
    if HAS_BNB:  # bitsandbytes' optimizer state names, not torch AdamW's exp_avg
        saved = load_file(state_files(tmp_path / "run" / "tiny_sdxl_lokr-state")["optimizer"])
        assert any(k.endswith("state1") for k in saved) and not any("exp_avg" in k for k in saved)
