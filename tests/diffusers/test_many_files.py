"""Property-style: hundreds of valid files with varied metadata, header lengths, names, dtypes and algorithms all load
through ``load_kohya`` and ``pipe.load_lora_weights`` with their exact tensors (issue 9: the 0x80 header-length
byte was read as a pickle in 1 file of 32). One pipeline serves every file; each adapter is deleted after its check.
"""

import random
import string

import pytest
import torch
from safetensors.torch import save
from torch import nn

from peft_lyco.convert import SDXL, NameResolver, load_kohya, save_kohya
from peft_lyco.diffusers import enable_lyco
from peft_lyco.tuners import LycoLayer
from tests.convert.helpers import COMPONENTS, fresh_pipe

FILES = 264  # the slow run; the default run checks the first FAST_FILES (every header-length residue included)
FAST_FILES = 40
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUFFIXES = (".safetensors", ".sft", ".SAFETENSORS", "")
TEXT = string.ascii_letters + string.digits + " _-/.:,{}[]\"'\\é✓\n"


@pytest.fixture(scope="module")
def pipe():
    return enable_lyco(fresh_pipe())


@pytest.fixture(scope="module")
def targets(pipe):
    """(component, path) of every 64 -> 64 Linear of the pipeline: one tensor shape set fits them all."""
    found = []
    for component in COMPONENTS:
        for path, module in getattr(pipe, component).named_modules():
            if type(module) is nn.Linear and (module.in_features, module.out_features) == (64, 64):
                found.append((component, path))
    assert len(found) > 20
    return found


def module_tensors(algo, rank, dtype, generator):
    """Factors of one 64 -> 64 module (LoKr: 64 = 8 x 8 halves, low-rank w2), N(0, 0.1)."""
    shapes = {
        "loha": {"hada_w1_a": (64, rank), "hada_w1_b": (rank, 64), "hada_w2_a": (64, rank), "hada_w2_b": (rank, 64)},
        "lokr": {"lokr_w1": (8, 8), "lokr_w2_a": (8, rank), "lokr_w2_b": (rank, 8)},
        "lora": {"lora_down.weight": (rank, 64), "lora_up.weight": (64, rank)},
    }[algo]
    return {name: (torch.randn(shape, generator=generator) * 0.1).to(dtype) for name, shape in shapes.items()}


def random_metadata(rng):
    metadata = {}
    for _ in range(rng.randrange(4)):
        key = "".join(rng.choice(TEXT) for _ in range(rng.randrange(1, 12)))
        metadata[key] = "".join(rng.choice(TEXT) for _ in range(rng.randrange(0, 300)))
    if rng.random() < 0.5:
        metadata.update(
            {"ss_network_module": "lycoris.kohya", "ss_network_dim": "2", "ss_base_model_version": "sdxl_base_v1-0"}
        )
    return metadata


def file_bytes(state_dict, metadata, low_byte):
    """The safetensors bytes of ``state_dict`` with a ``pad`` entry sized so the header length ends in ``low_byte``."""
    for pad in range(0, 2048, 8):
        data = save(state_dict, metadata={**metadata, "pad": "x" * pad})
        if data[0] == low_byte:
            return data, {**metadata, "pad": "x" * pad}
    raise AssertionError("no padding reaches that header length")


@pytest.mark.parametrize("count", [FAST_FILES, pytest.param(FILES, marks=pytest.mark.slow)], ids=["fast", "all"])
def test_many_valid_files_load_exactly(pipe, targets, tmp_path, count):
    rng = random.Random(9)
    generator = torch.Generator().manual_seed(9)
    resolver = NameResolver(SDXL, {c: getattr(pipe, c) for c in COMPONENTS})
    low_bytes = set()
    for index in range(count):
        dtype = rng.choice(DTYPES)
        chosen = rng.sample(targets, rng.randrange(1, 4))
        algos = [rng.choice(("loha", "lokr")) for _ in chosen]
        if len(chosen) > 1 and rng.random() < 0.3:
            algos[-1] = "lora"  # a mixed file
        state_dict, expected = {}, {}
        for (component, path), algo in zip(chosen, algos):
            name = resolver.kohya_name(component, path, rng.choice(("sgm", "diffusers")))
            tensors = module_tensors(algo, rng.choice((1, 2, 3)), dtype, generator)
            state_dict.update({f"{name}.{param}": tensor for param, tensor in tensors.items()})
            if rng.random() < 0.7:
                state_dict[f"{name}.alpha"] = torch.tensor(rng.choice((0.5, 1.0, 2.0, 8.0)), dtype=dtype)
            expected[component, path] = (algo, tensors)
        data, metadata = file_bytes(state_dict, random_metadata(rng), low_byte=8 * (index % 32))
        path = tmp_path / f"file{index}{rng.choice(SUFFIXES)}"
        if index % 8 == 0:  # some through our own writer too
            data = save_kohya(tmp_path / "staging.safetensors", state_dict, metadata).read_bytes()
        path.write_bytes(data)
        low_bytes.add(data[0])

        loaded, loaded_metadata = load_kohya(path)
        assert loaded_metadata == metadata, index
        assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], v) for k, v in state_dict.items())

        adapter = f"file{index}"
        pipe.load_lora_weights(str(path), adapter_name=adapter)
        for (component, module_path), (algo, tensors) in expected.items():
            layer = getattr(pipe, component).get_submodule(module_path)
            if algo == "lora":
                while not hasattr(layer, "lora_A") or adapter not in layer.lora_A:
                    layer = layer.base_layer
                held = {
                    "lora_down.weight": layer.lora_A[adapter].weight,
                    "lora_up.weight": layer.lora_B[adapter].weight,
                }
            else:
                while not isinstance(layer, LycoLayer) or adapter not in layer.layouts:
                    layer = layer.base_layer
                held = layer.adapter_parameters(adapter)
            assert all(torch.equal(held[p], t.float()) for p, t in tensors.items()), (index, module_path)
        pipe.delete_adapters(adapter)
    assert pipe.get_list_adapters() == {} or all(not names for names in pipe.get_list_adapters().values())
    assert 0x80 in low_bytes and len(low_bytes) >= 32  # every multiple of 8 modulo 256 was a header length
