"""sd-scripts' documented LoKr commands, unchanged but for the script name and the model paths, against our trainers
(tiny local models, two epochs instead of 16), and the pieces that make the tiny local models loadable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peft_lyco.models.anima import AnimaDiT, build_tiny_anima
from peft_lyco.models.anima.dit import config_metadata

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "training_scripts"
DOC_OPTIONS = [  # the documentation's options after the model path and --dataset_config
    "--mixed_precision", "bf16", "--fp8_base", "--optimizer_type", "adamw8bit", "--learning_rate", "2e-4",
    "--gradient_checkpointing", "--network_module", "networks.lokr", "--network_dim", "32", "--network_alpha", "16",
    "--max_train_epochs", "{epochs}", "--save_every_n_epochs", "1",
]  # fmt: skip


def test_a_dit_checkpoint_carrying_its_config_loads_at_its_size(tmp_path):
    dit = build_tiny_anima(seed=0).dit
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(state, tmp_path / "tiny.safetensors", metadata=config_metadata(dit.config))
    loaded = AnimaDiT.from_single_file(tmp_path / "tiny.safetensors")
    assert loaded.config == dit.config
    x, context = torch.randn(1, 16, 8, 8), torch.randn(1, 4, dit.config.crossattn_emb_channels)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([0.4]), context), dit(x, torch.tensor([0.4]), context))
    save_file(state, tmp_path / "plain.safetensors")  # without the metadata: the released size, which does not fit
    with pytest.raises(ValueError, match="shape mismatch"):
        AnimaDiT.from_single_file(tmp_path / "plain.safetensors")


def _launch(script: str, model_args: list[str], tiny: Path, out: Path, epochs: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1",
               "--mixed_precision", "bf16", str(SCRIPTS / script), *model_args,
               "--dataset_config", str(tiny / "dataset.toml"), *[o.format(epochs=epochs) for o in DOC_OPTIONS],
               "--output_dir", str(out), "--output_name", "my-lokr"]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_the_documented_commands_run_and_write_adapters_that_load_back(tmp_path):
    tiny = tmp_path / "tiny"
    tools = [sys.executable, str(SCRIPTS / "tiny_models.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*tools, "write", str(tiny)], check=True, env=env, capture_output=True)
    runs = {
        "sdxl": ("train_sdxl_lokr.py", ["--pretrained_model_name_or_path", str(tiny / "sdxl")], tiny / "sdxl"),
        "anima": (
            "train_anima_lokr.py",
            [
                "--pretrained_model_name_or_path",
                str(tiny / "anima" / "dit.safetensors"),
                "--qwen3",
                str(tiny / "anima" / "qwen3"),
                "--vae",
                str(tiny / "anima" / "vae"),
                "--t5_tokenizer_path",
                str(tiny / "anima" / "t5_tokenizer"),
            ],  # fmt: skip
            tiny / "anima" / "dit.safetensors",
        ),
    }
    for family, (script, model_args, model) in runs.items():
        out = tmp_path / f"out_{family}"
        done = _launch(script, model_args, tiny, out, epochs=2)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["my-lokr-000001.safetensors", "my-lokr.safetensors"]
        check = subprocess.run([*tools, "check", family, str(model), str(out / "my-lokr.safetensors")], env=env,
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert check.returncode == 0 and "max |denoiser output with adapter - without|" in check.stdout, check.stderr
