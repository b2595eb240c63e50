"""Block swapping (sd-scripts' ``--blocks_to_swap``): the frozen weights of the last N blocks of a transformer live on
an offload device (the CPU) and are copied to the compute device only while their block runs forward or backward.

Only frozen tensors move: trainable adapter parameters inside the blocks stay on the compute device, so the optimizer
and gradient synchronisation never see a parameter change device. A swapped block keeps no activations: in training
its forward runs without a graph and is recomputed in backward with the weights brought back in (as reentrant
gradient checkpointing does, with the same RNG state, so dropout masks repeat), which makes the adapter's gradients
the same as without swapping. Copies from pinned CPU memory are issued ``non_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class BlockSwap:
    """Keeps the frozen weights of ``blocks[-count:]`` on ``offload_device``; ``run(index, *inputs)`` runs one of them.

    Call ``offload()`` once every other placement (``.to(device)``, dtype casts, accelerate's ``prepare``) is done: it
    takes the offloaded copies from the current weights and frees the compute-device ones.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        count: int,
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
    ):
        if not 0 < count <= len(blocks):
            raise ValueError(f"blocks_to_swap must be between 1 and the number of blocks ({len(blocks)}), got {count}")
        self.blocks = list(blocks)
        self.first = len(blocks) - count
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.homes: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}

    def swaps(self, index: int) -> bool:
        """Whether block ``index`` is one of the swapped blocks."""
        return index >= self.first

    def _frozen(self, index: int) -> list[nn.Parameter]:
        return [p for p in self.blocks[index].parameters() if not p.requires_grad]

    def offload(self) -> None:
        """Copy the swapped blocks' frozen weights to the offload device (pinned when copying to CUDA) and point the
        parameters there."""
        pin = self.device.type == "cuda" and self.offload_device.type == "cpu"
        for index in range(self.first, len(self.blocks)):
            homes = []
            for param in self._frozen(index):
                home = param.data.to(self.offload_device, copy=True)
                homes.append((param, home.pin_memory() if pin else home))
                param.data = homes[-1][1]
            self.homes[index] = homes

    def bring_in(self, index: int) -> None:
        """Fresh compute-device copies of block ``index``'s frozen weights."""
        for param, home in self.homes[index]:
            param.data = home.to(self.device, non_blocking=True, copy=True)

    def send_out(self, index: int) -> None:
        """Point block ``index``'s frozen weights back at their offloaded copies (the device copies are freed)."""
        for param, home in self.homes[index]:
            param.data = home

    def on_offload_device(self, index: int) -> bool:
        """Whether block ``index``'s frozen weights are their offloaded copies right now (between uses)."""
        return all(param.data.data_ptr() == home.data_ptr() for param, home in self.homes[index])

    @torch.compiler.disable
    def run(self, index: int, block: Callable, *inputs):
        """``block(*inputs)`` with block ``index``'s weights brought in; with gradients, recomputed in backward.

        Kept out of ``torch.compile`` graphs (the swapped blocks run eagerly): compiled code guards on the weights'
        storage, which every swap replaces, so compiling through it would recompile at every step."""
        if index not in self.homes:
            raise RuntimeError("BlockSwap.offload() must run before the swapped blocks are used")
        if not torch.is_grad_enabled():
            self.bring_in(index)
            try:
                return block(*inputs)
            finally:
                self.send_out(index)
        # the block's trainable parameters go in as inputs too, so the output requires grad even when no input does
        trainable = [p for p in self.blocks[index].parameters() if p.requires_grad]
        return _SwappedForward.apply(self, index, block, len(inputs), *inputs, *trainable)


class _SwappedForward(torch.autograd.Function):
    """Forward without a graph; backward brings the weights in, recomputes the block under the saved RNG state,
    back-propagates through it (adapter gradients accumulate as usual) and sends the weights out again."""

    @staticmethod
    def forward(ctx, swap: BlockSwap, index: int, block: Callable, count: int, *inputs_and_trainable):
        inputs = inputs_and_trainable[:count]
        ctx.swap, ctx.index, ctx.block, ctx.trainable = swap, index, block, len(inputs_and_trainable) - count
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        ctx.save_for_backward(*[x if torch.is_tensor(x) else None for x in inputs])
        ctx.others = [None if torch.is_tensor(x) else x for x in inputs]
        swap.bring_in(index)
        try:
            with torch.no_grad():
                return block(*inputs)
        finally:
            swap.send_out(index)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = [
            other if tensor is None else tensor.detach().requires_grad_(tensor.requires_grad)
            for tensor, other in zip(saved, ctx.others)
        ]
        swap, index = ctx.swap, ctx.index
        swap.bring_in(index)
        try:
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if ctx.cuda_rng else []):
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state_all(ctx.cuda_rng)
                with torch.enable_grad():
                    outputs = ctx.block(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        finally:
            swap.send_out(index)
        input_grads = tuple(x.grad if torch.is_tensor(x) and x.requires_grad else None for x in inputs)
        # the trainable parameters' gradients were accumulated by the inner backward
        return (None, None, None, None, *input_grads, *[None] * ctx.trainable)
