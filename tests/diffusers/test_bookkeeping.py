"""Adapter bookkeeping matches diffusers' own LoRA behaviour call for call (issue 9 items 5 and 8).

Two pipelines run the same sequence of pipeline calls: one holds two ordinary LoRA adapters (diffusers' own code
path), the other a LoHa and a LoKr adapter under the same names on the same modules. After every call both must
report the same active and listed adapters and fused count, and every module must apply the same adapters with the
same weights (active, weight, merged); the LoHa/LoKr outputs are checked against freshly loaded references.
"""

import re

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_lyco.diffusers import enable_lyco, load_lyco_weights
from tests.convert.helpers import COMPONENTS, fresh_pipe, lycoris_case, max_diff, outputs, rename

TOL = 1e-5


# one UNet transformer block and the last layer of each CLIP (34 modules; diffusers and SGM names): every component,
# loaded fast
KEPT = re.compile(r"lora_unet_(down_blocks_1_attentions_0|input_blocks_4_1)_|lora_te\d_(text_model_)?encoder_layers_4_")


def part(state_dict):
    return {key: value for key, value in state_dict.items() if KEPT.match(key)}


@pytest.fixture(scope="module")
def files():
    lora = part(rename(lycoris_case(algo="lora", dim=2, alpha=1)[0], "sd-scripts"))
    other = {key: value * -0.7 if "lora_up" in key else value for key, value in lora.items()}
    loha = part(lycoris_case(algo="loha", use_tucker=True)[0])
    lokr = part(lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)[0])
    modules = [{key.split(".")[0] for key in sd} for sd in (lora, loha, lokr)]
    assert [len(names) for names in modules] == [34, 34, 34]
    return {"lora": {"h": lora, "k": other}, "lyco": {"h": loha, "k": lokr}}


def own_scale(layer, adapter):
    if hasattr(layer, "base_scale"):
        return layer.base_scale[adapter]
    return layer.lora_alpha[adapter] / layer.r[adapter]


def module_state(pipe):
    """(component, module path) -> {adapter: (applied, user weight, merged)} over all tuner layers (nested ones too)."""
    state = {}
    for component in COMPONENTS:
        for path, layer in getattr(pipe, component).named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            held = {name for attr in layer.adapter_layer_names for name in getattr(layer, attr)}
            entry = state.setdefault((component, re.sub(r"(\.base_layer)+$", "", path)), {})
            for adapter in held:
                applied = adapter in layer.active_adapters and not layer.disable_adapters
                weight = round(layer.scaling[adapter] / own_scale(layer, adapter), 5)
                entry[adapter] = (applied, weight, adapter in layer.merged_adapters)
    return state


def bookkeeping(pipe):
    return (
        pipe.get_active_adapters(),
        pipe.get_list_adapters(),
        pipe.num_fused_loras,
        sorted(pipe._merged_adapters),
    )


STEPS = [
    ("load_lora_weights", "h"),
    ("load_lora_weights", "k"),
    ("set_adapters", (["h", "k"], [0.5, -1.5])),
    ("disable_lora", ()),
    ("enable_lora", ()),
    ("delete_adapters", ("k",)),  # LoHa+LoKr gave get_active_adapters() == [] while "h" stayed applied
    ("load_lora_weights", "k"),
    ("set_adapters", ("k", 2.0)),
    ("delete_adapters", (["k"],)),
    ("set_adapters", (["h"], [0.5])),
    ("fuse_lora", {"components": list(COMPONENTS), "lora_scale": 0.7}),
    ("unfuse_lora", {"components": list(COMPONENTS)}),
    ("set_adapters", ("h",)),
    ("load_lora_weights", "k"),
    ("delete_adapters", (["h", "k"],)),
    ("unload_lora_weights", ()),
]
# outputs expected after these steps: adapter -> weight (checked against a fresh pipeline loaded with just those)
EXPECTED = {5: {"h": 0.5}, 9: {"h": 0.5}, 10: {"h": 0.35}, 15: {}}


def run(pipe, kind, files, step):
    name, args = step
    method = getattr(pipe, name)
    if name == "load_lora_weights":
        method(files[kind][args], adapter_name=args)
    elif isinstance(args, dict):
        method(**args)
    else:
        method(*args)


