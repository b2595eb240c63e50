"""FSDP (fsdp_version 2) in the trainers, on CPU over gloo.

The helper tests run torch's ``fully_shard`` directly around the trainers' save/load helpers (``lyco_train.sharded``)
on a small Kronecker-adapted model and check every gathered tensor against the same training done unsharded in one
process (fast: this process as a world of one; slow: 2 processes). The slow trainer test runs the Anima trainer under
accelerate's own FSDP2 preparation (``fsdp_on_cpu.py``: accelerate 1.15 never selects FSDP on CPU, so it switches a
CPU launch's state to FSDP2) and compares with a single-process run. The launch with a real FSDP config file needs
CUDA: ``pytest -m cuda tests/training_scripts/test_fsdp.py`` on a GPU machine.
"""

import copy
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

# the spawned processes import this module: it imports only torch here (peft alone takes seconds per process)


class KroneckerAdapted(torch.nn.Module):
    """A frozen Linear plus a trainable Kronecker-product ΔW (w1 ⊗ w2, as LoKr), rows sharded by FSDP like any
    adapter factor."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(8, 8).requires_grad_(False)
        self.w1 = torch.nn.Parameter(torch.randn(2, 2))
        self.w2 = torch.nn.Parameter(0.1 * torch.randn(4, 4))

    def forward(self, x):
        return torch.nn.functional.gelu(self.base(x) + x @ torch.kron(self.w1, self.w2).T)


def _adapted_model() -> torch.nn.Module:
    """Two adapted blocks on a frozen base, the same on every process (seed 0)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(KroneckerAdapted(), KroneckerAdapted())


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _step(model, optimizer, batch):
    loss = model(batch).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 0.05)
    optimizer.step()
    optimizer.zero_grad()


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _fsdp_helpers_worker(rank: int, world: int, port: int, out: str) -> None:
    """One process of the helpers check (the test runs ``world`` of them): train the sharded model on its part of
    each global batch beside an unsharded reference on the whole batch, write the differences (main process) to
    ``out``/results.pt."""
    if world > 1:
        torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from accelerate.utils import DistributedType
        from lyco_train.sharded import (
            clip_gradients,
            gather_adapter,
            gather_optimizer_state,
            load_full_state,
            same_adapter_everywhere,
            trainable_tensors,
            whole_adapter,
            whole_model,
        )
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        accelerator = SimpleNamespace(
            distributed_type=DistributedType.FSDP,
            is_main_process=rank == 0,
            unwrap_model=lambda model: model,
            unscale_gradients=lambda: None,
        )
        reference = _adapted_model()  # one process, the whole global batch
        model = _adapted_model()
        if rank == 1:  # a process whose init differs (trainers seed each process differently)
            with torch.no_grad():
                for tensor in trainable_tensors({"m": model}).values():
                    tensor.add_(1.0)
        same_adapter_everywhere(accelerator, {"m": model})
        for block in model:
            fully_shard(block)
        fully_shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
        assert params and all(isinstance(p, DTensor) for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        reference_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randn(2 * world, 8, generator=generator) for _ in range(3)]
        for batch in batches[:2]:
            _step(reference, reference_optimizer, batch)
            part = batch.chunk(world)[rank]
            model(part).square().mean().backward()  # FSDP averages the processes' gradients: the batch mean
            clip_gradients(accelerator, params, 0.05)
            optimizer.step()
            optimizer.zero_grad()
        models = {"m": model}
        adapter, state = gather_adapter(accelerator, models), gather_optimizer_state(accelerator, models, optimizer)
        results = {}
        if rank == 0:
            results["adapter"] = _close(adapter, trainable_tensors({"m": reference}))
            expected = reference_optimizer.state_dict()
            assert state["param_groups"] == expected["param_groups"]
            results["optimizer"] = max(_close(state["state"][i], expected["state"][i]) for i in expected["state"])
        else:
            assert adapter == {} and state == {}
        with whole_adapter(accelerator, models):  # what the kohya/PEFT writers read from the modules
            if rank == 0:
                seen = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
                assert not any(isinstance(p, DTensor) for p in seen.values())
                results["writers"] = _close(seen, {n: p for n, p in reference.named_parameters() if p.requires_grad})
        assert all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)  # shards back in place
        with whole_model(accelerator, models):  # the main process alone runs the model (samples)
            if rank == 0:
                with torch.no_grad():
                    results["forward"] = (model(batches[2]) - reference(batches[2])).abs().max().item()
        assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded, frozen base included
        # resume: a fresh sharded model loads the saved whole tensors; one more step on both sides
        saved_adapter = trainable_tensors({"m": reference})
        saved_state = copy.deepcopy(reference_optimizer.state_dict())
        resumed = _adapted_model()
        for block in resumed:
            fully_shard(block)
        fully_shard(resumed)
        resumed_params = [p for p in resumed.parameters() if p.requires_grad]
        resumed_optimizer = torch.optim.AdamW(resumed_params, lr=1e-2)
        load_full_state(accelerator, {"m": resumed}, resumed_optimizer, saved_adapter, saved_state)
        _step(reference, reference_optimizer, batches[2])
        resumed(batches[2].chunk(world)[rank]).square().mean().backward()
        clip_gradients(accelerator, resumed_params, 0.05)
        resumed_optimizer.step()
        after = gather_adapter(accelerator, {"m": resumed})
        if rank == 0:
            results["resumed"] = _close(after, trainable_tensors({"m": reference}))
            torch.save(results, Path(out) / "results.pt")
    finally:
        torch.distributed.destroy_process_group()


