"""Several processes through ``accelerate launch`` on CPU (gloo): DDP gives the adapter one process gives with the same
global batch, writes its files once, keeps per-rank RNG state and resumes exactly."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_anima_lokr as anima_trainer
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "training_scripts"


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def accelerate_config(folder: Path, processes: int = 2, extra: str = "") -> Path:
    """An ``accelerate config`` file for local processes; with ACCELERATE_USE_CPU=1 they run on CPU over gloo."""
    path = folder / f"accelerate_{free_port()}.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        f"num_processes: {processes}\n"
        "num_machines: 1\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
        f"main_process_port: {free_port()}\n"
        "mixed_precision: 'no'\nuse_cpu: false\ngpu_ids: all\n" + extra,
        encoding="utf-8",
    )
    return path


def launch(config: Path, script: str, out: Path, *extra: str, env: dict | None = None) -> str:
    """``accelerate launch --config_file config script --output_dir out ...`` as a user runs it (no network)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(config), str(SCRIPTS / script)]
    done = subprocess.run(
        [*command, "--output_dir", str(out), *extra], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def max_difference(a: Path, b: Path) -> float:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    return max((left[k].double() - right[k].double()).abs().max().item() for k in left)


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 processes × batch 1 and 1 process × batch 2 see the same samples with the same noise and σ, and DDP's
    gradient average equals the batch mean: the adapters agree to float rounding (1.6e-2 apart before the noise was
    drawn per sample). Only the main process writes files."""
    data = tmp_path / "data"
    make_shapes_dataset(data, count=4, size=64, repeats=1)
    common = ["--train_data_dir", str(data), "--max_train_steps", "3", "--save_every_n_steps", "2",
              "--sample_every_n_steps", "1000", "--flip_aug", "--learning_rate", "2e-3"]  # fmt: skip
    output = launch(
        accelerate_config(tmp_path), "train_anima_lokr.py", tmp_path / "ddp", "--train_batch_size", "1", *common
    )
    single = anima_trainer.main([*common, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "2"])
    for name in ("tiny_anima_lokr-step00000002.safetensors", "tiny_anima_lokr.safetensors"):
        difference = max_difference(tmp_path / "ddp" / name, tmp_path / "one" / name)
        print(f"{name}: max |DDP 2x1 - single 1x2| = {difference:.3g}")
        assert difference <= 1e-6
    assert "4 images, 4 per epoch, 3 batches per epoch" in output  # global batches of 2, split over 2 processes
    written = sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name != "data")
    assert written == sorted(p.name for p in single.files if p.parent == tmp_path / "one")


@pytest.mark.slow
def test_two_process_training_shards_data_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, count=8, size=64, repeats=1)
    common = ["--train_data_dir", str(data), "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state",
              "--flip_aug", "--caption_dropout_rate", "0.3", "--gradient_accumulation_steps", "2",
              "--no-cache_text_encoder_outputs", "--no-network_train_unet_only", "--sample_every_n_steps", "1000"]  # fmt: skip
    config = accelerate_config(tmp_path)
    first = launch(config, "train_anima_lokr.py", tmp_path / "a", *common)
    assert "8 images, 8 per epoch" in first
    state = tmp_path / "a" / "tiny_anima_lokr-step00000002-state"
    assert set(state_files(state)) == {"adapter", "optimizer", "rng_0", "rng_1"}
    launch(config, "train_anima_lokr.py", tmp_path / "b", *common, "--resume", str(state))
    for file in ("adapter", "optimizer", "rng_0", "rng_1"):
        a = load_file(state_files(tmp_path / "a" / "tiny_anima_lokr-state")[file])
        b = load_file(state_files(tmp_path / "b" / "tiny_anima_lokr-state")[file])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def _options(**overrides):
    from argparse import Namespace

    return Namespace(
        **{"network_train_unet_only": True, "gradient_accumulation_steps": 1, "save_state": False, "resume": None,
           "scale_weight_norms": None, "fp8_base": False, "optimizer_type": "AdamW"}
        | overrides
    )  # fmt: skip


def _accelerator(kind: str, fsdp_version: int = 2, activation_checkpointing: bool = False):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(fsdp_version=fsdp_version, activation_checkpointing=activation_checkpointing)
    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(fsdp_plugin=plugin))


@pytest.mark.parametrize(
    "accelerator, overrides, message",
    [
        (_accelerator("FSDP", fsdp_version=1), {}, "fsdp_version: 2"),
        (_accelerator("FSDP", activation_checkpointing=True), {}, "--gradient_checkpointing instead"),
        (_accelerator("FSDP"), {"network_train_unet_only": False}, "--network_train_unet_only"),
        (_accelerator("FSDP"), {"scale_weight_norms": 1.0}, "no --scale_weight_norms"),
        (_accelerator("FSDP"), {"fp8_base": True}, "no --fp8_base"),
        (_accelerator("FSDP"), {"optimizer_type": "AdamW8bit"}, "--optimizer_type AdamW "),
        (_accelerator("DEEPSPEED"), {"network_train_unet_only": False}, "--network_train_unet_only"),
        (_accelerator("DEEPSPEED"), {"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: 1"),
        (_accelerator("DEEPSPEED"), {"save_state": True}, "no --save_state/--resume"),
    ],
)
def test_setups_whose_result_could_not_be_saved_are_refused_at_start(accelerator, overrides, message):
    from lyco_train.args import UsageError
    from lyco_train.loop import check_distributed_setup

    with pytest.raises(UsageError, match=message):
        check_distributed_setup(accelerator, _options(**overrides))
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        check_distributed_setup(_accelerator(fine), _options(**overrides))
    check_distributed_setup(_accelerator("DEEPSPEED"), _options())
    check_distributed_setup(_accelerator("FSDP"), _options(save_state=True, gradient_accumulation_steps=4))


def test_deepspeed_gets_the_micro_batch_the_trainers_cannot_pass_as_a_dataloader():
    """An accelerate-config DeepSpeed setup leaves ``train_micro_batch_size_per_gpu`` "auto", which accelerate's
    ``prepare`` resolves only from a DataLoader (and otherwise refuses to start); the trainers pass none, so they set it
    to ``--train_batch_size``. A value the user's DeepSpeed config sets is kept."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from lyco_train.loop import fill_deepspeed_batch_size

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what makes accelerate's prepare stop
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    fill_deepspeed_batch_size(accelerator, SimpleNamespace(train_batch_size=3))
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    fill_deepspeed_batch_size(accelerator, SimpleNamespace(train_batch_size=5))
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed ZeRO-2 needs CUDA and the deepspeed package",
)
def test_deepspeed_zero2_recipe_trains_and_saves_once(tmp_path):
    """The docs/training.md DeepSpeed ZeRO-2 recipe on the tiny Anima, one process per GPU (CUDA only)."""
    processes = min(torch.cuda.device_count(), 2)
    config = accelerate_config(
        tmp_path,
        processes,
        "deepspeed_config:\n  zero_stage: 2\n  gradient_accumulation_steps: 1\n"
        "  offload_optimizer_device: none\n  offload_param_device: none\n",
    )
    config.write_text(config.read_text().replace("MULTI_GPU", "DEEPSPEED"), encoding="utf-8")
    env = {"ACCELERATE_USE_CPU": "0"}
    output = launch(config, "train_anima_lokr.py", tmp_path / "ds", "--max_train_steps", "2", "--train_batch_size",
                    "1", "--sample_every_n_steps", "1000", env=env)  # fmt: skip
    assert "max |reloaded output - in-memory output|" in output
    assert len(list((tmp_path / "ds").glob("*.safetensors"))) == 1
