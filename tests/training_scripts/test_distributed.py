"""Two processes (torchrun + accelerate on CPU, gloo): DDP, sharded data, per-rank RNG state and exact resume."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def launch(out, *extra):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "training_scripts" / "train_anima_lokr.py"),
        "--output_dir",
        str(out),
        *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_process_training_shards_data_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, count=8, size=64, repeats=1)
    common = [
        "--train_data_dir",
        str(data),
        "--max_train_steps",
        "4",
        "--save_every_n_steps",
        "2",
        "--save_state",
        "--flip_aug",
        "--caption_dropout_rate",
        "0.3",
        "--gradient_accumulation_steps",
        "2",
        "--no-cache_text_encoder_outputs",
        "--no-network_train_unet_only",
        "--sample_every_n_steps",
        "1000",
    ]
    first = launch(tmp_path / "a", *common)
    assert "8 images, 8 per epoch, 2 batches per epoch" in first  # 5 batches over 2 ranks
    state = tmp_path / "a" / "tiny_anima_lokr-step00000002-state"
    assert set(state_files(state)) == {"adapter", "optimizer", "rng_0", "rng_1"}
    launch(tmp_path / "b", *common, "--resume", str(state))
    for file in ("adapter", "optimizer", "rng_0", "rng_1"):
        a = load_file(state_files(tmp_path / "a" / "tiny_anima_lokr-state")[file])
        b = load_file(state_files(tmp_path / "b" / "tiny_anima_lokr-state")[file])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
