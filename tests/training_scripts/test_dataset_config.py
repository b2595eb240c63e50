"""--dataset_config: sd-scripts' TOML schema, value fallbacks, errors naming key and file, regularisation and
validation splits, and the checks that refuse caches that would be wrong."""

import re
from pathlib import Path

import pytest
import train_sdxl_lokr as trainer
from lyco_train.args import UsageError
from lyco_train.batches import EpochPlan, load_training_data
from lyco_train.data import DataError, ImageRecord, Subset, balance_regularisation, split_validation
from lyco_train.synthetic import make_shapes_dataset


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _parse(*argv: str):
    """Parse as a real run would (a model path, so the embedded default's values stay out); nothing is loaded."""
    # a hub id: parsing never downloads it (a local path would have to exist)
    return trainer.parse_args(["--pretrained_model_name_or_path", "org/sdxl-model", "--output_dir", "out", *argv])


def test_typos_wrong_types_and_unimplemented_keys_are_reported_together_with_the_file(tmp_path):
    config = _write(
        tmp_path / "data.toml",
        """
[general]
shuffle_captions = true

[[datasets]]
resolution = 512
batch_size = "2"

  [[datasets.subsets]]
  image_dir = "imgs"
  flip_agu = true
  num_repeats = 2.5
  token_warmup_step = 2
""",
    )
    with pytest.raises(UsageError) as caught:
        _parse("--dataset_config", str(config))
    message = str(caught.value)
    assert str(config) in message
    assert "[general] unknown key 'shuffle_captions' (did you mean 'shuffle_caption'?)" in message
    assert "[datasets[0]] key 'batch_size' must be an integer, got '2'" in message
    assert "[datasets[0].subsets[0]] unknown key 'flip_agu' (did you mean 'flip_aug'?)" in message
    assert "[datasets[0].subsets[0]] key 'num_repeats' must be an integer, got 2.5" in message
    assert "'token_warmup_step' is an sd-scripts option these trainers do not implement" in message


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("data.toml", "[[datasets]\nresolution = 5", "is not valid TOML"),
        ("data.yaml", "{}", "must be a .toml (or .json) file"),
        ("data.json", '{"datasets": [{"subsets": [{"image_dir": 3}]}]}', "key 'image_dir' must be a string, got 3"),
        ("data.toml", "[general]\nresolution = 512\n", "no [[datasets]] entries"),
        ("data.toml", "[[datasets]]\nresolution = 512\n", "has no [[datasets.subsets]] entries"),
        ("data.toml", "[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1\n", "needs image_dir"),
    ],
    ids=["syntax", "suffix", "json", "no-datasets", "no-subsets", "no-image-dir"],
)
def test_unusable_files_are_named(tmp_path, name, text, message):
    config = _write(tmp_path / name, text)
    with pytest.raises(UsageError, match=re.escape(message)) as caught:
        _parse("--dataset_config", str(config))
    assert str(config) in str(caught.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="nope.toml' does not exist"):
        _parse("--dataset_config", str(tmp_path / "nope.toml"))


