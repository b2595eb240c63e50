"""``pipe.load_lora_weights`` after ``enable_lyco`` decides by content, never by file name (issue 9 item 2): any
safetensors file loads whatever its suffix, pickles and zip checkpoints are refused unopened, and a missing local
path is a ``FileNotFoundError`` naming it (not a hub id error)."""

import os
import pickle

import pytest
import torch

from peft_lyco.convert import save_kohya
from peft_lyco.diffusers import enable_lyco
from tests.convert.helpers import fresh_pipe, lycoris_case, rename

MARKER = "/tmp/peft_lyco_routing_unpickled_marker"


class _Marker:
    def __reduce__(self):
        return (open, (MARKER, "w"))


@pytest.fixture(scope="module")
def lokr():
    state_dict = lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)[0]
    return {key: value for key, value in state_dict.items() if key.startswith("lora_te2_")}  # fast to load


@pytest.fixture(scope="module")
def lora():
    state_dict = rename(lycoris_case(algo="lora", dim=2, alpha=1)[0], "sd-scripts")
    return {key: value for key, value in state_dict.items() if key.startswith("lora_te2_")}


@pytest.fixture
def pipe():
    return enable_lyco(fresh_pipe())


@pytest.mark.parametrize("name", ["style.sft", "style.SAFETENSORS", "style", "style.bin"])
def test_a_lokr_file_loads_whatever_its_name(pipe, lokr, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(save_kohya(tmp_path / "x.safetensors", lokr).read_bytes())
    pipe.load_lora_weights(str(path), adapter_name="k")
    assert pipe.get_list_adapters()["text_encoder_2"] == ["k"]
    other = enable_lyco(fresh_pipe())
    other.load_lora_weights(str(tmp_path), weight_name=name, adapter_name="k")  # folder + weight_name
    assert other.get_list_adapters()["text_encoder_2"] == ["k"]


@pytest.mark.parametrize("name", ["style.sft", "style"])
def test_an_ordinary_lora_file_with_another_name_goes_to_diffusers(pipe, lora, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(save_kohya(tmp_path / "x.safetensors", lora).read_bytes())
    pipe.load_lora_weights(path, adapter_name="lora")
    assert pipe.get_list_adapters()["text_encoder_2"] == ["lora"]


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
@pytest.mark.parametrize("name", ["style.ckpt", "style.safetensors", "pytorch_lora_weights.bin"])
def test_pickles_are_refused_unopened(pipe, tmp_path, writer, name):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    path = tmp_path / name
    if writer == "torch_zip":
        torch.save({"payload": _Marker()}, path)
    else:
        path.write_bytes(pickle.dumps(_Marker()))
    with pytest.raises(ValueError, match="never unpickles"):
        pipe.load_lora_weights(str(path), adapter_name="x")
    with pytest.raises(ValueError, match="never unpickles"):
        pipe.load_lora_weights(str(tmp_path), weight_name=name, adapter_name="x")
    assert not os.path.exists(MARKER)
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize(
    "source",
    ["{tmp}/missing.safetensors", "missing.safetensors", "loras/sub/missing", "./missing", "{tmp}/nothing_here"],
)
def test_a_missing_local_file_is_file_not_found(pipe, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    source = source.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=source.lstrip("./")):
        pipe.load_lora_weights(source, adapter_name="x")


def test_a_missing_weight_name_in_a_folder_is_file_not_found(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="style.safetensors"):
        pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors", adapter_name="x")


@pytest.mark.parametrize("name, error", [("a.b", ValueError), ("", ValueError), (123, TypeError), (("x",), TypeError)])
def test_bad_adapter_names_are_refused_clearly(pipe, lokr, lora, name, error):
    """'a.b' and 123 failed with a KeyError/TypeError from inside PEFT, some after injection had begun (issue 9.11)."""
    for state_dict in (lokr, lora):
        with pytest.raises(error, match="adapter_name"):
            pipe.load_lora_weights(state_dict, adapter_name=name)
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused(pipe, lokr, weight):
    from peft_lyco.diffusers import load_lyco_weights

    with pytest.raises(ValueError, match="weight must be a finite number"):
        load_lyco_weights(pipe, lokr, adapter_name="k", weight=weight)
    assert pipe.get_list_adapters() == {}
