"""The ``peft-lyco`` command line: inspect, convert, merge, extract and resize kohya/LyCORIS adapters.

``main(argv)`` runs one subcommand and returns its exit status (0 success, 1 a clear error on stderr); the console
script ``peft-lyco`` and ``python -m peft_lyco`` call it. Each subcommand lives in its own module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = """\
Tools for kohya/LyCORIS LoRA, LoHa and LoKr files of SDXL and Anima models.

  inspect   what a file holds: format, naming, per-module algorithm/layout/rank/alpha/scale, warnings
  convert   kohya file <-> PEFT adapter folder (also PEFT's built-in LOHA/LOKR folders), naming, precision
  merge     bake adapters into an SDXL diffusers folder / single-file checkpoint or an Anima DiT checkpoint
  extract   an adapter approximating (tuned model - base model): LoRA/LoCon, LoKr or LoHa
  resize    lower the rank of an adapter, or turn LoKr/LoHa into LoRA (--to-lora)

Files are read as safetensors only (never unpickled) and written atomically. Run 'peft-lyco COMMAND --help'."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-lyco", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_type = {"choices": ["sdxl", "anima"], "default": None, "help": "model family (default: detected)"}

    p = commands.add_parser("inspect", help="describe an adapter file", description=(
        "Describe a kohya/LyCORIS .safetensors adapter: format and naming detected, model type, per module the "
        "algorithm, layout, rank, LoKr factor split, alpha, effective scale and the rule that gave it, dtypes, a "
        "summary of the ss_* metadata, and warnings (modules a consumer would drop, alpha oddities, mixed dtypes, "
        "NaN/inf)."))  # fmt: skip
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--model_type", "--model-type", **model_type)

    p = commands.add_parser("convert", help="kohya file <-> PEFT folder, naming, dtype", description=(
        "Convert between a kohya .safetensors file and PEFT adapter folders (adapter_config.json + "
        "adapter_model.safetensors, loadable with PeftModel.from_pretrained after 'import peft_lyco'). The input "
        "may also be a PEFT folder of PEFT's own LOHA/LOKR/LORA types (each module's reloaded ΔW is checked against "
        "the adapter's). A file with several components or methods becomes one folder per component/method."))  # fmt: skip
    p.add_argument("input", help="kohya .safetensors file or PEFT adapter folder")
    p.add_argument("output", help="kohya .safetensors file or a new PEFT folder")
    p.add_argument("--to", choices=["kohya", "peft"], help="output kind (default: by the output's suffix)")
    p.add_argument("--naming", choices=_namings(), default="sgm", help="UNet module naming of a kohya output")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="store tensors in this precision")
    p.add_argument("--model_type", "--model-type", **model_type)

    p = commands.add_parser("merge", help="bake adapters into a model", description=(
        "Add adapters into a model's weights: W + sum(weight * ΔW), summed in float32 and stored in the model's "
        "dtype. MODEL is an SDXL diffusers folder (pipeline or UNet), a single-file SDXL .safetensors or an Anima "
        "DiT .safetensors; the output has the same form. Everything is checked before anything is written."))  # fmt: skip
    p.add_argument("--model", required=True, help="model folder or .safetensors checkpoint")
    p.add_argument("--adapter", required=True, action="append", metavar="FILE[:WEIGHT]",
                   help="adapter file, optionally with a weight (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True, help="new folder or .safetensors file for the merged model")
    p.add_argument("--model_type", "--model-type", **model_type)

    p = commands.add_parser("extract", help="adapter from tuned - base", description=(
        "Approximate (tuned - base) module by module: LoRA/LoCon by truncated SVD, LoKr by the nearest Kronecker "
        "product (Van Loan-Pitsianis rearrangement, then SVD) with rank-r factors where the layout asks for them, "
        "LoHa by a Hadamard product fitted with alternating least squares (deterministic given --seed). Prints the "
        "relative error of each module. Differences are taken in float64, fits run in float32 (on --device)."))  # fmt: skip
    p.add_argument("--base", required=True, help="base model (diffusers folder or .safetensors checkpoint)")
    p.add_argument("--tuned", required=True, help="fine-tuned model of the same form")
    p.add_argument("--algo", choices=["lora", "lokr", "loha"], default="lora")
    p.add_argument("--rank", type=_positive, default=16, help="rank of Linear and 1x1-conv modules (default 16)")
    p.add_argument("--conv_rank", "--conv-rank", type=_positive, default=None,
                   help="rank of kxk convolutions (default: they are not extracted)")  # fmt: skip
    p.add_argument("--factor", type=int, default=-1, help="LoKr factor (-1: balanced split)")
    p.add_argument("--decompose_both", "--decompose-both", action="store_true", help="LoKr: low-rank w1 too")
    p.add_argument("--use_tucker", "--use-tucker", action="store_true", help="LoKr: Tucker w2 on kxk convolutions")
    p.add_argument("--seed", type=int, default=0, help="LoHa fit seed")
    p.add_argument("--min_diff", "--min-diff", type=float, default=0.0,
                   help="skip modules whose largest |tuned - base| is at most this (default 0: identical only)")  # fmt: skip
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="file precision")
    p.add_argument("--device", default="cpu", help="where the SVDs and fits run, e.g. cuda (default cpu)")
    p.add_argument("--out", required=True, help="output .safetensors")

    p = commands.add_parser("resize", help="lower an adapter's rank / turn it into LoRA", description=(
        "Lower the rank of LoRA/LoCon modules and of LoKr's low-rank factors by SVD (LoHa: refit), reporting the "
        "relative ΔW error per module; with --to-lora every module becomes LoRA/LoCon of the given rank (SVD of its "
        "ΔW) for consumers that read only LoRA. Resized modules are written with alpha = rank (scale 1)."))  # fmt: skip
    p.add_argument("file", help="adapter .safetensors file (or PEFT folder)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_positive, help="new rank of every module")
    size.add_argument("--ratio", type=_fraction, help="new rank = ceil(ratio * each module's rank)")
    p.add_argument("--to-lora", "--to_lora", dest="to_lora", action="store_true", help="write LoRA/LoCon modules")
    p.add_argument("--seed", type=int, default=0, help="LoHa refit seed")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="file precision (default: the input's)")
    p.add_argument("--device", default="cpu", help="where the SVDs and fits run, e.g. cuda (default cpu)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--model_type", "--model-type", **model_type)
    return parser


def _namings() -> list[str]:
    """Namings the installed library can write (``comfy`` when the converter supports it)."""
    from ..convert.names import SDXL

    return sorted(SDXL.component("unet").write_style)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


COMMANDS = {
    "inspect": "inspect_cmd",
    "convert": "convert_cmd",
    "merge": "merge_cmd",
    "extract": "extract_cmd",
    "resize": "resize_cmd",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-lyco`` with ``argv`` (default: the process arguments); returns the exit status."""
    import importlib

    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"{__name__}.{COMMANDS[args.command]}")
    try:
        return module.run(args)
    except (ValueError, KeyError, OSError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"peft-lyco {args.command}: error: {message}", file=sys.stderr)
        return 1
