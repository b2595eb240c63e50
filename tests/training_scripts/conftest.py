"""Make the trainer scripts and their ``lyco_train`` helpers importable as they are when run as scripts."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "training_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each trainer run is a process of its own in real life: reset accelerate's process-wide singletons (mixed
    precision is fixed per process) and give other tests their CPU thread count back (tiny runs use one)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
