"""The SDXL trainer with LyCORIS' options (--network_args dora_wd=True ...): the saved file records them and loads
back (through the converter, into a fresh pipeline) with the trained outputs."""

import json

import train_sdxl_lokr as trainer
from lyco_train.synthetic import make_shapes_dataset

from peft_lyco.convert import load_kohya
from tests.training_scripts.sdxl_outputs import base_outputs, fresh_pipeline_with, outputs


def test_dora_lokr_trained_by_the_sdxl_trainer_loads_back_equal(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, count=2, size=64, repeats=1)
    result = trainer.main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--sample_every_n_steps", "1000",
         "--max_train_steps", "3", "--learning_rate", "2e-2",
         "--network_args", "dora_wd=True", "wd_on_output=False", "use_scalar=True", "rs_lora=True"]
    )  # fmt: skip
    pipe = result.pipe
    trained = outputs(pipe)
    assert all((t - b).abs().max() > 1e-5 for t, b in zip(trained, base_outputs()))

    state_dict, metadata = load_kohya(result.final)
    scales = {k: v for k, v in state_dict.items() if k.endswith(".dora_scale")}
    modules = {k.rsplit(".", 1)[0] for k in state_dict}
    assert len(scales) == len(modules) and all(v.shape[0] == 1 and v.dim() >= 2 for v in scales.values())
    args = json.loads(metadata["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"

    fresh, _ = fresh_pipeline_with(state_dict, metadata)
    for got, want in zip(outputs(fresh), trained):
        assert (got - want).abs().max() <= 1e-5


def test_anima_trainer_saves_comfy_names(tmp_path):
    """--save_naming comfy: only ComfyUI's Anima prefixes, and the trainer's own reload check (the converter into a
    fresh tiny Anima, images compared) passes on that file."""
    import train_anima_lokr

    data = tmp_path / "data"
    make_shapes_dataset(data, count=2, size=64, repeats=1)
    result = train_anima_lokr.main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--sample_every_n_steps", "1000",
         "--max_train_steps", "2", "--save_naming", "comfy", "--network_args", "train_llm_adapter=True"]
    )  # fmt: skip
    state_dict, _ = load_kohya(result.final)
    prefixes = ("diffusion_model.", "text_encoders.qwen3_06b.transformer.model.")
    assert state_dict and all(key.startswith(prefixes) for key in state_dict)
    assert any(key.startswith("diffusion_model.blocks.") for key in state_dict)
