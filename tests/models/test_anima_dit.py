"""AnimaDiT: real parameter names, forward shapes, and fp64 checks against Anima's published formulas."""

from pathlib import Path

import anima_reference as ref
import pytest
import torch
from einops import rearrange

from peft_lyco.models.anima import AnimaConfig, AnimaDiT, build_tiny_anima
from peft_lyco.models.anima.dit import DiTBlock, RoPE3D
from peft_lyco.models.anima.llm_adapter import LLMAdapter
from peft_lyco.models.anima.rope import rope1d_angles, timestep_features

KEYS_FILE = Path(__file__).parent / "data" / "anima_checkpoint_keys.tsv"


def real_keys():
    rows = [line.rstrip("\n").split("\t") for line in KEYS_FILE.read_text().splitlines() if not line.startswith("#")]
    return {key: tuple(int(n) for n in shape.strip("[]").split(", ")) for key, shape in rows}


def randomise(module, std=0.3):
    """Random values everywhere (zero-initialised heads included) so every term of the formulas matters."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=std)
    return module


def tiny_config(**overrides):
    values = dict(
        model_channels=32,
        num_blocks=1,
        num_heads=2,
        crossattn_emb_channels=24,
        adaln_lora_dim=8,
        max_img_h=32,
        max_img_w=32,
        max_frames=4,
        adapter_source_dim=20,
        adapter_model_dim=24,
        adapter_num_layers=1,
        adapter_num_heads=4,
        adapter_vocab_size=50,
    )
    return AnimaConfig(**{**values, **overrides})


def test_default_config_has_exactly_the_released_keys_and_shapes():
    with torch.device("meta"):
        model = AnimaDiT()
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = real_keys()
    assert len(expected) == 688
    assert set(ours) == set(expected)
    assert {key: shape for key, shape in ours.items() if shape != expected[key]} == {}
    assert sum(value.numel() for value in model.parameters()) == sum(
        torch.Size(shape).numel() for key, shape in expected.items() if not key.startswith("pos_embedder.")
    )


def test_tiny_forward_shapes_image_video_and_adapter_paths():
    torch.manual_seed(0)
    model = AnimaDiT(tiny_config()).eval()
    context = torch.randn(2, 7, 24)
    with torch.no_grad():
        assert model(torch.randn(2, 16, 1, 6, 8), torch.rand(2), context).shape == (2, 16, 1, 6, 8)
        assert model(torch.randn(2, 16, 6, 8), torch.rand(2), context).shape == (2, 16, 6, 8)
        assert model(torch.randn(1, 16, 3, 4, 4), torch.rand(1, 3), context[:1]).shape == (1, 16, 3, 4, 4)
        qwen = torch.randn(2, 9, 20)
        ids, mask = torch.randint(0, 50, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        out = model(torch.randn(2, 16, 4, 4), torch.rand(2), qwen, target_input_ids=ids, target_attention_mask=mask)
        assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()


def test_bad_latents_raise_clear_errors():
    model = AnimaDiT(tiny_config())
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(torch.randn(1, 16, 5, 4), torch.rand(1), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\)"):
        model(torch.randn(1, 4, 4, 4), torch.rand(1), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="exceeds the RoPE table"):
        model(torch.randn(1, 16, 34, 4), torch.rand(1), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="context"):
        model(torch.randn(1, 16, 4, 4), torch.rand(1))


def test_one_block_matches_hand_computation_fp64():
    torch.manual_seed(0)
    blk = randomise(DiTBlock(dim=32, context_dim=24, num_heads=2, mlp_ratio=4.0, adaln_lora_dim=8)).double()
    x = torch.randn(2, 2, 3, 2, 32, dtype=torch.float64)
    emb, adaln_lora = torch.randn(2, 2, 32, dtype=torch.float64), torch.randn(2, 2, 96, dtype=torch.float64)
    context = torch.randn(2, 5, 24, dtype=torch.float64)
    angles = ref.rope3d_angles((2, 3, 2), 16)
    expected = ref.block(blk, x, emb, context, angles, adaln_lora, num_heads=2)
    with torch.no_grad():
        got = blk(x, emb, context, angles, adaln_lora)
    assert (expected - x).abs().max() > 0.1  # the block does something
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_whole_dit_with_adapter_matches_hand_computation_fp64():
    torch.manual_seed(0)
    model = randomise(AnimaDiT(tiny_config(num_blocks=2, adapter_num_layers=2)), std=0.2).double()
    x = torch.randn(2, 16, 2, 4, 6, dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.9], dtype=torch.float64)
    qwen = torch.randn(2, 6, 20, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 5))
    t5_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    qwen_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.float64)
    padding = torch.zeros(2, 1, 4, 6, dtype=torch.float64)
    padding[1, :, :, 3:] = 1
    expected = ref.dit(model, x, sigma, qwen, padding, ids, t5_mask, qwen_mask)
    with torch.no_grad():
        got = model(
            x,
            sigma,
            qwen,
            padding_mask=padding,
            target_input_ids=ids,
            target_attention_mask=t5_mask,
            source_attention_mask=qwen_mask,
        )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_llm_adapter_matches_hand_computation_fp64():
    torch.manual_seed(1)
    adapter = randomise(
        LLMAdapter(source_dim=12, target_dim=16, model_dim=16, num_layers=2, num_heads=2, vocab_size=30)
    ).double()
    source, ids = torch.randn(2, 4, 12, dtype=torch.float64), torch.randint(0, 30, (2, 3))
    t_mask, s_mask = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = ref.llm_adapter(adapter, source, ids, t_mask, s_mask, num_heads=2)
    with torch.no_grad():
        got = adapter(source, ids, t_mask, s_mask)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_rope3d_matches_formula_at_real_head_dim():
    module = RoPE3D(AnimaConfig())  # head_dim 128: t/h/w = 44/42/42, theta_h = theta_w = 1e4 * 4^(42/40)
    got = module((2, 3, 4)).double()
    torch.testing.assert_close(got, ref.rope3d_angles((2, 3, 4), 128), rtol=1e-6, atol=1e-6)
    # token (t=1, h=2, w=3) is row 1*12 + 2*4 + 3; its first h-frequency angle is 2 (position h) * 1
    assert got[1 * 12 + 2 * 4 + 3, 22].item() == pytest.approx(2.0)
    assert got[1 * 12 + 2 * 4 + 3, 22 + 21 + 1].item() == pytest.approx(3.0 * (1e4 * 4.0 ** (42 / 40)) ** (-2 / 42))
    assert (
        module.seq.shape == (256,)
        and module.dim_spatial_range.shape == (21,)
        and module.dim_temporal_range.shape == (22,)
    )


def test_rope_tables_stay_float32_when_the_model_is_cast_so_compile_traces_once():
    """A bf16 cast rebuilds the tables at once: the first forward used to do it, changing buffer dtypes inside the
    compiled graph, which cost every bf16 --torch_compile run a second compilation."""
    from torch._dynamo.testing import CompileCounter

    module = RoPE3D(AnimaConfig())
    want = module((2, 3, 4))
    module.to(torch.bfloat16)
    assert all(buffer.dtype == torch.float32 for buffer in module.buffers())
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for _ in range(2):
        assert torch.equal(compiled((2, 3, 4)), want)
    torch._dynamo.reset()
    assert counter.frame_count == 1


def test_adapter_rope_and_timestep_features_match_formulas():
    torch.testing.assert_close(rope1d_angles(7, 64).double(), ref.rope1d_angles(7, 64), rtol=1e-6, atol=1e-5)
    sigma = torch.tensor([0.0, 0.37, 1.0])
    got = timestep_features(sigma, 2048).double()
    torch.testing.assert_close(got, ref.timestep_features(sigma, 2048), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0, :1024], torch.ones(1024, dtype=torch.float64))  # cos first, then sin
    assert torch.equal(got[0, 1024:], torch.zeros(1024, dtype=torch.float64))


def test_patchify_packs_channel_major_and_unpatchify_inverts_channel_minor():
    model = AnimaDiT(tiny_config(patch_temporal=2, max_frames=8))
    x = torch.randn(1, 17, 4, 6, 8)
    expected = rearrange(x, "b c (t r) (h m) (w n) -> b t h w (c r m n)", r=2, m=2, n=2)
    assert torch.equal(model.x_embedder.proj[0](x), expected)
    tokens = torch.randn(1, 2, 3, 4, 2 * 2 * 2 * 16)
    expected = rearrange(tokens, "B T H W (p1 p2 t C) -> B C (T t) (H p1) (W p2)", p1=2, p2=2, t=2)
    assert torch.equal(model._unpatchify(tokens), expected)


def test_gradient_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    model = randomise(AnimaDiT(tiny_config(num_blocks=2)), std=0.1).train()
    x, sigma, ctx = torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 3, 24)
    plain = model(x, sigma, ctx)
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    again = model(x, sigma, ctx)
    again.square().mean().backward()
    torch.testing.assert_close(again, plain)
    for before, param in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(param.grad, before)


def test_tiny_builder_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, second = build_tiny_anima(seed=3), build_tiny_anima(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.dit.state_dict().values(), second.dit.state_dict().values()):
        assert torch.equal(a, b)
    other = build_tiny_anima(seed=4)
    assert not torch.equal(first.dit.blocks[0].mlp.layer1.weight, other.dit.blocks[0].mlp.layer1.weight)
    # zero-initialised heads are randomised so each block influences the output
    assert first.dit.blocks[0].adaln_modulation_mlp[2].weight.abs().sum() > 0


def test_config_rejects_sizes_that_cannot_work():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        AnimaConfig(model_channels=30, num_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        AnimaConfig(model_channels=16, num_heads=2)  # head_dim 8: RoPE parts 2/2/4 would divide by zero
    with pytest.raises(ValueError, match="positive"):
        AnimaConfig(num_blocks=0)
    with pytest.raises(ValueError, match="unknown AnimaConfig fields"):
        AnimaConfig.from_dict({"num_blocks": 2, "depth": 3})
