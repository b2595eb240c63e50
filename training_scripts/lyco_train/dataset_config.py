"""``--dataset_config``: sd-scripts' dataset TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``), or the
same structure as JSON.

A value is looked up in the subset, then its dataset, then ``[general]``, then the command line, then the default, as
sd-scripts does. Every unknown or mistyped key, and every sd-scripts key these trainers do not implement, is reported
at once with the file and the place (``datasets[0].subsets[1]``) before any model loads.

Without ``--dataset_config`` the command-line options describe one dataset (``--train_data_dir``, whose ``N_name``
folders are its subsets, plus ``--reg_data_dir`` for regularisation images).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomllib

from .buckets import BucketSettings, check_divisible, parse_resolution
from .captions import CaptionRules
from .data import Subset, folder_subsets


class DatasetConfigError(ValueError):
    """The dataset config cannot be used; the message names the file, the place and the key."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_resolution(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value))


TYPE_NAMES: dict[Callable[[Any], bool], str] = {
    _is_bool: "true or false",
    _is_int: "an integer",
    _is_number: "a number",
    _is_str: "a string",
    _is_resolution: "an integer or [width, height]",
}

# key -> (type check, command-line option it falls back to or None, default)
DATASET_KEYS: dict[str, tuple[Callable[[Any], bool], str | None, Any]] = {
    "resolution": (_is_resolution, "resolution", None),
    "batch_size": (_is_int, "train_batch_size", 1),
    "enable_bucket": (_is_bool, "enable_bucket", False),
    "min_bucket_reso": (_is_int, "min_bucket_reso", 256),
    "max_bucket_reso": (_is_int, "max_bucket_reso", 1024),
    "bucket_reso_steps": (_is_int, "bucket_reso_steps", 64),
    "bucket_no_upscale": (_is_bool, "bucket_no_upscale", False),
    "validation_split": (_is_number, "validation_split", 0.0),
    "validation_seed": (_is_int, "validation_seed", None),
}
SUBSET_KEYS: dict[str, tuple[Callable[[Any], bool], str | None, Any]] = {
    "num_repeats": (_is_int, None, 1),
    "caption_extension": (_is_str, "caption_extension", ".txt"),
    "shuffle_caption": (_is_bool, "shuffle_caption", False),
    "keep_tokens": (_is_int, "keep_tokens", 0),
    "keep_tokens_separator": (_is_str, "keep_tokens_separator", ""),
    "caption_separator": (_is_str, "caption_separator", ","),
    "caption_dropout_rate": (_is_number, "caption_dropout_rate", 0.0),
    "caption_tag_dropout_rate": (_is_number, "caption_tag_dropout_rate", 0.0),
    "caption_dropout_every_n_epochs": (_is_int, "caption_dropout_every_n_epochs", 0),
    "secondary_separator": (_is_str, "secondary_separator", None),
    "enable_wildcard": (_is_bool, "enable_wildcard", False),
    "caption_prefix": (_is_str, "caption_prefix", None),
    "caption_suffix": (_is_str, "caption_suffix", None),
    "flip_aug": (_is_bool, "flip_aug", False),
    "color_aug": (_is_bool, "color_aug", False),
    "random_crop": (_is_bool, "random_crop", False),
    "class_tokens": (_is_str, None, None),
    "cache_info": (_is_bool, None, False),  # sd-scripts' cache of image sizes: accepted, nothing to do here
}
SUBSET_ONLY_KEYS: dict[str, tuple[Callable[[Any], bool], str | None, Any]] = {
    "image_dir": (_is_str, None, None),
    "is_reg": (_is_bool, None, False),
}
# sd-scripts keys these trainers do not implement: named as such instead of "unknown"
NOT_IMPLEMENTED = (
    "network_multiplier",
    "resize_interpolation",
    "face_crop_aug_range",
    "token_warmup_min",
    "token_warmup_step",
    "custom_attributes",
    "alpha_mask",
    "metadata_file",
    "conditioning_data_dir",
    "debug_dataset",
)


@dataclass(frozen=True)
class DatasetSpec:
    """One ``[[datasets]]`` entry with every value resolved: bucketing, batch size, validation share and seed, and
    its subsets (for the command-line layout, the folders to list once the data exists)."""

    buckets: BucketSettings
    batch_size: int
    validation_split: float
    validation_seed: int | None
    subsets: tuple[Subset, ...]