def _check_helpers(folder: Path, processes: int) -> dict[str, float]:
    if processes == 1:
        _fsdp_helpers_worker(0, 1, _free_port(), str(folder))
    else:
        mp.spawn(_fsdp_helpers_worker, args=(processes, _free_port(), str(folder)), nprocs=processes, join=True)
    results = torch.load(folder / "results.pt")
    print({k: f"{v:.3g}" for k, v in results.items()})
    assert set(results) == {"adapter", "optimizer", "writers", "forward", "resumed"}
    return results


def test_fsdp2_helpers_on_dtensor_parameters_in_one_process(tmp_path):
    """The sharded code paths (DTensor parameters and optimizer state, distributed-checkpoint gathering, the writers'
    swap, ``whole_model``, clipping, loading whole tensors) in this process as an FSDP world of one: the same numbers
    as the unsharded model (≤ 1e-6)."""
    assert max(_check_helpers(tmp_path, 1).values()) <= 1e-6


@pytest.mark.slow
def test_fsdp2_saves_whole_tensors_and_resumes_like_one_process(tmp_path):
    """2 processes × 2 samples under ``fully_shard`` = 1 process × 4 samples: the gathered adapter and optimizer state
    (torch's own ``state_dict`` layout), the whole tensors the writers read from the modules, a forward of the main
    process alone inside ``whole_model`` and a step after resuming from whole tensors all agree (≤ 1e-6), with
    gradient clipping active. The processes start with different adapter inits (broadcast from the main process)."""
    assert max(_check_helpers(tmp_path, 2).values()) <= 1e-6


# ------------------------------------------------------------------------------------------- the trainers under FSDP
FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")


