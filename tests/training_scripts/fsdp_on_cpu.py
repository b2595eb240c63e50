"""Run a trainer script under accelerate's FSDP2 on CPU processes (gloo), for the tests.

accelerate 1.15 never selects FSDP on CPU: ``AcceleratorState`` turns ``ACCELERATE_USE_FSDP`` into
``DistributedType.FSDP`` only for accelerator devices (MULTI_GPU, MULTI_XPU, …), and a CPU launch is MULTI_CPU. torch's
``fully_shard`` itself runs on CPU with gloo. So this launcher, started by ``accelerate launch`` on CPU (MULTI_CPU,
gloo), switches the fresh accelerator's state to FSDP with an ``fsdp_version=2`` plugin, exactly what a GPU launch
with an FSDP config file holds, and then runs the trainer script: ``accelerate.prepare`` shards the model with its own
``fsdp2_prepare_model``. Usage: ``accelerate launch fsdp_on_cpu.py <script> [trainer options]``; the environment
variable ``FSDP_ON_CPU_WRAP`` names the block classes to wrap (comma-separated; default: the model's
``_no_split_modules``).
"""

import os
import runpy
import sys

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class CpuFsdp2Accelerator(Accelerator):
    """An ``Accelerator`` whose state says FSDP (version 2, FULL_SHARD, transformer-block wrapping)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wrap = os.environ.get("FSDP_ON_CPU_WRAP")
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=wrap.split(",") if wrap else None,
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
            activation_checkpointing=os.environ.get("FSDP_ON_CPU_AC") == "1",
        )
        if self.mixed_precision != "no":  # as AcceleratorState does for an FSDP launch
            plugin.set_mixed_precision(self.mixed_precision)
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def main() -> None:
    script, *options = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import lyco_train.loop

    lyco_train.loop.Accelerator = CpuFsdp2Accelerator
    sys.argv = [script, *options]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
