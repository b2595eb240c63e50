"""``save_kohya``/``load_kohya``: safetensors only, never unpickled, atomic writes, clear errors for broken files."""

import os
import pickle

import pytest
import torch

import peft_lyco.convert.io as kohya_io
from peft_lyco.convert import load_kohya, save_kohya


def test_save_and_load_round_trip(tmp_path):
    state = {
        "lora_unet_conv_in.hada_w1_a": torch.randn(4, 2, dtype=torch.float16),
        "lora_unet_conv_in.alpha": torch.tensor(2.0),
    }
    path = save_kohya(tmp_path / "a.safetensors", state, {"ss_network_dim": "2"})
    loaded, metadata = load_kohya(path)
    assert metadata == {"ss_network_dim": "2"}
    assert loaded.keys() == state.keys() and all(
        torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items()
    )
    assert path.read_bytes()[8:10] == b'{"'  # standard header: A1111 asserts it starts with {"


def test_interrupted_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "style.safetensors"
    save_kohya(path, {"x.alpha": torch.tensor(1.0)})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(kohya_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_kohya(path, {"x.alpha": torch.tensor(2.0)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["style.safetensors"]


class _Marker:
    def __reduce__(self):
        return (open, ("/tmp/peft_lyco_unpickled_marker", "w"))


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_pickles_are_refused_without_unpickling(tmp_path, writer):
    marker = "/tmp/peft_lyco_unpickled_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.safetensors"  # the extension lies; the content decides
    if writer == "torch_zip":
        torch.save({"payload": _Marker()}, path)
    else:
        path.write_bytes(pickle.dumps(_Marker()))
    with pytest.raises(ValueError, match="never unpickles"):
        load_kohya(path)
    assert not os.path.exists(marker)


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    path = save_kohya(tmp_path / "t.safetensors", {"m.hada_w1_a": torch.randn(64, 64)})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated or corrupt"):
        load_kohya(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, not tensors")
    with pytest.raises(ValueError, match="notes.safetensors"):
        load_kohya(text)


def test_save_validates_its_inputs(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_kohya(tmp_path / "a.pt", {"x.alpha": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="str to str"):
        save_kohya(tmp_path / "a.safetensors", {"x.alpha": torch.tensor(1.0)}, {"ss_network_dim": 4})
    with pytest.raises(TypeError, match="torch.Tensor"):
        save_kohya(tmp_path / "a.safetensors", {"x.alpha": 1.0})
    assert not (tmp_path / "a.safetensors").exists()


def test_every_header_length_is_read_as_safetensors(tmp_path):
    """A header length whose low byte is 0x80 (the pickle PROTO opcode) is a valid file, not a pickle (issue 9.1)."""
    tensors = {"lora_unet_x.alpha": torch.tensor(1.0)}
    low_bytes = set()
    for pad in range(0, 264, 8):  # the header grows by 8 bytes per step: 33 lengths, one full cycle of the low byte
        path = save_kohya(tmp_path / f"{pad}.safetensors", tensors, {"pad": "x" * pad})
        low_bytes.add(path.read_bytes()[0])
        loaded, metadata = load_kohya(path)
        assert metadata == {"pad": "x" * pad} and torch.equal(loaded["lora_unet_x.alpha"], tensors["lora_unet_x.alpha"])
    assert 0x80 in low_bytes


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Files get 0666 & ~umask like any file the user creates, not mkstemp's 0600 (issue 9.11)."""
    old = os.umask(umask)
    try:
        path = save_kohya(tmp_path / "a.safetensors", {"x.alpha": torch.tensor(1.0)})
        save_kohya(path, {"x.alpha": torch.tensor(2.0)})  # replacing keeps following the umask
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "style.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/style.safetensors"):
        load_kohya(missing)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        load_kohya(tmp_path)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.safetensors"):
        save_kohya(tmp_path / "folder.safetensors", {})


def test_any_file_name_is_read_by_content(tmp_path):
    """.sft, upper-case and suffix-less names are safetensors when their content is (issue 9.2)."""
    state = {"lora_unet_conv_in.hada_w1_a": torch.randn(4, 2)}
    for name in ("a.sft", "b.SAFETENSORS", "c"):
        path = tmp_path / name
        path.write_bytes(save_kohya(tmp_path / "src.safetensors", state).read_bytes())
        loaded, _ = load_kohya(path)
        assert torch.equal(loaded["lora_unet_conv_in.hada_w1_a"], state["lora_unet_conv_in.hada_w1_a"])


def test_unwritable_folder_is_named_and_nothing_is_left(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="ro"):
            save_kohya(folder / "a.safetensors", {"x.alpha": torch.tensor(1.0)})
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_a_folder_that_refuses_new_files_is_named(tmp_path, monkeypatch):
    """The same check where the suite runs as root (which may write anywhere): creating the temporary file fails."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kohya_io.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=f"cannot write into '{tmp_path}'"):
        save_kohya(tmp_path / "a.safetensors", {"x.alpha": torch.tensor(1.0)})
    assert os.listdir(tmp_path) == []
