"""The trainers when things go wrong: bad paths and prompt files found before any model loads, a failing sample that
never costs the adapter, corrupt or mismatched state folders, and saves that survive being killed at any moment."""

import builtins
import io
import json
import os
import random
import shutil
import signal
import stat
import sys
import time

import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as trainer
from lyco_train import runner as trainer_runner
from lyco_train.args import UsageError
from lyco_train.cache import TextCache
from lyco_train.export import save_adapter
from lyco_train.files import remove_leftovers, save_image
from lyco_train.state import (
    Position,
    StateError,
    load_state,
    read_state,
    remove_stale_state_files,
    save_state,
    state_files,
)
from lyco_train.synthetic import make_shapes_dataset
from peft import inject_adapter_in_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from peft_lyco.convert import load_kohya
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline
from peft_lyco.presets import build_config

FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def data_folder(tmp_path):
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=2, size=64, repeats=1)
    return data


def prompts(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def a_file(tmp_path):
    path = tmp_path / "plain_file"
    path.write_text("not a folder")
    return path


# ------------------------------------------------------------------------------------------------ start-up checks
def under_a_file(tmp_path):
    return str(a_file(tmp_path) / "sub")


BAD_PATHS = [
    pytest.param(lambda t: ["--output_dir", under_a_file(t)], "--output_dir", id="output-dir-under-a-file"),
    pytest.param(lambda t: ["--output_dir", str(a_file(t))], "--output_dir", id="output-dir-is-a-file"),
    pytest.param(lambda t: ["--output_dir", str(t / "data")], "is the --train_data_dir", id="output-dir-is-data-dir"),
    pytest.param(lambda t: ["--output_name", "a/b"], "--output_name", id="output-name-with-slash"),
    pytest.param(lambda t: ["--output_name", ""], "--output_name", id="output-name-empty"),
    pytest.param(
        lambda t: ["--logging_dir", under_a_file(t), "--log_with", "wandb"], "--logging_dir", id="logging-dir"
    ),
    pytest.param(lambda t: ["--cache_latents_to_disk", "--cache_dir", under_a_file(t)], "--cache_dir", id="cache-dir"),
    pytest.param(lambda t: ["--sample_prompts", prompts(t, "a cat --x 3\n")], "line 1.*--x", id="prompt-option"),
    pytest.param(
        lambda t: ["--sample_prompts", prompts(t, "# c\na cat\na dog --w wide\n")], "line 3.*--w", id="prompt-number"
    ),
    pytest.param(lambda t: ["--sample_prompts", prompts(t, "a cat --w 100\n")], "line 1.*multiple of 8", id="w"),
    pytest.param(lambda t: ["--sample_prompts", prompts(t, "a cat --s 0\n")], "line 1.*--s", id="prompt-steps"),
    pytest.param(lambda t: ["--sample_prompts", prompts(t, "# only a comment\n")], "no prompts", id="prompt-empty"),
    pytest.param(lambda t: ["--sample_prompts", prompts(t, b"\xff\xfe bad")], "UTF-8", id="prompt-encoding"),
    pytest.param(lambda t: ["--sample_prompts", str(t)], "--sample_prompts", id="prompt-file-is-a-folder"),
    pytest.param(lambda t: ["--sample_cache_mb", "-1"], "--sample_cache_mb must be >= 0", id="sample-cache-mb"),
    pytest.param(
        lambda t: ["--pretrained_model_name_or_path", str(t / "missing.safetensors")],
        "missing.safetensors",
        id="missing-checkpoint",
    ),
]


@pytest.mark.parametrize("make_argv, message", BAD_PATHS)
def test_bad_paths_and_prompt_files_fail_before_any_model_loads(tmp_path, monkeypatch, make_argv, message):
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the input was checked"))
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / "out"), *make_argv(tmp_path)]
    with pytest.raises(UsageError, match=message):
        trainer.main(argv)


