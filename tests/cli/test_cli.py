"""The peft-lyco command line on the tiny SDXL and Anima models: every subcommand, its numerical claims, its errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file

import peft_lyco  # noqa: F401
from peft_lyco import LoKrConfig
from peft_lyco.cli import main
from peft_lyco.cli.adapters import module_delta, read_adapter
from peft_lyco.convert import load_kohya, peft_to_kohya, save_kohya
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[2]
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny_sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def random_adapter(unet, config, seed):
    """``unet`` copy with our adapter injected and every factor random (a trained-looking adapter)."""
    model = inject_adapter_in_model(config, copy.deepcopy(unet), "default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lokr_" in name or "hada_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def lokr_file(pipe, path, seed=0, targets=(*ATTN, "conv1"), **options):
    config = LoKrConfig(r=4, alpha=2, factor=4, target_modules=list(targets), **options)
    model = random_adapter(pipe.unet, config, seed)
    state_dict, metadata = peft_to_kohya({"unet": model})
    return save_kohya(path, state_dict, metadata)


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


# ------------------------------------------------------------------------------------------------------ basics
def test_module_entry_point_help_runs_in_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "peft_lyco", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("inspect", "convert", "merge", "extract", "resize"):
        assert command in result.stdout


def test_every_subcommand_explains_itself(capsys):
    for command in ("inspect", "convert", "merge", "extract", "resize"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 400


# ------------------------------------------------------------------------------------------------------ inspect
def test_inspect_reports_modules_scales_and_warnings(pipe, tmp_path, capsys):
    path = lokr_file(pipe, tmp_path / "a.safetensors")
    state_dict, metadata = load_kohya(path)
    name = min(k for k in state_dict if k.endswith("attn1_to_q.alpha"))
    state_dict[name] = torch.tensor(0.0)  # an alpha oddity
    first = min(k for k in state_dict if "to_k.lokr_w1" in k or "to_k.lokr_w1".replace(".", "_") in k)
    state_dict[first] = state_dict[first].half()  # a mixed-dtype module
    save_kohya(tmp_path / "b.safetensors", state_dict, metadata)
    assert run_cli("inspect", tmp_path / "b.safetensors", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "sdxl" and report["format"] == "lokr" and report["naming"] == "kohya sgm"
    modules = {m["name"]: m for m in report["modules"]}
    assert len(modules) == len({k.split(".")[0] for k in state_dict})
    for m in modules.values():
        assert m["algo"] == "lokr"
        expected = 1.0 if "full" in m["layout"] and "alpha ignored" in m["scale_rule"] else m["alpha"] / m["rank"]
        assert m["scale"] == pytest.approx(expected)
    text = "\n".join(report["warnings"])
    assert "alpha 0" in text and name.split(".")[0] in text
    assert "mixed dtypes" in text
    assert report["metadata"]["ss_base_model_version"].startswith("sdxl")
    assert run_cli("inspect", tmp_path / "b.safetensors") == 0
    assert "scale_rule" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ convert
def test_convert_round_trip_is_bit_exact_and_loads_in_peft(pipe, tmp_path):
    path = lokr_file(pipe, tmp_path / "a.safetensors", decompose_both=True)
    assert run_cli("convert", path, tmp_path / "peft") == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert run_cli("convert", tmp_path / "peft", tmp_path / "back.safetensors") == 0
    original, _ = load_kohya(path)
    back, _ = load_kohya(tmp_path / "back.safetensors")
    assert sorted(original) == sorted(back)
    for key, tensor in original.items():
        assert torch.equal(tensor, back[key]) and tensor.dtype == back[key].dtype, key
    # the folder loads with PeftModel.from_pretrained and gives the file's ΔW
    model = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path / "peft"))
    layers = dict(model.base_model.model.named_modules())
    for module in read_adapter(path).modules:
        got = layers[module.path].get_delta_weight("default")
        torch.testing.assert_close(got, module_delta(module).reshape(got.shape), rtol=1e-6, atol=1e-7)


def test_convert_naming_and_dtype(pipe, tmp_path):
    path = lokr_file(pipe, tmp_path / "a.safetensors")
    assert run_cli("convert", path, tmp_path / "d.safetensors", "--naming", "diffusers", "--dtype", "fp16") == 0
    converted, _ = load_kohya(tmp_path / "d.safetensors")
    assert all(t.dtype == torch.float16 for t in converted.values())
    assert any("down_blocks" in k for k in converted) and not any("input_blocks" in k for k in converted)
    original, _ = load_kohya(path)
    assert len(converted) == len(original)


def test_convert_peft_builtin_lokr_folder(pipe, tmp_path, capsys):
    config = peft.LoKrConfig(r=4, alpha=3, target_modules=ATTN + ["conv1"], init_weights=False)
    model = get_peft_model(copy.deepcopy(pipe.unet), config)
    model.save_pretrained(tmp_path / "builtin")
    assert run_cli("convert", tmp_path / "builtin", tmp_path / "out.safetensors") == 0
    assert "checked" in capsys.readouterr().out
    written = read_adapter(tmp_path / "out.safetensors")
    layers = dict(model.base_model.model.named_modules())
    assert len(written.modules) == sum(isinstance(m, peft.tuners.lokr.layer.LoKrLayer) for m in layers.values())
    for module in written.modules:
        expected = layers[module.path].get_delta_weight("default")
        torch.testing.assert_close(module_delta(module).reshape(expected.shape), expected, rtol=1e-5, atol=1e-7)


def test_convert_errors_are_named(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04junk")
    assert run_cli("convert", tmp_path / "x.ckpt", tmp_path / "y.safetensors") == 1
    assert "never unpickles" in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()


# ------------------------------------------------------------------------------------------------------ merge
def test_merge_equals_the_pipeline_with_the_adapters_fused(pipe, sdxl_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    from peft_lyco.diffusers import enable_lyco

    first = lokr_file(pipe, tmp_path / "a.safetensors", seed=1)
    second = lokr_file(pipe, tmp_path / "b.safetensors", seed=2, decompose_both=True)
    out = tmp_path / "merged"
    assert run_cli("merge", "--model", sdxl_folder, "--adapter", f"{first}:0.7", "--adapter", second, "--out", out) == 0
    merged = UNet2DConditionModel.from_pretrained(out / "unet")
    reference = copy.deepcopy(pipe)
    enable_lyco(reference)
    reference.load_lora_weights(str(first), adapter_name="a")
    reference.load_lora_weights(str(second), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    reference.fuse_lora(adapter_names=["a", "b"])
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    hidden = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": torch.randn(1, 6, generator=generator)}
    added["text_embeds"] = torch.randn(
        1,
        pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim,
        generator=generator,
    )
    with torch.no_grad():
        want = reference.unet(sample, 10, hidden, added_cond_kwargs=added).sample
        got = merged(sample, 10, hidden, added_cond_kwargs=added).sample
        base = pipe.unet(sample, 10, hidden, added_cond_kwargs=added).sample
    assert (want - base).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # untouched components are copied as they are
    assert (out / "text_encoder" / "model.safetensors").read_bytes() == (
        sdxl_folder / "text_encoder" / "model.safetensors"
    ).read_bytes()


def test_merge_anima_checkpoint_keeps_dtype_and_adds_delta(tmp_path):
    from peft_lyco.models.anima import build_tiny_anima

    dit = build_tiny_anima(seed=0).dit
    weights = {f"net.{k}": v.to(torch.bfloat16) for k, v in dit.state_dict().items()}
    save_file(weights, str(tmp_path / "dit.safetensors"))
    config = LoKrConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"])
    model = random_adapter(dit, config, seed=3)
    state_dict, metadata = peft_to_kohya({"transformer": model})
    adapter = save_kohya(tmp_path / "anima_lokr.safetensors", state_dict, metadata)
    out = tmp_path / "merged.safetensors"
    assert run_cli("merge", "--model", tmp_path / "dit.safetensors", "--adapter", f"{adapter}:0.5", "--out", out) == 0
    merged = load_file(str(out))
    modules = read_adapter(adapter).modules
    assert len(modules) > 0
    for module in modules:
        key = f"net.{module.path}.weight"
        expected = (weights[key].double() + 0.5 * module_delta(module, torch.float64)).to(torch.bfloat16)
        assert merged[key].dtype == torch.bfloat16
        # float32 accumulation then one rounding: at most one bf16 ulp from the float64 reference
        assert torch.allclose(merged[key].double(), expected.double(), rtol=2**-7, atol=0), key
    untouched = [k for k in weights if not any(k == f"net.{m.path}.weight" for m in modules)]
    assert all(torch.equal(merged[k], weights[k]) for k in untouched)


def test_merge_refuses_another_models_adapter_and_writes_nothing(pipe, tmp_path, capsys):
    from peft_lyco.models.anima import build_tiny_anima

    dit = build_tiny_anima(seed=0).dit
    save_file(dict(dit.state_dict()), str(tmp_path / "dit.safetensors"))
    sdxl_adapter = lokr_file(pipe, tmp_path / "a.safetensors")
    out = tmp_path / "merged.safetensors"
    assert run_cli("merge", "--model", tmp_path / "dit.safetensors", "--adapter", sdxl_adapter, "--out", out) == 1
    assert "sdxl adapter" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ extract
def tuned_folder(pipe, sdxl_folder, tmp_path, adapter):
    out = tmp_path / "tuned"
    assert run_cli("merge", "--model", sdxl_folder, "--adapter", adapter, "--out", out) == 0
    return out


def printed_errors(output: str) -> dict[str, float]:
    """Module name -> relative error from the per-module lines extract prints (``<error>  <name>``)."""
    errors = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("lora_"):
            errors[parts[1]] = float(parts[0])
    return errors


def test_extract_recovers_an_exact_lokr(pipe, sdxl_folder, tmp_path, capsys):
    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=4)
    tuned = tuned_folder(pipe, sdxl_folder, tmp_path, adapter)
    out = tmp_path / "x.safetensors"
    code = run_cli("extract", "--base", sdxl_folder, "--tuned", tuned, "--algo", "lokr", "--rank", 4,
                   "--conv_rank", 4, "--factor", 4, "--out", out)  # fmt: skip
    assert code == 0
    errors = printed_errors(capsys.readouterr().out)
    original = {m.name: m for m in read_adapter(adapter).modules}
    assert set(errors) == set(original)
    assert max(errors.values()) <= 1e-4
    for module in read_adapter(out).modules:  # the file's own ΔW, not only the printed error
        want = module_delta(original[module.name], torch.float64)
        got = module_delta(module, torch.float64)
        assert float((got - want).norm() / want.norm()) <= 1e-4, module.name


def test_extract_lora_error_is_the_discarded_singular_values(pipe, sdxl_folder, tmp_path):
    from peft_lyco.cli.checkpoints import Checkpoint

    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=5)
    tuned = tuned_folder(pipe, sdxl_folder, tmp_path, adapter)
    out = tmp_path / "x.safetensors"
    assert run_cli("extract", "--base", sdxl_folder, "--tuned", tuned, "--algo", "lora", "--rank", 2, "--out", out) == 0
    base, tuned_ckpt = Checkpoint(sdxl_folder), Checkpoint(tuned)
    for module in read_adapter(out).modules:
        delta = tuned_ckpt.read(tuned_ckpt.slot("unet", module.path)).double()
        delta = delta - base.read(base.slot("unet", module.path)).double()
        singular = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        got = float((module_delta(module, torch.float64) - delta).norm())
        assert got == pytest.approx(float(singular[2:].norm()), rel=1e-4), module.name


def test_extract_loha_reports_the_error_of_the_written_file(pipe, sdxl_folder, tmp_path, capsys):
    from peft_lyco.cli.checkpoints import Checkpoint

    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=6, targets=["attn2.to_q"])
    tuned = tuned_folder(pipe, sdxl_folder, tmp_path, adapter)
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    assert run_cli("extract", "--base", sdxl_folder, "--tuned", tuned, "--algo", "loha", "--rank", 2,
                   "--seed", 1, "--out", out) == 0  # fmt: skip
    printed = printed_errors(capsys.readouterr().out)
    base, tuned_ckpt = Checkpoint(sdxl_folder), Checkpoint(tuned)
    modules = read_adapter(out).modules
    assert {m.algo for m in modules} == {"loha"} and set(printed) == {m.name for m in modules}
    for module in modules:
        delta = tuned_ckpt.read(tuned_ckpt.slot("unet", module.path)).double()
        delta = delta - base.read(base.slot("unet", module.path)).double()
        error = float((module_delta(module, torch.float64) - delta).norm() / delta.norm())
        assert error == pytest.approx(printed[module.name], rel=1e-2, abs=1e-6), module.name
        lora_error = float(torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[2:].norm() / delta.norm())
        assert error <= lora_error + 1e-6, module.name  # never worse than the LoRA of the same rank


# ------------------------------------------------------------------------------------------------------ resize
def test_resize_lora_error_is_the_discarded_singular_values_and_to_lora(pipe, tmp_path):
    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=7)
    lora = tmp_path / "lora.safetensors"
    assert run_cli("resize", adapter, "--rank", 8, "--to-lora", "--out", lora) == 0
    small = tmp_path / "small.safetensors"
    assert run_cli("resize", lora, "--ratio", 0.5, "--out", small) == 0
    by_name = {m.name: m for m in read_adapter(adapter).modules}
    lora_modules = {m.name: m for m in read_adapter(lora).modules}
    for module in read_adapter(small).modules:
        assert module.algo == "lora" and module.rank == 4
        delta = module_delta(lora_modules[module.name], torch.float64)
        singular = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        got = float((module_delta(module, torch.float64) - delta).norm())
        assert got == pytest.approx(float(singular[4:].norm()), rel=1e-3, abs=1e-6), module.name
        # --to-lora itself: the rank-8 SVD of the LoKr ΔW
        original = module_delta(by_name[module.name], torch.float64)
        singular = torch.linalg.svdvals(original.reshape(original.shape[0], -1))
        got = float((delta - original).norm())
        assert got == pytest.approx(float(singular[8:].norm()), rel=1e-3, abs=1e-6), module.name


def test_resize_lokr_low_rank_factors(pipe, tmp_path):
    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=8, decompose_both=True)
    out = tmp_path / "r.safetensors"
    assert run_cli("resize", adapter, "--rank", 1, "--out", out) == 0
    originals = {m.name: m for m in read_adapter(adapter).modules}
    resized = read_adapter(out).modules
    assert {m.algo for m in resized} == {"lokr"}
    for module in resized:
        original = originals[module.name]
        assert module.layout.w1_decomposed == original.layout.w1_decomposed
        if original.layout.w2_mode == "lowrank":
            assert module.tensors["lokr_w2_a"].shape[1] == 1
        # error = ‖kron(w1, w2) - kron(w1', w2')‖: recomputed here from both files
        err = float((module_delta(module, torch.float64) - module_delta(original, torch.float64)).norm())
        assert err <= float(module_delta(original, torch.float64).norm())


# ------------------------------------------------------------------------------------------- single-file SDXL
def single_file_checkpoint(pipe, path):
    """The tiny pipeline in the single-file layout: SGM UNet keys, CLIP-L under conditioner.embedders.0, CLIP-bigG
    in OpenCLIP form (fused in_proj_weight, c_fc/c_proj) under conditioner.embedders.1."""
    from peft_lyco.cli.checkpoints import SGM_TE1, SGM_TE2, SGM_UNET, UNET_STYLE

    weights = {}
    for key, value in pipe.unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        weights[f"{SGM_UNET}{UNET_STYLE.to_style(module) or module}.{leaf}"] = value
    for key, value in pipe.text_encoder.state_dict().items():
        weights[SGM_TE1 + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    te2 = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder_2.state_dict().items()}
    for i in range(pipe.text_encoder_2.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}", f"{SGM_TE2}transformer.resblocks.{i}"
        weights[f"{block}.attn.in_proj_weight"] = torch.cat(
            [te2[f"{layer}.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        )
        weights[f"{block}.attn.out_proj.weight"] = te2[f"{layer}.self_attn.out_proj.weight"]
        weights[f"{block}.mlp.c_fc.weight"] = te2[f"{layer}.mlp.fc1.weight"]
        weights[f"{block}.mlp.c_proj.weight"] = te2[f"{layer}.mlp.fc2.weight"]
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def full_adapter(pipe, path, seed):
    """A LoKr file on the UNet and both text encoders (every CLIP-bigG q/k/v/out set complete)."""
    clip = LoKrConfig(r=2, alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    models = {
        "unet": random_adapter(pipe.unet, LoKrConfig(r=4, alpha=2, factor=4, target_modules=ATTN), seed),
        "text_encoder": random_adapter(pipe.text_encoder, clip, seed + 1),
        "text_encoder_2": random_adapter(pipe.text_encoder_2, clip, seed + 2),
    }
    state_dict, metadata = peft_to_kohya(models)
    return save_kohya(path, state_dict, metadata)


def test_single_file_merge_matches_the_folder_merge_and_extract_recovers(pipe, sdxl_folder, tmp_path):
    from peft_lyco.cli.checkpoints import Checkpoint

    single = single_file_checkpoint(pipe, tmp_path / "tiny_sdxl.safetensors")
    adapter = full_adapter(pipe, tmp_path / "a.safetensors", seed=9)
    assert run_cli("merge", "--model", single, "--adapter", f"{adapter}:0.5", "--out", tmp_path / "m.safetensors") == 0
    assert run_cli("merge", "--model", sdxl_folder, "--adapter", f"{adapter}:0.5", "--out", tmp_path / "m") == 0
    merged_single, merged_folder = Checkpoint(tmp_path / "m.safetensors"), Checkpoint(tmp_path / "m")
    modules = read_adapter(adapter).modules
    assert {m.component for m in modules} == {"unet", "text_encoder", "text_encoder_2"}
    for module in modules:
        got = merged_single.read(merged_single.slot(module.component, module.path))
        want = merged_folder.read(merged_folder.slot(module.component, module.path))
        assert torch.equal(got, want), (module.component, module.path)
    # keys no module touches keep their bits
    before, after = load_file(str(single)), load_file(str(tmp_path / "m.safetensors"))
    touched = {merged_single.slot(m.component, m.path).key for m in modules}
    assert all(torch.equal(after[k], before[k]) for k in before if k not in touched)
    out = tmp_path / "x.safetensors"
    code = run_cli("extract", "--base", single, "--tuned", tmp_path / "m.safetensors", "--algo", "lokr",
                   "--rank", 4, "--factor", 4, "--out", out)  # fmt: skip
    assert code == 0
    extracted = {m.name: m for m in read_adapter(out).modules}
    assert set(extracted) == {m.name for m in modules}
    for module in modules:
        want = 0.5 * module_delta(module, torch.float64)
        got = module_delta(extracted[module.name], torch.float64)
        assert float((got - want).norm() / want.norm()) <= 1e-4, module.name


# ------------------------------------------------------------------------------------------------------ Anima
def test_anima_inspect_convert_extract_resize(tmp_path, capsys):
    from peft_lyco.models.anima import build_tiny_anima

    dit = build_tiny_anima(seed=0).dit
    save_file({f"net.{k}": v for k, v in dit.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    config = LoKrConfig(r=2, alpha=1, factor=4, decompose_both=True, target_modules=["q_proj", "output_proj"])
    model = random_adapter(dit, config, seed=10)
    state_dict, metadata = peft_to_kohya({"transformer": model})
    adapter = save_kohya(tmp_path / "anima.safetensors", state_dict, metadata)
    assert run_cli("inspect", adapter, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "anima" and len(report["modules"]) == len(read_adapter(adapter).modules)
    assert run_cli("convert", adapter, tmp_path / "peft") == 0
    assert run_cli("convert", tmp_path / "peft", tmp_path / "back.safetensors") == 0
    back = load_kohya(tmp_path / "back.safetensors")[0]
    assert all(torch.equal(back[k], v) for k, v in state_dict.items()) and set(back) == set(state_dict)
    assert (
        run_cli(
            "merge", "--model", tmp_path / "dit.safetensors", "--adapter", adapter, "--out", tmp_path / "t.safetensors"
        )
        == 0
    )
    out = tmp_path / "x.safetensors"
    code = run_cli("extract", "--base", tmp_path / "dit.safetensors", "--tuned", tmp_path / "t.safetensors",
                   "--algo", "lokr", "--rank", 2, "--factor", 4, "--decompose_both", "--out", out)  # fmt: skip
    assert code == 0
    originals = {m.name: m for m in read_adapter(adapter).modules}
    extracted = read_adapter(out).modules
    assert {m.name for m in extracted} == set(originals)
    for module in extracted:
        want = module_delta(originals[module.name], torch.float64)
        assert float((module_delta(module, torch.float64) - want).norm() / want.norm()) <= 1e-4, module.name
    assert run_cli("resize", adapter, "--rank", 1, "--to-lora", "--out", tmp_path / "r.safetensors") == 0
    resized = read_adapter(tmp_path / "r.safetensors").modules
    assert {m.algo for m in resized} == {"lora"} and {m.rank for m in resized} == {1}


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_named_and_leave_no_output(pipe, sdxl_folder, tmp_path, capsys):
    adapter = lokr_file(pipe, tmp_path / "a.safetensors")
    # an existing output folder is never overwritten
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert run_cli("convert", adapter, tmp_path / "taken") == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    # a truncated adapter names the file; the model folder is untouched and no output appears
    (tmp_path / "cut.safetensors").write_bytes(adapter.read_bytes()[:100])
    out = tmp_path / "merged"
    assert run_cli("merge", "--model", sdxl_folder, "--adapter", tmp_path / "cut.safetensors", "--out", out) == 1
    assert "cut.safetensors" in capsys.readouterr().err and not out.exists()
    # a model that is neither SDXL nor Anima
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    assert run_cli("extract", "--base", tmp_path / "other.safetensors", "--tuned", tmp_path / "other.safetensors",
                   "--out", tmp_path / "x.safetensors") == 1  # fmt: skip
    assert "neither a single-file SDXL" in capsys.readouterr().err
    # identical models: nothing to extract, nothing written
    assert run_cli("extract", "--base", sdxl_folder, "--tuned", sdxl_folder, "--out", tmp_path / "x.safetensors") == 1
    assert "do not differ" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    # argparse refuses meaningless sizes
    with pytest.raises(SystemExit):
        main(["resize", str(adapter), "--ratio", "1.5", "--out", str(tmp_path / "r.safetensors")])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left behind


def test_extract_on_a_missing_cuda_device_is_an_error(pipe, sdxl_folder, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = run_cli(
        "extract",
        "--base",
        sdxl_folder,
        "--tuned",
        sdxl_folder,
        "--device",
        "cuda",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 1 and "CUDA is not available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_and_resize_on_cuda_match_the_cpu(pipe, sdxl_folder, tmp_path):
    adapter = lokr_file(pipe, tmp_path / "a.safetensors", seed=11)
    tuned = tuned_folder(pipe, sdxl_folder, tmp_path, adapter)
    for algo in ("lora", "lokr", "loha"):
        files = {}
        for device in ("cpu", "cuda"):
            files[device] = tmp_path / f"{algo}_{device}.safetensors"
            assert run_cli("extract", "--base", sdxl_folder, "--tuned", tuned, "--algo", algo, "--rank", 4,
                           "--factor", 4, "--device", device, "--out", files[device]) == 0  # fmt: skip
        cpu = {m.name: module_delta(m, torch.float64) for m in read_adapter(files["cpu"]).modules}
        for module in read_adapter(files["cuda"]).modules:
            want = cpu[module.name]
            got = module_delta(module, torch.float64)
            assert float((got - want).norm() / want.norm()) < (1e-3 if algo != "loha" else 5e-2), (algo, module.name)
    out = tmp_path / "r.safetensors"
    assert run_cli("resize", adapter, "--rank", 2, "--to-lora", "--device", "cuda", "--out", out) == 0


def test_resize_loha_refits_and_inspect_survives_nan(pipe, tmp_path, capsys):
    from peft_lyco import LoHaConfig

    model = random_adapter(pipe.unet, LoHaConfig(r=4, alpha=2, target_modules=["attn2.to_q"]), seed=12)
    state_dict, metadata = peft_to_kohya({"unet": model})
    adapter = save_kohya(tmp_path / "loha.safetensors", state_dict, metadata)
    out = tmp_path / "r.safetensors"
    assert run_cli("resize", adapter, "--rank", 2, "--out", out) == 0
    printed = printed_errors(capsys.readouterr().out.replace(" (loha r4 -> loha r2)", ""))
    originals = {m.name: m for m in read_adapter(adapter).modules}
    for module in read_adapter(out).modules:
        assert module.algo == "loha" and module.rank == 2
        want = module_delta(originals[module.name], torch.float64)
        error = float((module_delta(module, torch.float64) - want).norm() / want.norm())
        assert error == pytest.approx(printed[module.name], rel=1e-3)
        lora_error = float(torch.linalg.svdvals(want)[2:].norm() / want.norm())
        assert error <= lora_error + 1e-4
    key = next(k for k in state_dict if k.endswith("hada_w2_b"))
    state_dict[key] = state_dict[key].clone()
    state_dict[key][0, 0] = float("nan")
    save_kohya(tmp_path / "nan.safetensors", state_dict, metadata)
    assert run_cli("inspect", tmp_path / "nan.safetensors", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    text = "\n".join(report["warnings"])
    assert f"{key.split('.')[0]}: NaN/inf in ['hada_w2_b']" in text and "cannot load" in text


def test_convert_builtin_loha_folder_to_fp16_is_checked(pipe, tmp_path, capsys):
    config = peft.LoHaConfig(r=2, alpha=4, target_modules=["to_q", "conv1"], init_weights=False)
    model = get_peft_model(copy.deepcopy(pipe.unet), config)
    model.save_pretrained(tmp_path / "builtin")
    assert run_cli("convert", tmp_path / "builtin", tmp_path / "out.safetensors", "--dtype", "fp16") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("checked"))
    assert 0 < float(line.rsplit(" ", 1)[1]) <= 2e-3  # fp16 rounding shows, within the checked bound
    assert all(t.dtype == torch.float16 for t in load_kohya(tmp_path / "out.safetensors")[0].values())
