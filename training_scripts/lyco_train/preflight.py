"""Start-up checks of every path a run reads or writes, so that a folder it cannot write, a prompt file it cannot
parse or a state it cannot resume is reported before any model loads, not after hours of training."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .sampling import SamplePrompt, read_sample_prompts
from .state import StateError, check_state_folder, steps_planned

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".bin", ".pth")


def writable_folder_problem(path: str, option: str) -> str | None:
    """Why ``path`` cannot hold the run's files (None when it can): an existing folder is tried with a real write, a
    missing one must be creatable in its nearest existing parent."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            return f"{option} '{path}' is a file, not a folder"
        try:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".lyco-write-check-", suffix=".tmp")
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            return f"{option} '{path}' is not writable: {err.strerror or err}"
        return None
    parent = next(p for p in folder.absolute().parents if p.exists())
    if not parent.is_dir():
        return f"{option} '{path}' cannot be created: '{parent}' is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} '{path}' cannot be created: no permission to write in '{parent}'"
    return None


def readable_file_problem(path: str, option: str) -> str | None:
    """Why ``path`` is not a file this process can read (None when it is)."""
    file = Path(path).expanduser()
    if not file.exists():
        return f"{option} '{path}' does not exist"
    if not file.is_file():
        return f"{option} '{path}' is not a file"
    if not os.access(file, os.R_OK):
        return f"{option} '{path}' is not readable (permissions)"
    return None


def output_name_problem(name: str) -> str | None:
    """Why ``--output_name`` cannot name files in ``--output_dir`` (None when it can)."""
    separators = {os.sep, os.altsep or os.sep, "/"}
    if not name.strip() or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        return f"--output_name {name!r} must be a plain file name (no folders: put those in --output_dir)"
    return None


def _looks_local(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or value.startswith(("/", "./", "../", "~")) or os.path.isabs(value)


def path_problems(
    args,
    *,
    pixel_multiple: int,
    input_files: tuple[str, ...] = (),
    files_or_hub_ids: tuple[str, ...] = (),
) -> list[str]:
    """Every problem with the run's paths: output, logging and cache folders writable, the final files' names free,
    the prompt file parsed line by line, the state folder complete and not past the planned steps, and input files
    present (``input_files`` always name files; ``files_or_hub_ids`` only when the value looks like a local path)."""
    problems = [writable_folder_problem(args.output_dir, "--output_dir")]
    if args.train_data_dir and Path(args.output_dir).resolve() == Path(args.train_data_dir).resolve():
        problems.append(
            "--output_dir is the --train_data_dir: the sample images written to its 'sample' folder would be read "
            "as training images (without captions) by the next run; choose another --output_dir"
        )
    name_problem = output_name_problem(args.output_name)
    problems.append(name_problem)
    if not name_problem and Path(args.output_dir, f"{args.output_name}.safetensors").is_dir():
        problems.append(f"'{args.output_name}.safetensors' in --output_dir is a folder; choose another --output_name")
    if args.log_with and args.logging_dir:
        problems.append(writable_folder_problem(args.logging_dir, "--logging_dir"))
    disk_cache = args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk
    if disk_cache and (args.cache_dir or args.train_data_dir):
        cache_dir = args.cache_dir or str(Path(args.train_data_dir) / ".lyco_cache")
        problems.append(writable_folder_problem(cache_dir, "--cache_dir" if args.cache_dir else "the latent cache"))
    if args.sample_prompts:
        problem = readable_file_problem(args.sample_prompts, "--sample_prompts")
        if problem is None:
            try:
                read_sample_prompts(args.sample_prompts, SamplePrompt(prompt=""), pixel_multiple)
            except ValueError as err:
                problem = str(err)
        problems.append(problem)
    for option in input_files:
        if getattr(args, option):
            problems.append(readable_file_problem(getattr(args, option), f"--{option}"))
    for option in files_or_hub_ids:
        value = getattr(args, option)
        if value and _looks_local(value) and not Path(value).expanduser().is_dir():
            problems.append(readable_file_problem(value, f"--{option}"))
    if args.resume:
        problems.append(resume_problem(args))
    return [problem for problem in problems if problem]


def resume_problem(args) -> str | None:
    """Why ``--resume`` cannot continue this run (None when it can): a damaged state folder (naming the file), or a
    saved step beyond the steps the options plan (a file saved then would claim more steps than the run has)."""
    try:
        state = check_state_folder(args.resume)
    except StateError as err:
        return f"--resume: {err}"
    step = state["position"]["step"]
    planned = steps_planned(state, args.max_train_steps, args.max_train_epochs)
    if step <= planned:
        return None
    options = (
        f"--max_train_epochs {args.max_train_epochs} ({planned} steps)"
        if args.max_train_epochs
        else f"--max_train_steps {planned}"
    )
    return (
        f"--resume '{args.resume}' is at step {step}, beyond the end of this run ({options}); "
        f"to continue it, plan at least {step} steps"
    )