def test_anima_input_files_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(anima_trainer, "load_models", lambda *a: pytest.fail("model loaded before the check"))
    missing = tmp_path / "qwen.safetensors"
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / "out")]
    argv += ["--pretrained_model_name_or_path", str(a_file(tmp_path)), "--qwen3", str(missing), "--vae", "x/y"]
    with pytest.raises(UsageError, match="--qwen3.*qwen.safetensors"):
        anima_trainer.main(argv)
    with pytest.raises(UsageError, match="multiple of 16"):
        anima_trainer.main(
            ["--train_data_dir", str(data_folder(tmp_path)), "--sample_prompts", prompts(tmp_path, "x --h 40")]
        )


# -------------------------------------------------------------------------------------------- save before sample
def test_a_failing_sample_or_periodic_save_never_costs_the_final_adapter(tmp_path, monkeypatch, capsys):
    """A full disk at the step-1 save and a sample that raises at every step are reported while training goes on;
    the final files are written before the last sample runs."""
    seen = []

    class FullDiskAtStep1(trainer.AdapterWriter):
        def __call__(self, stem, position):
            if position.step == 1:
                raise OSError(28, "No space left on device", stem)
            return super().__call__(stem, position)

    def failing_render(args, accelerator, step, render, defaults, denoiser=None):
        stem = args.output_name if step == args.max_train_steps else f"{args.output_name}-step{step:08d}"
        seen.append((step, (tmp_path / "out" / f"{stem}.safetensors").is_file()))
        raise RuntimeError("expected scalar type Half but found Float")

    monkeypatch.setattr(trainer, "AdapterWriter", FullDiskAtStep1)
    monkeypatch.setattr(trainer, "render_samples", failing_render)
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / "out")]
    argv += ["--max_train_steps", "2", "--save_every_n_steps", "1", "--sample_every_n_steps", "1"]
    argv += ["--network_train_unet_only", "--sample_prompts", prompts(tmp_path, "a red circle --w 64 --h 64 --s 2")]
    result = trainer.main(argv)
    assert seen == [(1, False), (2, True)]
    state_dict, metadata = load_kohya(result.final)
    assert metadata["ss_steps"] == "2" and state_dict
    out = capsys.readouterr().out
    assert "saving at step 1 failed (OSError: [Errno 28] No space left on device" in out
    assert "sampling at step 1 failed" in out and "sampling at step 2 failed" in out


def test_values_beyond_the_save_precision_are_saved_in_float32_not_as_inf(tmp_path, capsys):
    pipe = tiny_sdxl_pipeline(seed=0)
    config = build_config("lokr", pipe.unet, network_dim=2, network_alpha=1.0, network_args=[])
    inject_adapter_in_model(config, pipe.unet, adapter_name="default")
    name, weight = next((n, p) for n, p in pipe.unet.named_parameters() if "lokr_w1" in n)
    with torch.no_grad():
        weight.fill_(1e5)
    path = save_adapter(tmp_path, "big", {"unet": pipe.unet}, model_type="sdxl", metadata={}, precision="fp16")[0]
    state_dict, _ = load_kohya(path)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in state_dict.values())
    assert 1e5 in {v.abs().max().item() for v in state_dict.values()}
    assert "exceed the range of --save_precision fp16" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ state folders