def _launch_fsdp_on_cpu(config: Path, trainer: str, out: Path, *options: str) -> str:
    """``accelerate launch --config_file config fsdp_on_cpu.py <trainer> --output_dir out ...`` on CPU (gloo), each
    ``DiTBlock`` an FSDP unit of its own."""
    import subprocess
    import sys

    from test_distributed import ROOT, SCRIPTS

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "FSDP_ON_CPU_WRAP": "DiTBlock"}  # fmt: skip
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(config), str(FSDP_ON_CPU), str(SCRIPTS / trainer)]
    done = subprocess.run(
        [*command, "--output_dir", str(out), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_fsdp_trainer_equals_one_process_and_resumes_exactly(tmp_path):
    """The Anima trainer under accelerate's FSDP2 preparation (DiT blocks wrapped, FULL_SHARD over 2 CPU processes,
    batch 1 each, gradient accumulation 2, clipping to 0.01 so it acts on every step) writes the adapter a single
    process writes with batch 2 (≤ 1e-6), once, with PEFT folders and samples; resuming its step-2 state under FSDP
    ends in the same adapter, optimizer and RNG files, bit for bit."""
    import train_anima_lokr as anima_trainer
    from lyco_train.state import state_files
    from lyco_train.synthetic import make_shapes_dataset
    from safetensors.torch import load_file
    from test_distributed import accelerate_config, max_difference

    data = tmp_path / "data"
    make_shapes_dataset(data, count=8, size=64, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    common = ["--train_data_dir", str(data), "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state",
              "--flip_aug", "--learning_rate", "2e-3", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.01",
              "--network_train_unet_only", "--save_peft_adapter", "--sample_prompts", str(prompts),
              "--sample_every_n_steps", "4"]  # fmt: skip
    config = accelerate_config(tmp_path)
    first = _launch_fsdp_on_cpu(config, "train_anima_lokr.py", tmp_path / "fsdp", "--train_batch_size", "1", *common)
    assert "max |reloaded output - in-memory output|    = 0 " in first
    anima_trainer.main([*common, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "2"])
    for name in ("tiny_anima_lokr-step00000002.safetensors", "tiny_anima_lokr.safetensors"):
        difference = max_difference(tmp_path / "fsdp" / name, tmp_path / "one" / name)
        print(f"{name}: max |FSDP 2x1 - single 1x2| = {difference:.3g}")
        assert difference <= 1e-6
    for component in ("transformer",):
        peft = "tiny_anima_lokr_peft", component, "adapter_model.safetensors"
        assert max_difference(tmp_path.joinpath("fsdp", *peft), tmp_path.joinpath("one", *peft)) <= 1e-6
    written = sorted(p.name for p in (tmp_path / "fsdp").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(list((tmp_path / "fsdp" / "sample").iterdir())) == 1
    state = tmp_path / "fsdp" / "tiny_anima_lokr-step00000002-state"
    _launch_fsdp_on_cpu(config, "train_anima_lokr.py", tmp_path / "resumed", "--train_batch_size", "1", *common,
                        "--resume", str(state))  # fmt: skip
    for file in ("adapter", "optimizer", "rng_0", "rng_1"):
        a = load_file(state_files(tmp_path / "fsdp" / "tiny_anima_lokr-state")[file])
        b = load_file(state_files(tmp_path / "resumed" / "tiny_anima_lokr-state")[file])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


@pytest.mark.slow
def test_fsdp_fp16_run_clips_and_saves(tmp_path):
    """fp16 mixed precision under FSDP (GradScaler) with clipping on every step: accelerate's ``clip_grad_norm_`` for
    the adapter's parameters unscaled twice and stopped the run ("unscale_() has already been called"); the trainers
    unscale once. The run finishes and its adapter is finite."""
    from lyco_train.synthetic import make_shapes_dataset
    from safetensors.torch import load_file
    from test_distributed import accelerate_config

    data = tmp_path / "data"
    make_shapes_dataset(data, count=4, size=64, repeats=1)
    config = accelerate_config(tmp_path, extra="")
    config.write_text(config.read_text().replace("mixed_precision: 'no'", "mixed_precision: fp16"), encoding="utf-8")
    _launch_fsdp_on_cpu(config, "train_anima_lokr.py", tmp_path / "fp16", "--train_data_dir", str(data),
                        "--max_train_steps", "2", "--train_batch_size", "1", "--network_train_unet_only",
                        "--mixed_precision", "fp16", "--max_grad_norm", "0.01", "--sample_every_n_steps", "1000")  # fmt: skip
    adapter = load_file(tmp_path / "fp16" / "tiny_anima_lokr.safetensors")
    assert adapter and all(torch.isfinite(value).all() for value in adapter.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs its FSDP plugin only on accelerator devices")
def test_fsdp_recipe_trains_saves_once_and_resumes_on_cuda(tmp_path):
    """The docs/training.md FSDP recipe as a user launches it (an accelerate config file with ``distributed_type:
    FSDP``, ``fsdp_version: 2``), one process per GPU (at most 2), on the tiny Anima: trains, saves once, resumes."""
    from test_distributed import accelerate_config, launch

    processes = min(torch.cuda.device_count(), 2)
    config = accelerate_config(tmp_path, processes, FSDP_CONFIG)
    config.write_text(config.read_text().replace("MULTI_GPU", "FSDP"), encoding="utf-8")
    common = ["--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state", "--train_batch_size", "1",
              "--network_train_unet_only", "--sample_every_n_steps", "1000"]  # fmt: skip
    env = {"ACCELERATE_USE_CPU": "0"}
    output = launch(config, "train_anima_lokr.py", tmp_path / "fsdp", *common, env=env)
    assert "max |reloaded output - in-memory output|    = 0 " in output
    state = tmp_path / "fsdp" / "tiny_anima_lokr-step00000001-state"
    launch(config, "train_anima_lokr.py", tmp_path / "resumed", *common, "--resume", str(state), env=env)
    assert len(list((tmp_path / "fsdp").glob("*.safetensors"))) == 2


# the fsdp_config block of docs/training.md's FSDP recipe (Anima: DiTBlock; SDXL: BasicTransformerBlock,ResnetBlock2D)
FSDP_CONFIG = """fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: DiTBlock
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
"""
