"""Every --mixed_precision / storage option end to end on the tiny models (train, sample, save, reload), and one
optimizer step's gradient in each precision against the float32 run."""

import json

import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as sdxl_trainer
from lyco_train.synthetic import make_shapes_dataset

TRAINERS = {"sdxl": sdxl_trainer, "anima": anima_trainer}


def run(tmp_path, model, *extra, name="run", images=2):
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=images, size=64, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n", encoding="utf-8")
    return TRAINERS[model].main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / name), "--sample_prompts", str(prompts),
         "--save_every_n_steps", "1000", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("model", ["sdxl", "anima"])
def test_fp16_on_cpu_trains_with_the_grad_scaler_samples_saves_and_reloads(tmp_path, model):
    """fp16 on CPU used to train without autocast or loss scaling, then crash sampling and reloading (Half vs float),
    losing the result. Now: autocast + GradScaler as on a GPU; the tiny run's own reload check compares the reloaded
    file with the in-memory model."""
    result = run(tmp_path, model, "--mixed_precision", "fp16", "--max_train_steps", "2", "--sample_every_n_steps",
                 "2", "--save_state", "--train_batch_size", "1")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [p.name for p in result.files if p.suffix == ".png"] == [f"tiny_{model}_lokr_000002_00.png"]
    assert result.final.is_file()
    state = json.loads((result.final.parent / f"tiny_{model}_lokr-state" / "training_state.json").read_text())
    scaler = state["grad_scaler"]
    assert scaler is not None and scaler["scale"] in (2.0**16, 2.0**15, 2.0**14)  # scaled (and maybe backed off)
