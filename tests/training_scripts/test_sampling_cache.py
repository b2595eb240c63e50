"""Trainer sampling with the inference cache: the denoiser's adapted layers reuse their weight across the sampling
steps within ``--sample_cache_mb``, the images are those rendered without it, and everything is freed afterwards."""

import contextlib
from argparse import Namespace

import torch
from lyco_train.sampling import SamplePrompt, render_samples, sample_cache_budget
from peft import inject_adapter_in_model
from torch import nn

from peft_lyco import LoKrConfig, inference_cache_info, set_inference_cache_budget


class _Accelerator:
    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()


def _denoiser() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    config = LoKrConfig(r=4, factor=4, init_weights=False, target_modules=["0", "2"])
    return inject_adapter_in_model(config, net).eval()


def _args(tmp_path, cache_mb):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a --s 4\nb --s 3 --d 1\n")
    return Namespace(
        sample_prompts=str(prompts),
        pixel_multiple=8,
        output_dir=str(tmp_path),
        output_name="run",
        sample_cache_mb=cache_mb,
    )


def _sample_with(tmp_path, monkeypatch, cache_mb):
    """Render the two prompts with a sampler that calls the denoiser once per step; return its outputs and the
    cache's state seen inside the last step."""
    denoiser, outputs, seen = _denoiser(), [], []

    def render(prompt: SamplePrompt):
        torch.manual_seed(prompt.seed)
        latent = torch.randn(2, 5, 16)
        for _ in range(prompt.steps):
            latent = latent - 0.1 * denoiser(latent)
        outputs.append(latent)
        seen.append(inference_cache_info())
        return latent

    monkeypatch.setattr("lyco_train.sampling.save_sample", lambda image, *args: tmp_path / "x.png")
    render_samples(_args(tmp_path, cache_mb), _Accelerator(), 1, render, SamplePrompt(prompt=""), denoiser=denoiser)
    return outputs, seen


def test_sampling_reuses_the_denoisers_weights_and_frees_them(tmp_path, monkeypatch):
    set_inference_cache_budget(0)
    uncached, seen_off = _sample_with(tmp_path, monkeypatch, 0)
    cached, seen = _sample_with(tmp_path, monkeypatch, 1)
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached))
    assert seen_off[-1].misses == 0
    # 2 layers x 7 steps: built once each, then reused; 1 MiB budget
    assert (seen[-1].entries, seen[-1].misses, seen[-1].hits, seen[-1].budget) == (2, 2, 12, 2**20)
    assert inference_cache_info().entries == 0 and inference_cache_info().budget == 0


def test_default_budget_is_a_quarter_of_free_memory():
    assert sample_cache_budget(1.5, torch.device("cpu")) == int(1.5 * 2**20)
    assert sample_cache_budget(0, torch.device("cpu")) == 0
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(sample_cache_budget(None, torch.device("cpu")) - available // 4) < 64 * 2**20


def test_anima_trainer_samples_with_the_cache_and_frees_it(tmp_path, monkeypatch):
    import train_anima_lokr as anima_trainer
    from lyco_train import sampling
    from lyco_train.synthetic import make_shapes_dataset

    seen = []
    save = sampling.save_sample

    def save_and_record(image, *args):
        seen.append(inference_cache_info())
        return save(image, *args)

    monkeypatch.setattr(sampling, "save_sample", save_and_record)
    make_shapes_dataset(tmp_path / "data", count=1, size=64, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 3 --d 1\n", encoding="utf-8")
    anima_trainer.main(
        ["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--sample_prompts",
         str(prompts), "--max_train_steps", "1", "--sample_every_n_steps", "1", "--sample_cache_mb", "64"]
    )  # fmt: skip
    (info,) = seen
    assert info.budget == 64 * 2**20 and info.entries > 0 and info.hits >= 2 * info.misses
    assert inference_cache_info().entries == 0 and inference_cache_info().budget == 0
