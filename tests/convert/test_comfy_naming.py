"""``naming="comfy"``: Anima files with ComfyUI's names (``diffusion_model.`` for the DiT,
``text_encoders.qwen3_06b.transformer.model.`` for Qwen3) that load back equal; for SDXL it means the SGM names."""

import copy

import torch
from peft import inject_adapter_in_model

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.convert import kohya_to_peft, peft_to_kohya
from tests.convert.test_anima import inject, tiny_dit, tiny_qwen3

COMFY_PREFIXES = ("diffusion_model.", "text_encoders.qwen3_06b.transformer.model.")


def _trained():
    dit, qwen = tiny_dit(), tiny_qwen3()
    torch.manual_seed(1)
    dit_config = LoKrConfig(r=2, factor=4, init_weights=False, target_modules=r".*(self_attn|mlp)\..*", weight_decompose=True)  # fmt: skip
    inject_adapter_in_model(dit_config, dit, "default")
    inject_adapter_in_model(LoHaConfig(r=2, init_weights=False, target_modules=["q_proj", "v_proj"]), qwen, "default")
    return dit, qwen


def test_anima_comfy_names_only_and_loads_back_equal():
    dit, qwen = _trained()
    written, meta = peft_to_kohya({"transformer": dit, "text_encoder": qwen}, model_type="anima", naming="comfy")
    modules = {key.rsplit(".", 1)[0] for key in written}
    assert all(key.startswith(COMFY_PREFIXES) for key in written), sorted(written)[:3]
    assert {m.split(".", 1)[0] for m in modules} == {"diffusion_model", "text_encoders"}
    assert "diffusion_model.blocks.0.self_attn.q_proj" in modules
    assert "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.q_proj" in modules
    # the same tensors as the kohya-named file, under other names
    kohya, _ = peft_to_kohya({"transformer": dit, "text_encoder": qwen}, model_type="anima")
    assert sorted(map(torch.Tensor.sum, kohya.values())) == sorted(map(torch.Tensor.sum, written.values()))

    fresh_dit, fresh_qwen = tiny_dit(), tiny_qwen3()
    conversion = kohya_to_peft(written, metadata=meta, model={"transformer": fresh_dit, "text_encoder": fresh_qwen})
    inject(fresh_dit, conversion, "transformer")
    inject(fresh_qwen, conversion, "text_encoder")
    for ours, theirs in ((dit, fresh_dit), (qwen, fresh_qwen)):
        for name, layer in ours.named_modules():
            if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "layouts", {}):
                other = theirs.get_submodule(name)
                assert torch.equal(layer.get_delta_weight("default"), other.get_delta_weight("anima")), name
    x = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        assert torch.equal(qwen(x).last_hidden_state, fresh_qwen(x).last_hidden_state)


def test_anima_comfy_names_load_without_a_model():
    dit, qwen = _trained()
    written, meta = peft_to_kohya({"transformer": dit, "text_encoder": qwen}, model_type="anima", naming="comfy")
    conversion = kohya_to_peft(written, metadata=meta)
    assert conversion.model_type == "anima" and set(conversion) == {"transformer", "text_encoder"}


def test_sdxl_comfy_naming_is_the_sgm_naming():
    from tests.convert.helpers import fresh_pipe, lycoris_case, rename

    state_dict, metadata, _, _ = lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)
    conversion = kohya_to_peft(rename(state_dict, "sd-scripts"), metadata=metadata, model=fresh_pipe())
    comfy, _ = peft_to_kohya(copy.copy(conversion), naming="comfy")
    sgm, _ = peft_to_kohya(conversion, naming="sgm")
    assert comfy.keys() == sgm.keys() and all(torch.equal(comfy[k], sgm[k]) for k in sgm)
