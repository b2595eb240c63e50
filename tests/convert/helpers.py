"""Shared by the conversion and diffusers tests: the tiny SDXL pipeline, files made by lycoris-lora on it with its
applied outputs, file renaming into the other naming styles, and an independent fp64 merge reference.
"""

from __future__ import annotations

import copy
import os
import tempfile
from contextlib import contextmanager
from functools import cache, lru_cache

import toml
import torch
from lycoris.kohya import LycorisNetworkKohya, create_network
from lycoris.wrapper import LycorisNetwork, create_lycoris
from torch import nn

from peft_lyco.convert import SDXL, NameResolver, load_kohya
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Every Linear/Conv2d of the tiny UNet (183) and the CLIP attention/MLP projections (2 x 30). The kohya wrapper's own
# "full" preset crashes on a diffusers UNet (time_embedding is selected twice), so the targets are listed here.
PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
_CLASS_STATE = [
    (cls, name)
    for cls in (LycorisNetworkKohya, LycorisNetwork)
    for name in (
        "ENABLE_CONV",
        "UNET_TARGET_REPLACE_MODULE",
        "UNET_TARGET_REPLACE_NAME",
        "TEXT_ENCODER_TARGET_REPLACE_MODULE",
        "TEXT_ENCODER_TARGET_REPLACE_NAME",
        "TARGET_REPLACE_MODULE",
        "TARGET_REPLACE_NAME",
        "MODULE_ALGO_MAP",
        "NAME_ALGO_MAP",
    )
    if hasattr(cls, name)
]


@lru_cache(maxsize=1)
def _base_pipe():
    return tiny_sdxl_pipeline(seed=0)


def fresh_pipe():
    """A private copy of the tiny SDXL pipeline (seed 0)."""
    return copy.deepcopy(_base_pipe())


