"""Dataset scan, bucketing, epoch plans and caches of the trainers' shared helpers."""

import colorsys
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from lyco_train.batches import BatchBuilder, EpochPlan, Sample
from lyco_train.buckets import (
    BucketSettings,
    assign_buckets,
    bucket_resolutions,
    check_divisible,
    fit_geometry,
    fit_image,
)
from lyco_train.cache import LatentCache, TextCache
from lyco_train.captions import CaptionRules
from lyco_train.data import DataError, Subset, scan_dataset
from lyco_train.synthetic import make_shapes_dataset
from PIL import Image


def _image(path, size=(32, 32), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)


def test_scan_reads_captions_repeats_and_sizes(tmp_path):
    folder = make_shapes_dataset(tmp_path, count=6, size=32, repeats=3)
    _image(tmp_path / "loose.png", (40, 24))
    (tmp_path / "loose.txt").write_text("  a loose image \n")
    (tmp_path / "plain").mkdir()
    _image(tmp_path / "plain" / "p.jpg")
    (tmp_path / "plain" / "p.txt").write_text("plain folder")
    (tmp_path / ".lyco_cache").mkdir()
    _image(tmp_path / ".lyco_cache" / "ignored.png")
    records = scan_dataset(tmp_path)
    by_name = {r.path.name: r for r in records}
    assert len(records) == 8
    assert by_name["loose.png"].caption == "a loose image" and by_name["loose.png"].repeats == 1
    assert by_name["loose.png"].size == (40, 24)
    assert by_name["p.jpg"].repeats == 1
    shapes = [r for r in records if r.path.parent == folder]
    assert len(shapes) == 6 and all(r.repeats == 3 and r.subset.name == "shapes" for r in shapes)
    assert shapes[2].size == (48, 32)  # every third synthetic image is landscape


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "no images found in"),
        (lambda root: _image(root / "a.png"), "1 image(s) have no caption file"),
        (
            lambda root: (
                (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
                (root / "b.txt").write_text("x"),
            ),
            "cannot be read (corrupt or truncated)",
        ),
        (lambda root: (root / "0_none").mkdir(), "asks for 0 repeats"),
        (
            lambda root: (_image(root / "c.png"), (root / "c.txt").write_bytes(b"caf\xe9 latin-1")),
            "1 caption file(s) cannot be read as UTF-8 text:\n.*c.txt: UnicodeDecodeError",
        ),
    ],
    ids=["empty", "no-caption", "corrupt", "zero-repeats", "not-utf8"],
)
def test_scan_rejects_bad_folders_with_clear_messages(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scan_dataset(tmp_path)


def test_scan_rejects_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_truncated_png_is_reported_by_name(tmp_path):
    _image(tmp_path / "ok.png", (64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for stem in ("ok", "cut"):
        (tmp_path / f"{stem}.txt").write_text(stem)
    with pytest.raises(DataError, match="cut.png"):
        scan_dataset(tmp_path)


def test_buckets_cover_area_and_aspect():
    settings = BucketSettings(resolution=(1024, 1024), enable=True, min_reso=512, max_reso=2048, step=64)
    buckets = bucket_resolutions(settings)
    assert (1024, 1024) in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(512 <= side <= 2048 for bucket in buckets for side in bucket)
    landscape, portrait, square = assign_buckets([(1920, 1080), (1080, 1920), (700, 700)], settings)
    assert landscape[0] > landscape[1] and portrait == landscape[::-1] and square == (1024, 1024)
    nearest = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(1920 / 1080)))
    assert landscape == nearest


def test_no_upscale_keeps_small_images_small():
    settings = BucketSettings(resolution=(1024, 1024), enable=True, step=64, no_upscale=True)
    assert assign_buckets([(300, 200), (4000, 4000)], settings) == [(256, 192), (1024, 1024)]


def test_divisibility_is_checked_with_option_names():
    with pytest.raises(ValueError, match="--resolution width=1000.*not divisible by 16"):
        check_divisible(BucketSettings(resolution=(1000, 1024)), 16)
    with pytest.raises(ValueError, match="--bucket_reso_steps=12"):
        check_divisible(BucketSettings(resolution=(512, 512), enable=True, step=12), 8)
    check_divisible(BucketSettings(resolution=(512, 512), enable=True, min_reso=256, max_reso=1024, step=64), 16)


def test_fit_geometry_crop_and_flip_conditioning():
    image = Image.fromarray(np.arange(60 * 100 * 3, dtype=np.uint8).reshape(60, 100, 3) % 251)
    geometry = fit_geometry(image.size, (32, 32), crop_offset=0.0, flip=False)
    assert geometry.resized == (53, 32) and geometry.box == (0, 0, 32, 32)
    assert geometry.original_size == (60, 100) and geometry.crop_top_left == (0, 0)
    flipped = fit_geometry(image.size, (32, 32), crop_offset=0.0, flip=True)
    assert flipped.crop_top_left == (0, 53 - 32)  # the crop mirrored, as SDXL conditioning expects
    pixels, mirrored = fit_image(image, geometry, flip=False), fit_image(image, flipped, flip=True)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(mirrored, pixels.flip(-1))


def _records(tmp_path, count=6, **settings):
    """The shapes dataset with ``settings`` (``Subset`` fields, ``batch_size`` included) for every subset."""
    make_shapes_dataset(tmp_path, count=count, size=32, repeats=2)
    return scan_dataset(tmp_path, template=Subset(tmp_path, **settings))


def test_epoch_plan_is_deterministic_complete_and_bucketed(tmp_path):
    records = _records(tmp_path, batch_size=2, flip_aug=True, captions=CaptionRules(dropout_rate=0.5))
    settings = BucketSettings(resolution=(32, 32), enable=True, min_reso=16, max_reso=64, step=16)
    buckets = assign_buckets([r.size for r in records], settings)
    plan = EpochPlan(records, buckets, seed=3)
    first, again, other = plan.batches(0), plan.batches(0), plan.batches(1)
    assert first == again and first != other
    assert sorted(s.record for batch in first for s in batch) == sorted(
        i for i in range(len(records)) for _ in range(2)
    )
    assert all(len({buckets[s.record] for s in batch}) == 1 for batch in first)
    assert len(first) == plan.batches_per_epoch
    samples = [s for batch in first + other for s in batch]
    assert any(s.flip for s in samples) and not all(s.flip for s in samples)
    assert any(s.drop_caption for s in samples) and not all(s.drop_caption for s in samples)
    shards = [EpochPlan(records, buckets, seed=3, num_processes=2, process_index=i).batches(0) for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) and not set(map(str, shards[0])) & set(map(str, shards[1]))


@pytest.mark.parametrize("processes, batch_size", [(2, 1), (2, 2), (3, 1), (4, 1), (5, 2)])
def test_processes_split_the_same_global_batches_with_shares_that_average_to_the_mean(tmp_path, processes, batch_size):
    """k processes × batch b see exactly the samples (with the same noise seeds) one process sees with batch k·b, in
    the same order, and the shares make the process average of each process's weighted sum the global batch mean."""
    options = {"count": 7, "flip_aug": True, "captions": CaptionRules(dropout_rate=0.3)}
    records = _records(tmp_path, batch_size=batch_size, **options)  # 14 samples over 2 buckets: uneven batches
    one_process = _records(tmp_path, batch_size=batch_size * processes, **options)
    buckets = [(32, 32) if i % 3 else (48, 32) for i in range(len(records))]
    single = EpochPlan(one_process, buckets, seed=5)
    shards = [EpochPlan(records, buckets, seed=5, num_processes=processes, process_index=i) for i in range(processes)]
    for epoch in (0, 1):
        whole = single.batches(epoch)
        parts = [shard.batches(epoch) for shard in shards]
        assert all(len(p) == len(whole) == single.batches_per_epoch == shards[0].batches_per_epoch for p in parts)
        for b, batch in enumerate(whole):
            real = [s for part in parts for s in part[b] if s.share > 0]
            fillers = [s for part in parts for s in part[b] if s.share == 0]
            assert [replace(s, share=0) for s in real] == [replace(s, share=0) for s in batch]
            assert len(fillers) == max(0, processes - len(batch)) and all(len(part[b]) >= 1 for part in parts)
            losses = {s.noise_seed: float(s.noise_seed % 97) for s in batch}  # any per-sample loss
            mean = sum(losses.values()) / len(batch)
            assert sum(s.share * losses[s.noise_seed] for s in batch) == pytest.approx(mean)
            averaged = sum(sum(s.share * losses[s.noise_seed] for s in part[b]) for part in parts) / processes
            assert averaged == pytest.approx(mean)
    seeds = [s.noise_seed for batch in single.batches(0) + single.batches(1) for s in batch]
    assert len(set(seeds)) == len(seeds)


def test_batch_builder_uses_latent_cache_and_drops_captions(tmp_path):
    records = _records(tmp_path, count=3, batch_size=3, flip_aug=True)
    buckets = [(32, 32)] * len(records)
    cache = LatentCache("test", tmp_path / "cache")
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return pixels[:, :2, ::2, ::2] * 2

    jobs = [(r, b, flip) for r, b in zip(records, buckets) for flip in (False, True)]
    assert cache.fill(jobs, encode, batch_size=4, show_progress=False) == 6 and calls == [4, 2]
    assert cache.fill(jobs, encode, batch_size=4, show_progress=False) == 0  # reused from disk
    plan = EpochPlan(records, buckets, seed=0)
    batch = BatchBuilder(records, buckets, cache)(plan.batches(0)[0])
    sample = plan.batches(0)[0][0]
    geometry = fit_geometry(records[sample.record].size, (32, 32), crop_offset=None, flip=sample.flip)
    with Image.open(records[sample.record].path) as image:
        expected = fit_image(image, geometry, flip=sample.flip)[:2, ::2, ::2] * 2
    assert torch.equal(batch["latents"][0], expected)
    assert batch["captions"][0] == records[sample.record].caption
    assert batch["target_sizes"].tolist() == [[32, 32]] * 3
    dropped = BatchBuilder(records, buckets)([sample.__class__(0, False, None, True)])
    assert dropped["captions"] == [""] and dropped["pixels"].shape == (1, 3, 32, 32)


def test_text_cache_encodes_each_caption_once(tmp_path):
    seen = []

    def encode(captions):
        seen.extend(captions)
        return {"embeds": torch.stack([torch.full((2, 3), float(len(c))) for c in captions])}

    cache = TextCache("t", encode, tmp_path)
    assert cache.fill(["ab", "", "ab", "xyz"], batch_size=2, show_progress=False) == 3
    assert cache.fill(["ab"], batch_size=2, show_progress=False) == 0 and seen == ["ab", "", "xyz"]
    got = cache.get(["xyz", ""])["embeds"]
    assert got.shape == (2, 2, 3) and got[0, 0, 0] == 3 and got[1, 0, 0] == 0


def test_caption_file_first_line_and_class_tokens(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  first line \nsecond line\n")
    _image(tmp_path / "b.png")
    records = scan_dataset(tmp_path, template=Subset(tmp_path, class_tokens="sks"))
    assert [r.caption for r in records] == ["first line", "sks"]
    wildcard = Subset(tmp_path, class_tokens="sks", captions=CaptionRules(wildcard=True))
    assert scan_dataset(tmp_path / ".", template=wildcard)[0].caption == "first line\nsecond line"  # every line


def test_color_aug_rate_kinds_ranges_and_pixels(tmp_path):
    from lyco_train.augment import COLOR_AUG_PROBABILITY, apply_color_change

    records = _records(tmp_path, count=3, batch_size=1, color_aug=True)
    plan = EpochPlan(records, [(32, 32)] * len(records), seed=4)
    samples = [s for epoch in range(400) for batch in plan.batches(epoch) for s in batch]
    changes = [s.color for s in samples if s.color is not None]
    n, p = len(samples), COLOR_AUG_PROBABILITY
    assert abs(len(changes) / n - p) < 5 * math.sqrt(p * (1 - p) / n)  # 2400 showings, five binomial sd
    hues = [a for kind, a in changes if kind == "hue"]
    gammas = [a for kind, a in changes if kind == "gamma"]
    assert abs(len(hues) / len(changes) - 0.5) < 5 * math.sqrt(0.25 / len(changes))
    assert all(-16 <= a <= 16 for a in hues) and all(0.95 <= g <= 1.05 for g in gammas)
    assert plan.batches(7) == EpochPlan(records, [(32, 32)] * len(records), seed=4).batches(7)

    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    gamma = np.asarray(apply_color_change(image, ("gamma", 1.03)))
    assert np.array_equal(gamma, np.clip(np.asarray(image, dtype=np.float64) ** 1.03, 0, 255).astype(np.uint8))
    red = Image.new("RGB", (4, 4), (200, 30, 30))  # hue 0 degrees
    for shift in (16.0, -9.0):
        r, g, b = (v / 255 for v in apply_color_change(red, ("hue", shift)).getpixel((0, 0)))
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        assert abs((hue - shift + 180) % 360 - 180) < 2.5  # 8-bit hue steps are 1.4 degrees, plus RGB rounding
    coloured = next(s for s in samples if s.color is not None and not s.flip)
    plain = BatchBuilder(records, [(32, 32)] * len(records))
    assert not torch.equal(plain([coloured])["pixels"], plain([Sample(coloured.record, False, None, False)])["pixels"])


def test_regularisation_folders_and_loss_weights(tmp_path):
    from argparse import Namespace

    from lyco_train.batches import load_training_data
    from lyco_train.dataset_config import datasets_from_args

    make_shapes_dataset(tmp_path / "train", count=4, size=32, repeats=2)
    make_shapes_dataset(tmp_path / "reg", count=3, size=32, repeats=1)
    args = Namespace(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), train_batch_size=4)
    data = load_training_data(datasets_from_args(args), seed=0, where="test")
    regs = [r for r in data.records if r.subset.is_reg]
    assert len(regs) == 3 and sum(r.repeats for r in regs) == 8  # balanced to the 4 x 2 training showings
    plan = EpochPlan(data.records, data.buckets, seed=0)
    build = BatchBuilder(data.records, data.buckets, prior_loss_weight=0.3)
    for batch in plan.batches(0):
        weights = build(batch)["loss_weights"].tolist()
        assert weights == pytest.approx([0.3 if data.records[s.record].subset.is_reg else 1.0 for s in batch])


def test_only_the_main_process_writes_the_tiny_dataset(tmp_path):
    """Other processes of a multi-process tiny run used to write the dataset again while the main process read it
    (UnidentifiedImageError on a half-written PNG); now they only point at the main process's files."""
    from argparse import Namespace

    from lyco_train.tiny import prepare_tiny_data

    main = Namespace(output_dir=str(tmp_path), train_data_dir=None, sample_prompts=None)
    prepare_tiny_data(main)
    files = sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    other = Namespace(output_dir=str(tmp_path), train_data_dir=None, sample_prompts=None)
    prepare_tiny_data(other, write=False)
    assert vars(other) == vars(main)
    assert [p.stat().st_mtime_ns for p in files] == stamps and len(files) == 12 * 2 + 1