def load_config_file(path: str | Path) -> dict:
    """The parsed file (``.toml``, or ``.json`` with the same structure, as sd-scripts accepts); a missing file, another
    format or a syntax error is a ``DatasetConfigError`` naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetConfigError(
            f"--dataset_config '{path}' must be a .toml (or .json) file (sd-scripts' dataset config)"
        )
    if not path.is_file():
        raise DatasetConfigError(f"--dataset_config '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        return tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetConfigError(f"--dataset_config '{path}' is not valid {suffix[1:].upper()}: {err}") from err


def _check_table(
    table: Any, allowed: dict[str, tuple], place: str, problems: list[str], *, nested: tuple[str, ...] = ()
) -> dict:
    """Report every key of ``table`` (at ``place``) that is unknown, not implemented or of the wrong type."""
    if not isinstance(table, dict):
        problems.append(f"[{place}] must be a table, got {type(table).__name__}")
        return {}
    for key, value in table.items():
        if key in nested:
            continue
        if key in allowed:
            check = allowed[key][0]
            if not check(value):
                problems.append(f"[{place}] key '{key}' must be {TYPE_NAMES[check]}, got {value!r}")
        elif key in NOT_IMPLEMENTED:
            problems.append(f"[{place}] key '{key}' is an sd-scripts option these trainers do not implement")
        else:
            close = difflib.get_close_matches(key, list(allowed) + list(nested), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"[{place}] unknown key '{key}'{hint}")
    return table


def _lookup(key: str, levels: list[dict], args: argparse.Namespace, table: dict[str, tuple]) -> Any:
    for level in levels:
        if key in level:
            return level[key]
    _, option, default = table[key]
    value = getattr(args, option, None) if option else None
    return default if value is None else value


def _subset(
    levels: list[dict], args: argparse.Namespace, *, image_dir: Path, dataset: int, batch_size: int, base: Path
) -> Subset:
    def value(key: str) -> Any:
        return _lookup(key, levels, args, SUBSET_KEYS)

    directory = image_dir if image_dir.is_absolute() else base / image_dir
    return Subset(
        image_dir=directory,
        name=directory.name,
        num_repeats=value("num_repeats"),
        caption_extension=value("caption_extension"),
        captions=CaptionRules(
            shuffle=value("shuffle_caption"),
            keep_tokens=value("keep_tokens"),
            keep_tokens_separator=value("keep_tokens_separator"),
            separator=value("caption_separator"),
            tag_dropout_rate=float(value("caption_tag_dropout_rate")),
            dropout_rate=float(value("caption_dropout_rate")),
            prefix=value("caption_prefix"),
            suffix=value("caption_suffix"),
            secondary_separator=value("secondary_separator"),
            wildcard=value("enable_wildcard"),
            dropout_every_n_epochs=value("caption_dropout_every_n_epochs"),
        ),
        flip_aug=value("flip_aug"),
        color_aug=value("color_aug"),
        random_crop=value("random_crop"),
        is_reg=bool(levels[0].get("is_reg", False)),
        class_tokens=value("class_tokens"),
        dataset=dataset,
        batch_size=batch_size,
    )


def _dataset(levels: list[dict], args: argparse.Namespace, subsets: Callable[[int], tuple[Subset, ...]]) -> DatasetSpec:
    def value(key: str) -> Any:
        return _lookup(key, levels, args, DATASET_KEYS)

    resolution = value("resolution") or "1024"
    if isinstance(resolution, list):
        resolution = tuple(resolution)
    elif isinstance(resolution, int):
        resolution = (resolution, resolution)
    else:
        resolution = parse_resolution(resolution)
    buckets = BucketSettings(
        resolution=resolution,
        enable=value("enable_bucket"),
        min_reso=value("min_bucket_reso"),
        max_reso=value("max_bucket_reso"),
        step=value("bucket_reso_steps"),
        no_upscale=value("bucket_no_upscale"),
    )
    batch_size = value("batch_size")
    return DatasetSpec(
        buckets, batch_size, float(value("validation_split")), value("validation_seed"), subsets(batch_size)
    )


def datasets_from_config(path: str | Path, args: argparse.Namespace) -> list[DatasetSpec]:
    """The datasets of a ``--dataset_config`` file, command-line values filling what the file leaves out.

    Raises ``DatasetConfigError`` naming the file and listing every bad key. Relative ``image_dir`` paths are taken
    from the current directory, as sd-scripts does.
    """
    path = Path(path)
    config = load_config_file(path)
    problems: list[str] = []
    shared = {**DATASET_KEYS, **SUBSET_KEYS}
    _check_table(config, {}, "top level", problems, nested=("general", "datasets"))
    general = _check_table(config.get("general", {}), shared, "general", problems)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        problems.append("no [[datasets]] entries")
        datasets = []
    for d, dataset in enumerate(datasets):
        _check_table(dataset, shared, f"datasets[{d}]", problems, nested=("subsets",))
        subsets = dataset.get("subsets", []) if isinstance(dataset, dict) else []
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"[datasets[{d}]] has no [[datasets.subsets]] entries")
            continue
        for s, subset in enumerate(subsets):
            place = f"datasets[{d}].subsets[{s}]"
            _check_table(subset, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, place, problems)
            if isinstance(subset, dict) and "image_dir" not in subset:
                problems.append(f"[{place}] needs image_dir")
    if problems:
        raise DatasetConfigError(f"--dataset_config '{path}':\n  " + "\n  ".join(problems))

    def subsets_of(d: int, dataset: dict) -> Callable[[int], tuple[Subset, ...]]:
        def build(batch_size: int) -> tuple[Subset, ...]:
            subsets = [
                _subset(
                    [subset, dataset, general],
                    args,
                    image_dir=Path(subset["image_dir"]),
                    dataset=d,
                    batch_size=batch_size,
                    base=Path.cwd(),
                )
                for subset in dataset["subsets"]
            ]
            unique = tuple(dict.fromkeys(subsets))
            if len(unique) < len(subsets):
                warnings.warn(
                    f"--dataset_config '{path}': [datasets[{d}]] lists the same subset twice; the repeat is ignored "
                    "(as sd-scripts does)",
                    stacklevel=2,
                )
            return unique

        return build

    return [_dataset([dataset, general], args, subsets_of(d, dataset)) for d, dataset in enumerate(datasets)]


def datasets_from_args(args: argparse.Namespace, *, list_folders: bool = True) -> list[DatasetSpec]:
    """The one dataset the command line describes: ``--train_data_dir`` (and ``--reg_data_dir``) folders as subsets
    with the command-line settings. ``list_folders=False`` gives the settings only (before the folders exist)."""

    def subsets(batch_size: int) -> tuple[Subset, ...]:
        template = _subset([{}], args, image_dir=Path("."), dataset=0, batch_size=batch_size, base=Path("."))
        if not list_folders:
            return (template,)
        found = folder_subsets(args.train_data_dir, template)
        if getattr(args, "reg_data_dir", None):
            found += [replace(r, is_reg=True) for r in folder_subsets(args.reg_data_dir, template)]
        return tuple(found)

    return [_dataset([{}], args, subsets)]


def resolve_datasets(args: argparse.Namespace, *, list_folders: bool = True) -> list[DatasetSpec]:
    """The run's datasets: from ``--dataset_config`` when given, else from the command line."""
    if getattr(args, "dataset_config", None):
        return datasets_from_config(args.dataset_config, args)
    return datasets_from_args(args, list_folders=list_folders)


