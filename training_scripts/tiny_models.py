"""Tiny local models, a dataset TOML and a load-back check, to run sd-scripts' documented commands end to end on CPU.

    python training_scripts/tiny_models.py write OUT
        OUT/sdxl/                      a tiny SDXL as a diffusers folder (in place of path/to/sdxl.safetensors)
        OUT/anima/dit.safetensors      a tiny Anima DiT checkpoint, OUT/anima/qwen3/ (Qwen3 + tokenizer),
        OUT/anima/vae/ (Qwen-Image VAE), OUT/anima/t5_tokenizer/
        OUT/dataset.toml               sd-scripts' dataset config over OUT/data (coloured shapes, tag captions)

    python training_scripts/tiny_models.py check sdxl OUT/sdxl FILE.safetensors
    python training_scripts/tiny_models.py check anima OUT/anima/dit.safetensors FILE.safetensors
        load a trained file back into the model and require that it changes the denoiser's output

Nothing is downloaded: every model is built from configs in code (``peft_lyco.models``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import peft_lyco  # noqa: F401  (registers LYCO_LOHA / LYCO_LOKR with PEFT)

DATASET_TOML = """\
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16

  [[datasets.subsets]]
  image_dir = "{image_dir}"
  num_repeats = 1
"""


def write(out: Path) -> None:
    """Write the tiny SDXL folder, the tiny Anima files, the dataset and its TOML under ``out``."""
    from lyco_train.synthetic import make_shapes_dataset
    from safetensors.torch import save_file

    from peft_lyco.models.anima import build_tiny_anima
    from peft_lyco.models.anima.dit import config_metadata
    from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

    out.mkdir(parents=True, exist_ok=True)
    tiny_sdxl_pipeline(seed=0).save_pretrained(out / "sdxl")
    anima = build_tiny_anima(seed=0)
    (out / "anima").mkdir(exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in anima.dit.state_dict().items()},
        out / "anima" / "dit.safetensors",
        metadata=config_metadata(anima.dit.config),  # the tiny sizes, read back by AnimaDiT.from_single_file
    )
    anima.text_encoder.save_pretrained(out / "anima" / "qwen3")
    anima.tokenizer.save_pretrained(out / "anima" / "qwen3")
    anima.vae.save_pretrained(out / "anima" / "vae")
    anima.t5_tokenizer.save_pretrained(out / "anima" / "t5_tokenizer")
    images = make_shapes_dataset(out / "data", count=4, size=64, repeats=1)
    for caption in images.glob("*.txt"):  # tag-style captions: "shapes, <colour> <shape>, <background>"
        caption.write_text("shapes, " + caption.read_text(encoding="utf-8").replace(" on a ", ", "), encoding="utf-8")
    (out / "dataset.toml").write_text(DATASET_TOML.format(image_dir=images.resolve().as_posix()), encoding="utf-8")
    print(f"wrote tiny models, data and dataset.toml under {out}")


def _changed(before: torch.Tensor, after: torch.Tensor, path: Path) -> None:
    change = float((after - before).abs().max())
    print(f"{path}: max |denoiser output with adapter - without| = {change:.4g}")
    if not torch.isfinite(after).all() or change < 1e-6:
        sys.exit(f"error: {path} did not load back as a working adapter")


def check(model_type: str, model: Path, file: Path) -> None:
    """Load ``file`` into the tiny model at ``model`` and require a finite, changed denoiser output."""
    g = torch.Generator().manual_seed(0)
    if model_type == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from peft_lyco.diffusers import enable_lyco

        pipe = StableDiffusionXLPipeline.from_pretrained(model)
        inputs = {
            "sample": torch.randn(1, 4, 8, 8, generator=g),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.full((1, 6), 64.0)},
        }
        with torch.no_grad():
            before = pipe.unet(**inputs).sample
            enable_lyco(pipe)
            pipe.load_lora_weights(str(file), adapter_name="trained")
            after = pipe.unet(**inputs).sample
        return _changed(before, after, file)
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from peft_lyco.convert import kohya_to_peft, load_kohya
    from peft_lyco.models.anima import AnimaDiT

    dit = AnimaDiT.from_single_file(model)
    x, context = (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.randn(1, 8, dit.config.crossattn_emb_channels, generator=g),
    )
    with torch.no_grad():
        before = dit(x, torch.tensor([0.5]), context)
    state_dict, metadata = load_kohya(file)
    adapter = kohya_to_peft(state_dict, metadata=metadata, model_type="anima", model={"transformer": dit})
    inject_adapter_in_model(adapter["transformer"].config, dit, adapter_name="trained")
    set_peft_model_state_dict(dit, adapter["transformer"].state_dict, adapter_name="trained")
    with torch.no_grad():
        after = dit(x, torch.tensor([0.5]), context)
    _changed(before, after, file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("out", type=Path)
    checking = commands.add_parser("check")
    checking.add_argument("model_type", choices=("sdxl", "anima"))
    checking.add_argument("model", type=Path)
    checking.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.out)
    else:
        check(args.model_type, args.model, args.file)


if __name__ == "__main__":
    main()
