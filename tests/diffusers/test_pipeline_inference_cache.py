"""The inference cache in a diffusers SDXL pipeline: cached outputs are the uncached ones bit for bit, and follow
``set_adapters`` weights, ``disable_lora`` and ``fuse_lora`` (whose merge frees every entry)."""

import pytest
import torch

from peft_lyco import inference_cache, inference_cache_info
from peft_lyco.diffusers import load_lyco_weights
from tests.convert.helpers import COMPONENTS, fresh_pipe, lycoris_case, outputs


@pytest.fixture(scope="module")
def pipe():
    pipe = fresh_pipe()
    load_lyco_weights(pipe, lycoris_case(algo="loha", use_tucker=True)[0], adapter_name="loha")
    load_lyco_weights(pipe, lycoris_case(algo="lokr", factor=4, dim=2, alpha=1)[0], adapter_name="lokr")
    for component in COMPONENTS:
        getattr(pipe, component).eval()  # as from_pretrained leaves them
    return pipe


def _equal(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


def _uncached(pipe):
    with inference_cache(0):
        return outputs(pipe)


@torch.no_grad()
def test_cached_pipeline_outputs_follow_set_adapters_disable_and_fuse(pipe):
    pipe.set_adapters(["loha", "lokr"], adapter_weights=[1.0, 1.0])
    uncached = outputs(pipe)
    with inference_cache(1 << 30):
        first, second = outputs(pipe), outputs(pipe)
        assert _equal(first, uncached) and _equal(second, uncached)
        assert inference_cache_info().hits == inference_cache_info().misses > 0
        pipe.set_adapters(["loha", "lokr"], adapter_weights=[0.5, -1.0])
        reweighted = outputs(pipe)
        assert not _equal(reweighted, uncached) and _equal(reweighted, _uncached(pipe))
        outputs(pipe)  # entries again (_uncached's block freed them)
        pipe.disable_lora()
        assert _equal(outputs(pipe), _uncached(pipe))
        pipe.enable_lora()
        assert _equal(outputs(pipe), reweighted)
        pipe.fuse_lora()
        assert inference_cache_info().entries == 0  # merging frees the entries
        pipe.unfuse_lora()  # W + ΔW − ΔW: rounded base weights, new versions
        assert _equal(outputs(pipe), _uncached(pipe))