def dataset_problems(datasets: list[DatasetSpec], args: argparse.Namespace, *, pixel_multiple: int) -> list[str]:
    """Every setting that cannot work, as one message each (the options or keys named): sizes the model cannot take,
    rates out of range, and caches that shuffling, tag dropout, colour augmentation or random crops would make wrong."""
    problems = []
    config = bool(getattr(args, "dataset_config", None))
    for d, dataset in enumerate(datasets):
        where = f"[datasets[{d}]] " if config else ""
        try:
            check_divisible(dataset.buckets, pixel_multiple)
        except ValueError as err:
            problems.append(f"{where}{err}")
        if config and dataset.batch_size < 1:  # the command line's --train_batch_size is checked with the options
            problems.append(f"{where}batch_size must be at least 1, got {dataset.batch_size}")
        if not 0.0 <= dataset.validation_split < 1.0:
            problems.append(f"{where or '--'}validation_split must be in [0, 1), got {dataset.validation_split}")
        for s, subset in enumerate(dataset.subsets):
            named = f"[datasets[{d}].subsets[{s}]] " if config else "--"
            rules = subset.captions
            for key, rate in (
                ("caption_dropout_rate", rules.dropout_rate),
                ("caption_tag_dropout_rate", rules.tag_dropout_rate),
            ):
                if not 0.0 <= rate < 1.0:
                    problems.append(f"{named}{key} must be in [0, 1), got {rate}")
            if rules.dropout_every_n_epochs < 0:
                problems.append(
                    f"{named}caption_dropout_every_n_epochs must be >= 0, got {rules.dropout_every_n_epochs}"
                )
            if rules.keep_tokens < 0:
                problems.append(f"{named}keep_tokens must be >= 0, got {rules.keep_tokens}")
            if subset.num_repeats < 1:
                problems.append(f"{named}num_repeats must be at least 1, got {subset.num_repeats}")
            if not rules.separator:
                problems.append(f"{named}caption_separator must not be empty")
            if args.cache_latents and (subset.random_crop or subset.color_aug):
                problems.append(
                    f"{'' if config else '--'}cache_latents cannot be combined with "
                    f"{named}{'random_crop' if subset.random_crop else 'color_aug'} (a cached latent has one fixed "
                    "crop and colour); drop one of them"
                )
            if args.cache_text_encoder_outputs and rules.is_random:
                which = (
                    "shuffle_caption"
                    if rules.shuffle
                    else "caption_tag_dropout_rate"
                    if rules.tag_dropout_rate > 0
                    else "enable_wildcard"
                )
                problems.append(
                    f"{'' if config else '--'}cache_text_encoder_outputs cannot be combined with {named}{which} "
                    "(the text encoders would see one fixed caption, not the shuffled, thinned or chosen one); "
                    "drop one of them"
                )
    return list(dict.fromkeys(problems))