class TinyTraining:
    """What save_state/load_state touch: trained models, optimizer with state, lr schedule and noise generator."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.models = {"unet": torch.nn.Linear(3, 2), "text_encoder": torch.nn.Linear(2, 2)}
        params = [p for m in self.models.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=0.1)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1 + step))
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def step(self):
        loss = sum(m(torch.ones(m.in_features)).square().sum() for m in self.models.values())
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        torch.randn(2, generator=self.generator)
        self.steps += 1

    def tensors(self):
        return {f"{k}.{n}": p.detach().clone() for k, m in self.models.items() for n, p in m.named_parameters()}


class OneProcess:
    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


FINGERPRINT = {"seed": 5, "batches_per_epoch": 2, "gradient_accumulation_steps": 1}


def saved_state(tmp_path, steps=4, name="run-state"):
    training = TinyTraining()
    for _ in range(steps):
        training.step()
    folder = tmp_path / "out" / name
    save_state(folder, OneProcess(), training, Position(steps, steps // 2, 0), FINGERPRINT)
    return folder, training


def referenced(folder):
    state = json.loads((folder / "training_state.json").read_text())
    return state["files"]


CORRUPTIONS = [
    pytest.param(
        lambda f: (f / "training_state.json").write_text('{"position": {"st'), "training_state.json", id="json"
    ),
    pytest.param(lambda f: (f / "training_state.json").write_text("[1, 2]"), "training_state.json", id="json-shape"),
    pytest.param(
        lambda f: (f / referenced(f)["adapter"]).write_bytes((f / referenced(f)["adapter"]).read_bytes()[:-7]),
        "adapter",
        id="adapter-truncated",
    ),
    pytest.param(lambda f: (f / referenced(f)["optimizer"]).write_bytes(b"\x80\x04garbage"), "optimizer", id="pickle"),
    pytest.param(lambda f: (f / referenced(f)["rng"][0]).unlink(), "rng", id="rng-missing"),
]


@pytest.mark.parametrize("corrupt, culprit", CORRUPTIONS)
def test_corrupt_state_files_are_refused_at_start_naming_the_path(tmp_path, monkeypatch, corrupt, culprit):
    folder, _ = saved_state(tmp_path)
    corrupt(folder)
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the state was checked"))
    with pytest.raises(UsageError, match=f"{folder}.*{culprit}"):
        trainer.main(["--train_data_dir", str(data_folder(tmp_path)), "--resume", str(folder)])
    with pytest.raises(StateError, match=f"{folder}.*{culprit}"):
        load_state(folder, OneProcess(), TinyTraining(), FINGERPRINT)


def test_resuming_with_max_train_steps_below_the_saved_step_is_refused(tmp_path, monkeypatch):
    folder, _ = saved_state(tmp_path, steps=4)
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the state was checked"))
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--resume", str(folder)]
    with pytest.raises(UsageError, match="step 4.*--max_train_steps 3"):
        trainer.main(argv + ["--max_train_steps", "3"])
    with pytest.raises(UsageError, match="step 4.*--max_train_epochs 1 .2 steps"):
        trainer.main(argv + ["--max_train_epochs", "1"])


def test_a_state_of_another_run_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    folder, _ = saved_state(tmp_path, steps=4)
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the state was checked"))
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--resume", str(folder), "--max_train_steps", "9"]
    with pytest.raises(UsageError, match="differs from the saved one.*network_dim.*trained components"):
        trainer.main(argv)


def test_state_round_trip_and_leftovers_of_killed_saves_are_ignored_then_cleaned(tmp_path):
    folder, training = saved_state(tmp_path, steps=3)
    (folder / ".adapter-000009.safetensors.abc.tmp").write_bytes(b"half a file")
    (folder / "optimizer-000009.safetensors").write_bytes(b"from a save that never committed")
    fresh = TinyTraining(seed=1)
    assert load_state(folder, OneProcess(), fresh, FINGERPRINT) == Position(3, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.tensors().values(), training.tensors().values()))
    training.step()
    save_state(folder, OneProcess(), training, Position(4, 2, 0), FINGERPRINT)
    files = referenced(folder)
    expected = {"training_state.json", files["adapter"], files["optimizer"], *files["rng"]}
    assert {p.name for p in folder.iterdir()} == expected


def test_a_damaged_disk_cache_entry_is_encoded_again(tmp_path):
    encoded = []

    def encode(captions):
        encoded.extend(captions)
        return {"states": torch.stack([torch.full((3,), float(len(c))) for c in captions])}

    TextCache("tag", encode, tmp_path / "cache").fill(["a cat", "a dog"], batch_size=2, show_progress=False)
    damaged = next((tmp_path / "cache").glob("*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:20])
    cache = TextCache("tag", encode, tmp_path / "cache")
    assert cache.fill(["a cat", "a dog"], batch_size=2, show_progress=False) == 1
    assert torch.equal(cache.get(["a cat", "a dog"])["states"], torch.full((2, 3), 5.0))
    assert len(encoded) == 3
    damaged.write_bytes(b"")
    with pytest.raises(OSError, match=str(damaged)):
        cache.get(["a cat", "a dog"])


def test_trainer_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        folder, _ = saved_state(tmp_path)
        save_image(Image.new("RGB", (4, 4)), tmp_path / "sample.png")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [*folder.iterdir(), tmp_path / "sample.png"]}
    assert modes == {0o640}


def test_leftovers_of_killed_saves_are_removed_for_this_output_name_only(tmp_path):
    out = tmp_path / "out"
    state, _ = saved_state(tmp_path, name="style-step00000002-state")
    other_state, _ = saved_state(tmp_path, name="style_v2-state")
    leftovers = [
        out / ".style.safetensors.k2j4h1ab.tmp",
        out / ".style-000003.safetensors.abcdefgh.tmp",
        out / "style-state.partial",
        state / ".optimizer-000002.safetensors.q1w2e3r4.tmp",
        state / "adapter-000002.safetensors",  # written, never committed
        out / "style_peft" / "unet" / ".adapter_config.json.zzzzzzzz.tmp",
        out / "sample" / ".style_000004_01.png.abcd1234.tmp",
    ]
    kept = [
        out / ".style_v2.safetensors.k2j4h1ab.tmp",  # another run's save in progress
        other_state / "adapter-000002.safetensors",
        out / "sample" / ".style_v2_000004_01.png.abcd1234.tmp",
        out / "notes.tmp",
    ]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.name.endswith(".partial") else path.write_bytes(b"x")
    removed = remove_leftovers(out, "style") + remove_stale_state_files(out, "style")
    assert sorted(removed) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert load_state(state, OneProcess(), TinyTraining(), FINGERPRINT) == Position(4, 2, 0)


# ------------------------------------------------------------------------------------------------------ kill tests
class KillAt:
    """Counts the write operations of saves; at number ``target`` the process dies by SIGKILL (when ``target`` is
    None it only counts). ``partial`` first leaves the file being written cut to that fraction, as a kill in the middle
    of a write would."""

    def __init__(self, target=None, partial=None):
        self.target, self.partial, self.count, self.paths = target, partial, 0, []

    def __call__(self, path=None):
        self.count += 1
        self.paths.append(os.path.basename(path) if path is not None else None)
        if self.target is not None and self.count >= self.target:
            if path is not None and self.partial is not None and os.path.exists(path):
                with open(path, "r+b") as handle:
                    handle.truncate(int(os.path.getsize(path) * self.partial))
            os.kill(os.getpid(), signal.SIGKILL)


def hook_writes(patch, kill):
    """Route every file-system write step through ``kill``: before each rename, removal and folder creation, and
    right after a file is opened for writing (a non-atomic writer then leaves an empty file at its final path).
    Before a rename the file about to be renamed may be cut short, as a kill in the middle of writing it would."""
    real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir")}
    real_open, real_rmtree = io.open, shutil.rmtree

    def step(name, takes_path=False):
        def wrapped(path, *args, **kwargs):
            kill(path if takes_path else None)
            return real[name](path, *args, **kwargs)

        return wrapped

    def opened(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            kill(None)
        return handle

    for name in real:
        patch(os, name, step(name, takes_path=name in ("replace", "rename")))
    patch(shutil, "rmtree", lambda *a, **k: (kill(None), real_rmtree(*a, **k))[1])
    patch(builtins, "open", opened)
    patch(io, "open", opened)


def latest_state(output_dir, output_name):
    """The state folder of ``output_name`` with the highest saved step, or None."""
    steps = {}
    for folder in output_dir.glob(f"{output_name}*-state"):
        try:
            steps[folder] = json.loads((folder / "training_state.json").read_text())["position"]["step"]
        except (OSError, ValueError, KeyError):
            continue
    return max(steps, key=steps.get) if steps else None


KILL_ARGS = ["--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state", "--network_train_unet_only"]
KILL_ARGS += ["--train_batch_size", "1", "--seed", "3", "--network_dim", "1", "--save_peft_adapter"]


def kill_run(tmp_path, name, target, partial=None):
    """Run the trainer in a forked child that SIGKILLs itself at write number ``target``; return its exit status."""
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / name), *KILL_ARGS]
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            hook_writes(lambda owner, attr, value: setattr(owner, attr, value), KillAt(target, partial))
            with open(os.devnull, "w") as quiet:
                sys.stdout = sys.stderr = quiet
                trainer.main(argv)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def check_no_corrupt_final_file(folder):
    """Every non-hidden safetensors/JSON file loads; every state folder with a training_state.json is complete."""
    for path in folder.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as handle:
                [handle.get_tensor(k) for k in handle.keys()]  # noqa: SIM118
        elif path.suffix == ".json":
            state = json.loads(path.read_text())
            if path.name == "training_state.json":
                files = state["files"]
                for name in (files["adapter"], files["optimizer"], *files["rng"]):
                    load_file(path.parent / name)


def finish_after_kill(tmp_path, name):
    """What a user does after a crash: resume from the newest state (or start again if none was saved)."""
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / name), *KILL_ARGS]
    newest = latest_state(tmp_path / name, "tiny_sdxl_lokr")
    return trainer.main(argv + (["--resume", str(newest)] if newest else [])), newest


def final_tensors(folder):
    state = folder / "tiny_sdxl_lokr-state"
    files = referenced(state)
    kohya, _ = load_kohya(folder / "tiny_sdxl_lokr.safetensors")
    return {**kohya, **load_file(state / files["adapter"]), **load_file(state / files["optimizer"])}


def check_kill_and_resume(tmp_path, reference, name, target, partial):
    status = kill_run(tmp_path, name, target, partial)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill point {target} never reached"
    check_no_corrupt_final_file(tmp_path / name)
    _, resumed_from = finish_after_kill(tmp_path, name)
    got = final_tensors(tmp_path / name)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    leftovers = [p for p in (tmp_path / name).rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not leftovers
    return resumed_from


def killed_save(folder, training, position, target):
    """``save_state`` in a forked child that SIGKILLs itself at write number ``target``; True if it was killed."""
    pid = os.fork()
    if pid == 0:
        try:
            hook_writes(lambda owner, attr, value: setattr(owner, attr, value), KillAt(target, partial=0.5))
            save_state(folder, OneProcess(), training, position, FINGERPRINT)
        finally:
            os._exit(0)
    status = os.waitpid(pid, 0)[1]
    return os.WIFSIGNALED(status)


@FORK
def test_a_state_folder_is_resumable_at_every_instant_of_a_save_replacing_it(tmp_path):
    """A second save into the same folder killed at each of its write steps: the folder always loads, holding the
    old state or the new one entirely, and the next save cleans what the killed one left."""
    folder, training = saved_state(tmp_path, steps=2)
    old = training.tensors()
    training.step()
    new = training.tensors()
    target = 1
    while killed_save(folder, training, Position(3, 1, 1), target):
        loaded = TinyTraining(seed=7)
        position = load_state(folder, OneProcess(), loaded, FINGERPRINT)
        expected = old if position == Position(2, 1, 0) else new
        assert position in (Position(2, 1, 0), Position(3, 1, 1)), f"killed at write {target}"
        assert all(torch.equal(loaded.tensors()[k], expected[k]) for k in expected), f"killed at write {target}"
        target += 1
    assert target > 4  # the save has several write steps, and each was tried
    save_state(folder, OneProcess(), training, Position(3, 1, 1), FINGERPRINT)
    files = referenced(folder)
    assert {p.name for p in folder.iterdir()} == {
        "training_state.json",
        files["adapter"],
        files["optimizer"],
        *files["rng"],
    }


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run, counting the write operations its saves make (shared by the tests below: the data
    folders they make hold the same images, and training does not depend on where they are)."""
    base = tmp_path_factory.mktemp("straight")
    counter = KillAt()
    argv = ["--train_data_dir", str(data_folder(base)), "--output_dir", str(base / "out"), *KILL_ARGS]
    with pytest.MonkeyPatch.context() as patch:
        hook_writes(patch.setattr, counter)
        trainer.main(argv)
    return final_tensors(base / "out"), counter.paths, base / "out" / "tiny_sdxl_lokr-step00000001-state"