def test_values_fall_back_subset_dataset_general_command_line_default(tmp_path):
    config = _write(
        tmp_path / "data.toml",
        f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = [768, 512]
batch_size = 3
keep_tokens = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "{tmp_path / "a"}"
  num_repeats = 4
  keep_tokens = 3
  keep_tokens_separator = "|||"

  [[datasets.subsets]]
  image_dir = "{tmp_path / "reg"}"
  is_reg = true
  class_tokens = "a photo"
  shuffle_caption = false

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / "b"}"
""",
    )
    args = _parse("--dataset_config", str(config), "--caption_tag_dropout_rate", "0.1", "--train_batch_size", "5")
    first, second = args.dataset_specs
    assert first.buckets.resolution == (768, 512) and first.buckets.enable and first.batch_size == 3
    a, reg = first.subsets
    assert (a.num_repeats, a.captions.keep_tokens, a.captions.keep_tokens_separator) == (4, 3, "|||")
    assert a.captions.shuffle and a.captions.tag_dropout_rate == 0.1 and a.caption_extension == ".caption"
    assert reg.is_reg and reg.class_tokens == "a photo" and not reg.captions.shuffle and reg.captions.keep_tokens == 2
    assert a.dataset == reg.dataset == 0 and a.batch_size == reg.batch_size == 3
    (b,) = second.subsets
    assert b.dataset == 1 and b.batch_size == 5 and b.captions.keep_tokens == 1  # command line, then [general]
    assert second.buckets.resolution == (1024, 1024) and not second.buckets.enable  # defaults
    assert args.resolution == "768,512" and args.train_batch_size == 3  # the metadata reports the first dataset


def test_dataset_config_ignores_train_data_dir_with_a_warning_as_sd_scripts(tmp_path):
    config = _write(tmp_path / "data.toml", f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    with pytest.warns(UserWarning, match="--train_data_dir ignored"):
        args = _parse("--dataset_config", str(config), "--train_data_dir", str(tmp_path / "other"))
    assert args.train_data_dir is None


@pytest.mark.parametrize(
    "toml_subset, argv, message",
    [
        ("shuffle_caption = true", [], "cache_text_encoder_outputs cannot be combined with .*shuffle_caption"),
        ("caption_tag_dropout_rate = 0.2", [], "caption_tag_dropout_rate"),
        ("enable_wildcard = true", [], "cache_text_encoder_outputs cannot be combined with .*enable_wildcard"),
        ("color_aug = true", ["--cache_latents"], "cache_latents cannot be combined with .*color_aug"),
        ("caption_dropout_rate = 1.5", [], r"caption_dropout_rate must be in \[0, 1\)"),
    ],
    ids=["shuffle", "tag-dropout", "wildcard", "color-aug", "rate"],
)
def test_caches_that_shuffling_or_augmentation_would_make_wrong_are_refused(tmp_path, toml_subset, argv, message):
    config = _write(
        tmp_path / "data.toml", f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n{toml_subset}\n'
    )
    te_cache = ["--cache_text_encoder_outputs", "--network_train_unet_only"]
    with pytest.raises(UsageError, match=message):
        _parse("--dataset_config", str(config), *te_cache, *argv)
    # the same through the command-line options
    option = toml_subset.split(" = ")[0]
    flag = [f"--{option}"] if toml_subset.endswith("true") else [f"--{option}", toml_subset.split(" = ")[1]]
    with pytest.raises(UsageError, match=message):
        _parse("--train_data_dir", str(tmp_path), *te_cache, *argv, *flag)


def test_caption_dropout_works_with_the_text_cache(tmp_path):
    args = _parse(
        "--train_data_dir", str(tmp_path), "--cache_text_encoder_outputs", "--network_train_unet_only",
        "--caption_dropout_rate", "0.1", "--keep_tokens", "2",
    )  # fmt: skip
    assert args.cache_text_encoder_outputs


def _reg_records(counts: list[int], target: int) -> list[ImageRecord]:
    train = Subset(Path("t"))
    reg = Subset(Path("r"), is_reg=True)
    records = [ImageRecord(Path(f"t{i}.png"), "", 1, (8, 8), train) for i in range(target)]
    return records + [ImageRecord(Path(f"r{i}.png"), "", n, (8, 8), reg) for i, n in enumerate(counts)]


@pytest.mark.parametrize(
    "counts, target, expected",
    [
        ([1, 1], 6, [3, 3]),  # passes of one repeat each until 6
        ([1, 1, 1], 4, [2, 1, 1]),  # the second pass stops at the first image
        ([4, 4, 4], 6, [4, 4]),  # the first pass overshoots; the third image is left out (sd-scripts' warning)
    ],
)
def test_regularisation_repeats_follow_sd_scripts(counts, target, expected):
    balanced = balance_regularisation(_reg_records(counts, target))
    assert [r.repeats for r in balanced if r.subset.is_reg] == expected
    assert [r.repeats for r in balanced if not r.subset.is_reg] == [1] * target


def test_validation_split_is_disjoint_seeded_and_skips_regularisation_images():
    records = _reg_records([1, 1], 10)
    train, held = split_validation(records, 0.25, seed=1)
    assert len(held) == 2 and len(train) == 10  # round(10 * 0.25) of the 10 training images; both reg images train
    assert not {r.path for r in held} & {r.path for r in train}
    assert {r.path for r in held} | {r.path for r in train} == {r.path for r in records}
    assert all(not r.subset.is_reg and r.repeats == 1 for r in held)
    assert split_validation(records, 0.25, seed=1) == (train, held)
    assert {r.path for r in split_validation(records, 0.25, seed=2)[1]} != {r.path for r in held}
    odd = _reg_records([], 3)  # 3 * 0.5 = 1.5: sd-scripts would put one image in both parts
    train, held = split_validation(odd, 0.5, seed=0)
    assert len(train) + len(held) == 3 and not {r.path for r in held} & {r.path for r in train}


def test_datasets_keep_their_own_batch_size_and_class_tokens_caption_uncaptioned_images(tmp_path):
    make_shapes_dataset(tmp_path / "a", count=6, size=32, repeats=1)
    make_shapes_dataset(tmp_path / "b", count=3, size=32, repeats=1)
    for caption in (tmp_path / "b").rglob("*.txt"):
        caption.unlink()
    config = _write(
        tmp_path / "data.toml",
        f"""
[general]
resolution = 32
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{tmp_path / "a" / "1_shapes"}"
[[datasets]]
batch_size = 3
  [[datasets.subsets]]
  image_dir = "{tmp_path / "b" / "1_shapes"}"
  class_tokens = "sks shape"
""",
    )
    args = _parse("--dataset_config", str(config))
    data = load_training_data(args.dataset_specs, seed=0, where="test")
    assert sorted({r.caption for r in data.records if r.subset.dataset == 1}) == ["sks shape"]
    plan = EpochPlan(data.records, data.buckets, seed=0)
    batches = plan.batches(0)
    assert sorted(len(batch) for batch in batches) == [2, 2, 2, 3]
    for batch in batches:
        datasets = {data.records[s.record].subset.dataset for s in batch}
        assert len(datasets) == 1 and len(batch) == (2 if datasets == {0} else 3)


def test_validation_split_out_of_range_names_the_option(tmp_path):
    with pytest.raises(UsageError, match=r"--validation_split must be in \[0, 1\), got 1.0"):
        _parse("--train_data_dir", str(tmp_path), "--validation_split", "1")


def test_missing_image_folders_are_listed_and_repeated_subsets_ignored(tmp_path):
    make_shapes_dataset(tmp_path / "a", count=2, size=32, repeats=1)
    folder = tmp_path / "a" / "1_shapes"
    config = _write(
        tmp_path / "data.toml",
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "nope"}"\n',
    )
    with pytest.warns(UserWarning, match=r"\[datasets\[0\]\] lists the same subset twice"):
        args = _parse("--dataset_config", str(config))
    assert len(args.dataset_specs[0].subsets) == 1
    with pytest.raises(DataError, match="1 image folder.s. do not exist:\n.*nope"):
        load_training_data(args.dataset_specs, seed=0, where="test")
