"""Make the trainer scripts and their ``lyco_train`` helpers importable as they are when run as scripts."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "training_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """The tiny trainers use one CPU thread; give other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