def inputs():
    """Fixed inputs for the UNet and both text encoders."""
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10, 500]),
        "context": torch.randn(2, 7, 64, generator=g),
        "added": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
        "ids": torch.randint(2, 500, (2, 9), generator=g),
    }


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet noise prediction, CLIP-L hidden states, CLIP-bigG hidden states and projection on ``inputs()``."""
    x = inputs()
    te2 = pipe.text_encoder_2(x["ids"])
    return {
        "unet": pipe.unet(x["sample"], x["timestep"], x["context"], added_cond_kwargs=x["added"]).sample,
        "text_encoder": pipe.text_encoder(x["ids"]).last_hidden_state,
        "text_encoder_2": torch.cat([te2.last_hidden_state.flatten(1), te2.text_embeds], dim=1),
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: (a[name] - b[name]).abs().max().item() for name in a}


@contextmanager
def lycoris_presets():
    """lycoris-lora keeps presets in class attributes; restore them afterwards so tests do not leak state."""
    saved = [(cls, name, copy.deepcopy(getattr(cls, name))) for cls, name in _CLASS_STATE]
    try:
        yield
    finally:
        for cls, name, value in saved:
            setattr(cls, name, value)


def _preset_file(preset: dict) -> str:
    handle, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(handle, "w") as f:
        f.write(toml.dumps(preset))
    return path


@cache
def lycoris_case(
    algo: str, dim: int = 4, alpha: float = 2, dtype: str = "float32", seed: int = 0, module_algo_map=None, **kwargs
):
    """A file written by lycoris-lora's kohya wrapper on the tiny pipeline, with lycoris' applied outputs.

    Parameters are randomised (N(0, 0.1)) so every module changes the output. Returns ``(state_dict, metadata,
    reference outputs, base outputs)``; the reference uses the weights as stored (rounded to ``dtype``).
    """
    pipe = fresh_pipe()
    base = outputs(pipe)
    preset = dict(PRESET)
    if module_algo_map:
        preset["module_algo_map"] = {name: dict(options) for name, options in module_algo_map}
    preset_path = _preset_file(preset)
    with lycoris_presets():
        network = create_network(
            1.0,
            dim,
            alpha,
            None,
            [pipe.text_encoder, pipe.text_encoder_2],
            pipe.unet,
            preset=preset_path,
            algo=algo,
            **kwargs,
        )
    os.unlink(preset_path)
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            for param in lora.parameters():
                param.normal_(std=0.1)
                param.copy_(param.to(getattr(torch, dtype)).float())
    network.apply_to([pipe.text_encoder, pipe.text_encoder_2], pipe.unet, True, True)
    reference = outputs(pipe)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lyco.safetensors")
        network.save_weights(path, getattr(torch, dtype), {"ss_network_module": "lycoris.kohya"})
        state_dict, metadata = load_kohya(path)
    network.restore()
    return state_dict, metadata, reference, base


# ------------------------------------------------------------------------------------------------------ renaming
def module_paths(pipe) -> dict[str, tuple[str, str]]:
    """kohya name (LyCORIS' rule: prefix + module path with dots as underscores) -> (component, path)."""
    table = {}
    for component in COMPONENTS:
        for path, _ in getattr(pipe, component).named_modules():
            if path:
                table[KOHYA_PREFIXES[component] + path.replace(".", "_")] = (component, path)
    return table


def rename(state_dict: dict, style: str) -> dict:
    """Rewrite a LyCORIS file's module names into another naming style found in the wild.

    ``lycoris``: as written (diffusers UNet paths, CLIP-L without ``text_model``); ``sd-scripts``: SGM UNet names and
    ``text_model_`` CLIP-L names; ``lycoris_prefix``: the generic wrapper's ``lycoris_`` prefix on the UNet;
    ``dotted``: PEFT/diffusers-style ``unet.<path>.<param>`` keys.
    """
    if style == "lycoris":
        return dict(state_dict)
    pipe = _base_pipe()
    table = module_paths(pipe)
    sgm = NameResolver(SDXL, {"unet": pipe.unet})
    renamed = {}
    for key, tensor in state_dict.items():
        name, param = key.split(".", 1)
        component, path = table[name]
        if style == "sd-scripts":
            new = (
                sgm.kohya_name(component, path, "sgm")
                if component == "unet"
                else name.replace("lora_te1_", "lora_te1_text_model_")
            )
        elif style == "lycoris_prefix":
            new = "lycoris_" + name.removeprefix("lora_unet_") if component == "unet" else name
        elif style == "dotted":
            new = f"{component}.{path}"
        else:
            raise ValueError(style)
        renamed[f"{new}.{param}"] = tensor
    return renamed


# ----------------------------------------------------------------------------------------- fp64 merge reference
def _rebuild(core, w_a, w_b):
    return torch.einsum("ijkl,jr,ip->prkl", core, w_b, w_a)


def reference_delta(params: dict[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """ΔW of one file module in fp64, from the LoHa/LoKr formulas and the full-matrix scale rule, independently of
    peft_lyco."""
    t = {name: tensor.double() for name, tensor in params.items()}
    alpha = t.get("alpha")
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            delta = _rebuild(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _rebuild(
                t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]
            )
        else:
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif "lora_down.weight" in t:
        rank = t["lora_down.weight"].shape[0]
        delta = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = next((t[n].shape[0] for n in ("lokr_t2", "lokr_w2_b", "lokr_w1_b") if n in t), None)
        if w2.dim() == 2 and len(weight_shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1[..., None]
        delta = torch.kron(w1, w2)
        if rank is None:  # both halves full: scale 1 whatever alpha says
            alpha, rank = None, 1
    scale = 1.0 if alpha is None else alpha.item() / rank
    return delta.reshape(weight_shape) * scale


@torch.no_grad()
def reference_pipe(files: list[tuple[dict, float]]):
    """A copy of the base pipeline with ``weight * ΔW`` of every (LyCORIS-named) file module merged in fp64."""
    pipe = fresh_pipe()
    table = module_paths(pipe)
    for state_dict, weight in files:
        modules: dict[str, dict] = {}
        for key, tensor in state_dict.items():
            name, param = key.split(".", 1)
            modules.setdefault(name, {})[param] = tensor
        for name, params in modules.items():
            component, path = table[name]
            layer = getattr(pipe, component).get_submodule(path)
            merged = layer.weight.double() + weight * reference_delta(params, layer.weight.shape)
            layer.weight.copy_(merged.to(layer.weight.dtype))
    return pipe


def model_from_paths(paths, device="meta") -> nn.Module:
    """A module tree with the given Linear paths and shapes (on ``device``): a stand-in with a real model's module names."""
    root = nn.Module()
    for path, out, inp in paths:
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(inp, out, bias=False, device=device))
    return root


def generic_lycoris(model, prefix="lycoris_", targets=("Linear",), **kwargs):
    """lycoris-lora's generic wrapper on every layer of the ``targets`` classes, randomised, names re-prefixed."""
    with lycoris_presets():
        LycorisNetwork.apply_preset({"target_module": list(targets), "target_name": []})
        network = create_lycoris(model, 1.0, **kwargs)
    network.apply_to()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(std=0.1)
    state = {
        prefix + key.removeprefix("lycoris_"): value.detach().clone() for key, value in network.state_dict().items()
    }
    return network, state