def assert_same_state(folder, reference):
    """Both state folders hold the same position, schedule, optimizer layout, tensors and RNG states, bit for bit."""
    a, b = read_state(folder), read_state(reference)
    assert all(a[key] == b[key] for key in ("position", "scheduler", "optimizer", "fingerprint"))
    files, expected = state_files(folder), state_files(reference)
    assert files.keys() == expected.keys()
    for kind in files:
        got, want = load_file(files[kind]), load_file(expected[kind])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), kind
        with safe_open(files[kind], "pt") as one, safe_open(expected[kind], "pt") as other:
            assert one.metadata() == other.metadata(), kind


def renames_of(paths, prefix):
    """Write numbers (1-based) of the renames of temporary files of ``prefix``."""
    return [number for number, name in enumerate(paths, start=1) if name and name.startswith(f".{prefix}")]


@FORK
def test_killed_while_saving_the_final_state_resumes_bit_identical(tmp_path, straight_run):
    """Two saves (step 1, then the final files at step 2), each with its state. Killed while the final state's
    optimizer file is half written, the run resumes from step 1 and ends bit-identical to the uninterrupted run.
    (Every write step of a state save is a kill point in
    test_a_state_folder_is_resumable_at_every_instant_of_a_save_replacing_it.)"""
    reference, paths, _ = straight_run
    last_optimizer = renames_of(paths, "optimizer-")[-1]
    resumed = check_kill_and_resume(tmp_path, reference, "mid-optimizer", last_optimizer, 0.5)
    assert resumed.name == "tiny_sdxl_lokr-step00000001-state"


