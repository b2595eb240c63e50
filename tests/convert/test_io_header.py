"""load_kohya tells safetensors from pickles by the header, not by the first byte alone."""

from __future__ import annotations

import torch

from peft_lyco.convert import load_kohya, save_kohya


def test_a_safetensors_header_size_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Regression: load_kohya refused safetensors files whose header size's first byte is 0x80 as pickles."""
    tensors = {"lora_unet_conv_in.alpha": torch.tensor(1.0)}
    for padding in range(300):
        path = save_kohya(tmp_path / "a.safetensors", tensors, {"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    state_dict, _metadata = load_kohya(path)
    assert torch.equal(state_dict["lora_unet_conv_in.alpha"], tensors["lora_unet_conv_in.alpha"])