def reference(kind, files, weights):
    pipe = fresh_pipe()
    for adapter, weight in weights.items():
        load_lyco_weights(pipe, files[kind][adapter], adapter_name=adapter, weight=weight)
    return outputs(pipe)


def test_pipeline_calls_keep_the_same_bookkeeping_as_lora(files):
    lora, lyco = enable_lyco(fresh_pipe()), enable_lyco(fresh_pipe())
    references = {}
    for index, step in enumerate(STEPS):
        run(lora, "lora", files, step)
        run(lyco, "lyco", files, step)
        assert bookkeeping(lyco) == bookkeeping(lora), (index, step)
        assert module_state(lyco) == module_state(lora), (index, step)
        if index in EXPECTED:
            key = tuple(sorted(EXPECTED[index].items()))
            if key not in references:
                references[key] = reference("lyco", files, EXPECTED[index])
            diffs = max_diff(outputs(lyco), references[key])
            assert max(diffs.values()) <= TOL, (index, step, diffs)


@pytest.fixture
def fused_pair(files):
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(files["lyco"]["h"], adapter_name="h")
    pipe.load_lora_weights(files["lyco"]["k"], adapter_name="k")
    pipe.set_adapters(["h", "k"], [1.0, 0.5])
    return pipe


def base_weights(pipe):
    return {
        (c, name): p.detach().clone()
        for c in COMPONENTS
        for name, p in getattr(pipe, c).named_parameters()
        if "base_layer" in name
    }


def broken_last_layer(pipe):
    """Make the LoKr adapter of the last CLIP-bigG MLP layer infinite: fusing reaches it after the UNet's layers."""
    layer = pipe.text_encoder_2.text_model.encoder.layers[4].mlp.fc2
    name = next(iter(layer.adapter_parameters("k")))
    params = getattr(layer, name)
    params["k"] = torch.nn.Parameter(torch.full_like(params["k"], float("inf")))  # not in place: the file shares it
    return "text_encoder_2 'text_model.encoder.layers.4.mlp.fc2' (adapter 'k')"


def test_failed_safe_fuse_leaves_every_layer_as_it_was(fused_pair):
    """safe_fusing found the broken module only after fusing the ones before it, and left those fused (issue 9.8)."""
    pipe = fused_pair
    where = broken_last_layer(pipe)
    before, state = base_weights(pipe), module_state(pipe)
    with pytest.raises(ValueError, match=re.escape(where)):
        pipe.fuse_lora(components=list(COMPONENTS), lora_scale=0.7, safe_fusing=True)
    after = base_weights(pipe)
    assert all(torch.equal(before[key], after[key]) for key in before)  # bit for bit
    assert module_state(pipe) == state and pipe.num_fused_loras == 0 and not pipe._merged_adapters


def test_a_fuse_failing_part_way_is_undone(fused_pair, monkeypatch):
    """Any other failure (here: the last text-encoder layer's merge raises) unmerges what was merged."""
    pipe = fused_pair
    before, state = base_weights(pipe), module_state(pipe)
    layer = pipe.text_encoder_2.text_model.encoder.layers[4].mlp.fc2

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure in merge")

    monkeypatch.setattr(layer, "merge", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.fuse_lora(components=list(COMPONENTS), lora_scale=0.7)
    after = base_weights(pipe)
    assert max((before[key] - after[key]).abs().max().item() for key in before) <= 1e-6
    assert module_state(pipe) == state and pipe.num_fused_loras == 0
    monkeypatch.undo()
    pipe.fuse_lora(components=list(COMPONENTS), lora_scale=0.7)  # and fusing works afterwards
    assert pipe.num_fused_loras == 2  # diffusers counts fused adapters


def test_load_delete_cycles_of_mixed_types_do_not_nest_layers(files):
    """A deleted LoKr left an empty LoKr layer that the next LoHa load wrapped again: depth grew with every cycle."""
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(files["lyco"]["h"], adapter_name="h")
    counts = []
    for cycle in range(3):
        for kind in ("k", "h"):
            name = f"{kind}{cycle}"
            pipe.load_lora_weights(files["lyco"][kind], adapter_name=name)
            pipe.delete_adapters(name)
        counts.append(sum(1 for c in COMPONENTS for _ in getattr(pipe, c).modules()))
    assert counts[0] == counts[-1], counts
    assert bookkeeping(pipe)[:2] == (["h"], {c: ["h"] for c in COMPONENTS})
