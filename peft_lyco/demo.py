"""A one-minute tour on CPU: LoKr on a tiny SDXL-shaped UNet, a few training steps, save, reload, compare.

Run ``python -m peft_lyco.demo``. Everything is built from configs in code; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from diffusers import UNet2DConditionModel
from peft import PeftModel, get_peft_model

from peft_lyco import LoKrConfig

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def tiny_unet() -> UNet2DConditionModel:
    """A randomly initialised two-level UNet with SDXL's block types (cross-attention, linear projections)."""
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
    )


def main(steps: int = 20, seed: int = 0) -> float:
    """Train a LoKr adapter to fit a fixed batch and return how much the saved-and-reloaded adapter moves the output."""
    torch.manual_seed(seed)
    unet = tiny_unet()
    config = LoKrConfig(r=4, alpha=2, conv_r=2, conv_alpha=1, factor=4, target_modules=UNET_TARGETS)
    model = get_peft_model(copy.deepcopy(unet), config)
    model.print_trainable_parameters()
    sample, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 7, 32)
    target = torch.randn(2, 4, 16, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(sample, t, context).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(unet), folder).eval()
        with torch.no_grad():
            before = unet(sample, t, context).sample
            after = reloaded(sample, t, context).sample
            same = (after - model.eval()(sample, t, context).sample).abs().max().item()
    change = (after - before).abs().mean().item()
    print(f"saved adapter: {sum(1 for n, _ in reloaded.named_parameters() if 'lokr_' in n)} tensors")
    print(f"reloaded adapter vs in-memory model: max abs diff {same:.2e}")
    print(f"mean |output change| caused by the adapter: {change:.4f}")
    return change


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.seed)