@FORK
def test_sigterm_or_ctrl_c_stops_after_the_step_with_it_saved_exactly(tmp_path, straight_run):
    """SIGTERM (a scheduler's preemption) in the middle of step 1 of 2, with no periodic saves: the run finishes the
    step, saves it with a state bit-identical to an uninterrupted run's state of step 1, and exits with 128 + 15."""
    _, _, step1_state = straight_run
    out = tmp_path / "stopped"
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(out), *KILL_ARGS]
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 0
        try:
            real, sent = trainer.sample_noise, []

            def noise_then_sigterm(latents, generator, offset=0.0):
                if not sent:
                    sent.append(os.kill(os.getpid(), signal.SIGTERM))
                return real(latents, generator, offset)

            trainer.sample_noise = noise_then_sigterm
            with open(os.devnull, "w") as quiet:
                sys.stdout = sys.stderr = quiet
                trainer.main([*argv, "--save_every_n_steps", "1000"])
        except SystemExit as stop:
            status = stop.code
        finally:
            os._exit(status)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
    state = out / "tiny_sdxl_lokr-step00000001-state"
    saved = {p.name for p in out.glob("tiny*")}
    assert saved == {state.name, "tiny_sdxl_lokr-step00000001.safetensors", "tiny_sdxl_lokr-step00000001_peft"}
    assert_same_state(state, step1_state)


