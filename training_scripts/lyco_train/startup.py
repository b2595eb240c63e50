"""The start both trainers share, before any model loads: the accelerator, the images, the ``--resume`` check, the seed
and what identifies the run."""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass

from accelerate import Accelerator
from accelerate.utils import set_seed

from .batches import TrainingData, training_images
from .loop import make_accelerator
from .metadata import RunInfo
from .runner import check_resume_fits
from .tiny import use_one_cpu_thread


@dataclass(frozen=True)
class RunStart:
    """What a trainer has once the run has started: ``tiny`` is the embedded demo (no model path given)."""

    accelerator: Accelerator
    data: TrainingData
    run: RunInfo
    tiny: bool


def start_run(
    args: argparse.Namespace,
    *,
    family: str,
    tiny_model: str,
    denoiser: str,
    text_encoders: tuple[str, ...],
    unused_parameters: bool = False,
) -> RunStart:
    """Make the accelerator, read (or for the tiny demo generate) the images, refuse a ``--resume`` state that does not
    fit them, then seed every process.

    Args:
        args: the parsed command line.
        family: the model family written into metadata (``"sdxl"``, ``"anima"``).
        tiny_model: the tiny demo's display name (``"SDXL"``, ``"Anima"``), used when no model path is given.
        denoiser: the component name of the UNet/DiT; ``text_encoders`` those of the text encoders. The components a
            state was trained on must match these (text encoders left out with ``--network_train_unet_only``).
        unused_parameters: some trained parameters get no gradient, so multi-GPU DDP must look for them.
    """
    tiny = args.pretrained_model_name_or_path is None
    accelerator = make_accelerator(args, unused_parameters=unused_parameters)
    if tiny:
        use_one_cpu_thread()
    data = training_images(args, accelerator, tiny_model=tiny_model if tiny else None)
    components = (denoiser,) if args.network_train_unet_only else (denoiser, *text_encoders)
    check_resume_fits(args, accelerator, data.records, data.buckets, components=components)
    set_seed(args.seed, device_specific=True)
    model_name = args.pretrained_model_name_or_path or f"tiny-random-{family}"
    return RunStart(accelerator, data, RunInfo(str(uuid.uuid4()), time.time(), model_name, family), tiny)
