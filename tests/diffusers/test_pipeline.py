"""LoHa/LoKr adapters in a diffusers SDXL pipeline behave like diffusers' own LoRA adapters: weights, fusing,
disabling, deleting, unloading, several adapters at once, LoRA beside LoKr. Expected outputs come from an fp64 merge of
the file tensors written in the test helpers, independently of peft_lyco."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_lyco import LoHaLayer, LoKrLayer
from peft_lyco.convert import save_kohya
from peft_lyco.diffusers import enable_lyco, load_lyco_weights
from tests.convert.helpers import COMPONENTS, fresh_pipe, lycoris_case, max_diff, outputs, reference_pipe, rename

TOL = 1e-5


@pytest.fixture(scope="module")
def files():
    return {
        "loha": lycoris_case(algo="loha", use_tucker=True)[0],
        "lokr": lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)[0],
        "lora": lycoris_case(algo="lora", dim=2, alpha=1)[0],
    }


def expected(*weighted):
    return outputs(reference_pipe(list(weighted)))


def close(pipe, reference, tol=TOL):
    diffs = max_diff(outputs(pipe), reference)
    assert max(diffs.values()) <= tol, diffs


def layers(pipe, kind=nn.Module):
    return [m for c in COMPONENTS for m in getattr(pipe, c).modules() if isinstance(m, kind)]


def test_load_lora_weights_routes_by_file_type(files, tmp_path):
    pipe = enable_lyco(enable_lyco(fresh_pipe()))  # a second call changes nothing
    save_kohya(tmp_path / "loha.safetensors", files["loha"])
    save_kohya(tmp_path / "lora.safetensors", rename(files["lora"], "sd-scripts"))
    pipe.load_lora_weights(str(tmp_path), weight_name="loha.safetensors", adapter_name="loha")
    assert len(layers(pipe, LoHaLayer)) == 243 and not layers(pipe, LoraLayer)
    close(pipe, expected((files["loha"], 1.0)))
    pipe.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="lora")  # ordinary LoRA: diffusers' own path
    assert len(layers(pipe, LoraLayer)) == 243
    assert pipe.get_active_adapters() == ["lora"]  # like diffusers: the newest adapter is the active one
    close(pipe, expected((files["lora"], 1.0)))
    with pytest.raises(ValueError, match="hotswap"):
        pipe.load_lora_weights(files["lokr"], adapter_name="loha", hotswap=True)


def test_set_adapters_weights_scale_each_adapter(files):
    pipe = fresh_pipe()
    load_lyco_weights(pipe, files["loha"], adapter_name="loha")
    load_lyco_weights(pipe, files["lokr"], adapter_name="lokr")
    assert pipe.get_list_adapters() == {c: ["loha", "lokr"] for c in COMPONENTS}
    pipe.set_adapters(["loha", "lokr"], adapter_weights=[0.5, -1.5])
    assert sorted(pipe.get_active_adapters()) == ["loha", "lokr"]
    close(pipe, expected((files["loha"], 0.5), (files["lokr"], -1.5)))
    pipe.set_adapters("lokr", 2.0)
    close(pipe, expected((files["lokr"], 2.0)))


def test_weight_argument_equals_set_adapters_weight(files):
    pipe = fresh_pipe()
    load_lyco_weights(pipe, files["lokr"], adapter_name="lokr", weight=0.3)
    close(pipe, expected((files["lokr"], 0.3)))


def test_fuse_lora_with_scale_and_unfuse_restores_base_weights(files):
    pipe = fresh_pipe()
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
    load_lyco_weights(pipe, files["loha"], adapter_name="loha")
    load_lyco_weights(pipe, files["lokr"], adapter_name="lokr")
    pipe.set_adapters(["loha", "lokr"], [1.0, 1.0])
    pipe.fuse_lora(components=list(COMPONENTS), lora_scale=0.7)
    assert pipe.num_fused_loras == 2
    close(pipe, expected((files["loha"], 0.7), (files["lokr"], 0.7)))
    proj = pipe.unet.down_blocks[1].attentions[0].proj_in
    assert not torch.equal(proj.base_layer.base_layer.weight, base["unet"]["down_blocks.1.attentions.0.proj_in.weight"])
    pipe.unfuse_lora(components=list(COMPONENTS))
    assert pipe.num_fused_loras == 0
    for component in COMPONENTS:
        for name, value in getattr(pipe, component).state_dict().items():
            plain = name.replace(".base_layer", "")
            if plain in base[component]:
                assert (value - base[component][plain]).abs().max() <= 1e-6, name
    # as with diffusers' LoRA, the fused scale stays on the adapters until set_adapters resets it
    close(pipe, expected((files["loha"], 0.7), (files["lokr"], 0.7)))


def test_disable_enable_delete_and_unload(files):
    pipe = fresh_pipe()
    plain = outputs(fresh_pipe())
    load_lyco_weights(pipe, files["loha"], adapter_name="loha")
    load_lyco_weights(pipe, files["lokr"], adapter_name="lokr")
    pipe.set_adapters(["loha", "lokr"])
    both = expected((files["loha"], 1.0), (files["lokr"], 1.0))
    pipe.disable_lora()
    assert max(max_diff(outputs(pipe), plain).values()) == 0
    pipe.enable_lora()
    close(pipe, both)
    pipe.delete_adapters("loha")
    assert pipe.get_list_adapters() == {c: ["lokr"] for c in COMPONENTS}
    assert all("loha" not in layer.layouts for layer in layers(pipe, (LoHaLayer, LoKrLayer)))
    close(pipe, expected((files["lokr"], 1.0)))
    pipe.unload_lora_weights()
    assert not layers(pipe, (LoHaLayer, LoKrLayer)) and pipe.get_list_adapters() == {}
    assert max(max_diff(outputs(pipe), plain).values()) == 0
    base = fresh_pipe()
    for component in COMPONENTS:
        ours, theirs = getattr(pipe, component).state_dict(), getattr(base, component).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_mixed_file_and_lokr_beside_ordinary_lora(files):
    pipe = enable_lyco(fresh_pipe())
    pipe.load_lora_weights(rename(files["lora"], "sd-scripts"), adapter_name="lora")
    mixed = lycoris_case(
        algo="loha", module_algo_map=(("ResnetBlock2D", (("algo", "lora"),)), ("CLIPMLP", (("algo", "lokr"),)))
    )
    pipe.load_lora_weights(mixed[0], adapter_name="mixed")
    pipe.load_lora_weights(files["lokr"], adapter_name="lokr")
    pipe.set_adapters(["lora", "mixed", "lokr"], [0.5, 1.0, 2.0])
    close(pipe, expected((files["lora"], 0.5), (mixed[0], 1.0), (files["lokr"], 2.0)))
    pipe.set_adapters("mixed")
    close(pipe, mixed[2])  # the mixed file alone matches lycoris' own forward


def test_low_cpu_mem_usage_gives_the_same_adapter(files):
    pipe = enable_lyco(fresh_pipe())
    mixed = lycoris_case(
        algo="lokr", factor=4, dim=2, alpha=1, module_algo_map=(("ResnetBlock2D", (("algo", "lora"),)),)
    )[0]
    half = {key: value.half() for key, value in mixed.items()}
    pipe.load_lora_weights(half, adapter_name="mixed", low_cpu_mem_usage=True)
    lokr = [p for layer in layers(pipe, LoKrLayer) for p in layer.adapter_parameters("mixed").values()]
    lora = [
        p for layer in layers(pipe, LoraLayer) for p in (layer.lora_A["mixed"].weight, layer.lora_B["mixed"].weight)
    ]
    assert lokr and lora and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in lokr + lora)
    close(pipe, expected((half, 1.0)))


def test_low_cpu_mem_usage_on_a_bf16_pipeline_keeps_float32_adapters(files):
    outputs = []
    for low in (False, True):
        pipe = fresh_pipe()
        pipe.unet.to(torch.bfloat16)
        load_lyco_weights(pipe, files["lokr"], adapter_name="lokr", low_cpu_mem_usage=low)
        params = [p for layer in layers(pipe, LoKrLayer) for p in layer.adapter_parameters("lokr").values()]
        assert params and all(p.dtype == torch.float32 for p in params)
        outputs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_only_sdxl_and_anima_pipelines_are_accepted():
    class OtherPipeline:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="neither an SDXL pipeline"):
        enable_lyco(OtherPipeline())


def test_full_pipeline_call_with_lora_scale(files):
    pipe = fresh_pipe()
    load_lyco_weights(pipe, files["loha"], adapter_name="loha")
    reference = reference_pipe([(files["loha"], 0.5)])

    def image(p, **kwargs):
        return p(
            "a red cube",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.manual_seed(0),
            **kwargs,
        ).images

    ours = image(pipe, cross_attention_kwargs={"scale": 0.5})
    assert abs(ours - image(reference)).max() <= 1e-4
    assert abs(ours - image(fresh_pipe())).max() > 1e-3