def test_a_failure_in_a_step_keeps_the_steps_before_it_exactly(tmp_path, straight_run, monkeypatch, capsys):
    """Out of memory in step 2 of 2 (after its noise was drawn), with no periodic saves: step 1 is saved with the
    state an uninterrupted run has after step 1 (RNG states included), and the error still reaches the user."""
    _, _, step1_state = straight_run
    real, calls = trainer.sample_noise, []

    def noise_then_out_of_memory(latents, generator, offset=0.0):
        noise = real(latents, generator, offset)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return noise

    monkeypatch.setattr(trainer, "sample_noise", noise_then_out_of_memory)
    out = tmp_path / "failed"
    argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(out), *KILL_ARGS]
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        trainer.main([*argv, "--save_every_n_steps", "1000"])
    assert_same_state(out / "tiny_sdxl_lokr-step00000001-state", step1_state)
    assert load_kohya(out / "tiny_sdxl_lokr-step00000001.safetensors")[1]["ss_steps"] == "1"
    assert (
        "training failed in step 2 (RuntimeError); step 1 is saved; continue with --resume" in capsys.readouterr().out
    )


@pytest.mark.slow
@FORK
def test_killed_at_random_write_steps_while_saving_resumes_bit_identical(tmp_path, straight_run):
    """24 trials, each killed at a write step drawn at random among all the steps of both saves, the file being
    written cut to a random length (or not) first."""
    reference, paths, _ = straight_run
    rng = random.Random(2026)
    outcomes = []
    for trial in range(24):
        target, partial = rng.randint(1, len(paths)), rng.choice([None, 0.0, rng.random()])
        resumed = check_kill_and_resume(tmp_path, reference, f"trial{trial}", target, partial)
        outcomes.append((target, paths[target - 1], partial, resumed.name if resumed else None))
    print("\n".join(f"kill at write {t} ({name}), cut to {p}: resumed from {r}" for t, name, p, r in outcomes))
    assert {resumed for *_, resumed in outcomes} == {None, "tiny_sdxl_lokr-step00000001-state"}


@pytest.mark.slow
@FORK
def test_killed_by_another_process_at_random_times_while_saving_resumes_bit_identical(tmp_path, straight_run):
    """20 trials of a real SIGKILL from outside at a random time after a save began (the first or the second save,
    0-150 ms in: inside the writes of the kohya file, the state files, the fsyncs, or just after the save)."""
    reference, _, _ = straight_run
    rng = random.Random(7)
    during_save = 0
    for trial in range(20):
        name = f"timed{trial}"
        argv = ["--train_data_dir", str(data_folder(tmp_path)), "--output_dir", str(tmp_path / name), *KILL_ARGS]
        started, finished = os.pipe(), os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                real_save = trainer_runner.Trainer._save

                def announced_save(self, *args, **kwargs):
                    os.write(started[1], b"s")
                    real_save(self, *args, **kwargs)
                    os.write(finished[1], b"f")

                trainer_runner.Trainer._save = announced_save
                with open(os.devnull, "w") as quiet:
                    sys.stdout = sys.stderr = quiet
                    trainer.main(argv)
            finally:
                os._exit(0)
        os.close(started[1])
        os.close(finished[1])
        which, delay = rng.choice([1, 2]), rng.uniform(0.0, 0.15)
        assert len(os.read(started[0], 1) + (os.read(started[0], 1) if which == 2 else b"x")) == 2, name
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.set_blocking(finished[0], False)
        try:
            saves_finished = len(os.read(finished[0], 8))
        except BlockingIOError:
            saves_finished = 0
        during_save += saves_finished < which
        os.waitpid(pid, 0)
        os.close(started[0])
        os.close(finished[0])
        check_no_corrupt_final_file(tmp_path / name)
        finish_after_kill(tmp_path, name)
        got = final_tensors(tmp_path / name)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got), name
    print(f"{during_save} of 20 kills landed while a save was in progress")
    assert during_save >= 8
