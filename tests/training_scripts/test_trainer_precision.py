"""Every --mixed_precision / storage option end to end on the tiny models (train, sample, save, reload), and one
optimizer step's gradient in each precision against the float32 run."""

import copy
import functools
import json

import numpy as np
import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as sdxl_trainer
from accelerate.state import AcceleratorState, GradientState
from lyco_train.runner import Trainer
from lyco_train.synthetic import make_shapes_dataset

TRAINERS = {"sdxl": sdxl_trainer, "anima": anima_trainer}


def run(tmp_path, model, *extra, name="run", images=2):
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=images, size=64, repeats=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2 --d 1\n", encoding="utf-8")
    return TRAINERS[model].main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / name), "--sample_prompts", str(prompts),
         "--save_every_n_steps", "1000", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("model", [pytest.param("sdxl", marks=pytest.mark.slow), "anima"])
def test_fp16_on_cpu_trains_with_the_grad_scaler_samples_saves_and_reloads(tmp_path, model):
    """fp16 on CPU used to train without autocast or loss scaling, then crash sampling and reloading (Half vs float),
    losing the result. Now: autocast + GradScaler as on a GPU; the tiny run's own reload check compares the reloaded
    file with the in-memory model."""
    result = run(tmp_path, model, "--mixed_precision", "fp16", "--max_train_steps", "2", "--sample_every_n_steps",
                 "2", "--save_state", "--train_batch_size", "1")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [p.name for p in result.files if p.suffix == ".png"] == [f"tiny_{model}_lokr_000002_00.png"]
    assert result.final.is_file()
    state = json.loads((result.final.parent / f"tiny_{model}_lokr-state" / "training_state.json").read_text())
    scaler = state["grad_scaler"]
    assert scaler is not None and scaler["scale"] in (2.0**16, 2.0**15, 2.0**14)  # scaled (and maybe backed off)


@pytest.mark.parametrize("model", [pytest.param("sdxl", marks=pytest.mark.slow), "anima"])
@pytest.mark.parametrize(
    "options",
    [["--mixed_precision", "bf16"], ["--mixed_precision", "bf16", "--full_bf16", "--fp8_base"], ["--fp8_base"]],
    ids=["bf16", "full_bf16-fp8_base", "fp8_base-fp32"],
)
def test_other_precisions_train_sample_save_and_reload(tmp_path, model, options):
    result = run(tmp_path, model, *options, "--max_train_steps", "2", "--sample_every_n_steps", "2",
                 "--train_batch_size", "1")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.final.is_file()
    assert [p.name for p in result.files if p.suffix == ".png"] == [f"tiny_{model}_lokr_000002_00.png"]


def test_sdxl_samples_from_an_fp16_unet_decode_in_float32():
    """The SDXL part of the fp16 fix, fast: without autocast the pipeline handed fp16 latents to the float32 VAE (the
    crash: Half vs float); under autocast it would decode in fp16 (SDXL's VAE overflows). generate() denoises under
    the run's autocast and decodes in float32."""
    from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        model.to(torch.float16)
    decoded = []
    pipe.vae.decoder.conv_in.register_forward_hook(lambda module, args, out: decoded.append(out.dtype))
    kwargs = {"width": 32, "height": 32, "num_inference_steps": 1, "guidance_scale": 1.0, "output_type": "np"}
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="should be the same"):
            pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
        with torch.autocast("cpu", torch.float16):
            pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
            images = sdxl_trainer.generate(pipe, "a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
    assert decoded == [torch.float16, torch.float32]
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.float32 and np.isfinite(images).all()


# ------------------------------------------------------------------------ one step's gradient against float32
_REFERENCES: dict[str, dict[str, torch.Tensor]] = {}
STORED: dict = {}  # elements per stored parameter dtype, and the gradient dtypes, of the last run


def first_step_gradients(tmp_path, model, *extra) -> dict[str, torch.Tensor]:
    """The adapter gradient of the first optimizer step (unscaled, float64 copies), from the real trainer on one
    fixed image; the tiny run's closing reload check is skipped (it renders, and is tested elsewhere)."""
    captured = {}
    STORED.clear()
    original = Trainer._optimizer_step

    def capture(self):
        self.accelerator.unscale_gradients()
        for component, module in self.models.items():
            for name, parameter in self.accelerator.unwrap_model(module).named_parameters():
                STORED[parameter.dtype] = STORED.get(parameter.dtype, 0) + parameter.numel()
                if parameter.grad is not None:
                    captured[f"{component}.{name}"] = parameter.grad.detach().double().clone()
                    STORED[("grad", parameter.grad.dtype)] = True
        original(self)

    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=1, size=64, repeats=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", capture)
        patch.setattr(TRAINERS[model], "check_reload", lambda *args, **kwargs: None)
        # fp16's scaler starts at 2^16 and skips overflowing first steps; a smaller start keeps step 1
        patch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**6))
        TRAINERS[model].main(
            ["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
             "--train_batch_size", "1", "--max_grad_norm", "0", "--sample_every_n_steps", "1000",
             "--save_every_n_steps", "1000", "--no-network_train_unet_only", "--no-cache_text_encoder_outputs",
             *extra]
        )  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)  # a second run in the same test: fresh precision
    GradientState._reset_state()
    assert captured and all(torch.isfinite(g).all() for g in captured.values())
    return captured


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over every adapter tensor together."""
    assert got.keys() == want.keys()
    error = sum((got[k] - want[k]).pow(2).sum() for k in want).sqrt()
    return (error / sum(want[k].pow(2).sum() for k in want).sqrt()).item()


def reference_gradients(tmp_path_factory, model):
    if model not in _REFERENCES:
        _REFERENCES[model] = first_step_gradients(tmp_path_factory.mktemp(f"{model}_fp32"), model)
    return _REFERENCES[model]


PRECISION_CASES = [  # options, bound on the relative gradient error against the float32 run
    pytest.param(["--mixed_precision", "bf16"], 5e-2, id="bf16"),
    pytest.param(["--mixed_precision", "fp16"], 5e-3, id="fp16"),
    pytest.param(["--mixed_precision", "bf16", "--full_bf16"], 5e-2, id="full_bf16"),
    pytest.param(["--fp8_base"], 2e-1, id="fp8_base-fp32"),
    pytest.param(["--mixed_precision", "bf16", "--fp8_base"], 2e-1, id="fp8_base-bf16"),
]


def check_first_step(tmp_path, tmp_path_factory, model, options, bound):
    """The first step's gradients under ``options`` are within ``bound`` of the float32 run's, and the options
    stored what they say (``check_storage``)."""
    want = reference_gradients(tmp_path_factory, model)
    got = first_step_gradients(tmp_path, model, *options)
    error = relative_error(got, want)
    print(f"{model} {' '.join(options)}: relative gradient error vs fp32 {error:.3g}")
    assert error <= bound
    check_storage(options)


@pytest.mark.parametrize("options, bound", PRECISION_CASES)
def test_anima_first_step_gradient_in_each_precision_is_close_to_float32(tmp_path, tmp_path_factory, options, bound):
    check_first_step(tmp_path, tmp_path_factory, "anima", options, bound)


def check_storage(options):
    """The options did what they say: float8 base weights, bf16 adapter gradients."""
    fp8 = STORED.get(torch.float8_e4m3fn, 0)
    assert (fp8 > 0) == ("--fp8_base" in options)
    if "--fp8_base" in options:  # the Linear/Conv weights are the bulk of the frozen parameters
        frozen = sum(v for k, v in STORED.items() if isinstance(k, torch.dtype))
        assert fp8 > 0.5 * frozen
    grad_dtypes = {k[1] for k in STORED if isinstance(k, tuple)}
    assert grad_dtypes == ({torch.bfloat16} if "--full_bf16" in options else {torch.float32})


@pytest.mark.slow
@pytest.mark.parametrize("options, bound", PRECISION_CASES)
def test_sdxl_first_step_gradient_in_each_precision_is_close_to_float32(tmp_path, tmp_path_factory, options, bound):
    check_first_step(tmp_path, tmp_path_factory, "sdxl", options, bound)


# ------------------------------------------------------------------------------------ gradient checkpointing
def force_reentrant(checkpoint):
    """``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=True`` whatever the caller asked."""

    def reentrant(function, *args, **kwargs):
        kwargs["use_reentrant"] = True
        return checkpoint(function, *args, **kwargs)

    return reentrant


@pytest.mark.parametrize("model", ["anima", pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_unchecked_gradient(tmp_path, tmp_path_factory, monkeypatch, model, reentrant):
    """diffusers' enable_gradient_checkpointing (UNet), our DiT's, and transformers' (text encoders), with
    torch.utils.checkpoint reentrant or not: the first step's adapter gradient equals the run without."""
    if reentrant:
        import torch.utils.checkpoint

        from peft_lyco.models.anima import dit

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", force_reentrant(torch.utils.checkpoint.checkpoint))
        monkeypatch.setattr(dit, "checkpoint", force_reentrant(dit.checkpoint))
    want = reference_gradients(tmp_path_factory, model)
    got = first_step_gradients(tmp_path, model, "--gradient_checkpointing")
    error = relative_error(got, want)
    print(f"{model} checkpointing reentrant={reentrant}: relative gradient error vs unchecked {error:.3g}")
    assert error <= 1e-6


# ------------------------------------------------------------------------------------------------ torch.compile
def test_compiled_denoiser_keeps_parameter_names_and_outputs():
    """--torch_compile compiles in place: the adapter's parameter names (states, files) and the outputs stay."""
    from lyco_train.memory import compile_denoiser
    from peft import inject_adapter_in_model

    from peft_lyco import LoKrConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    inject_adapter_in_model(LoKrConfig(r=2, target_modules=["0", "2"]), model)
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(3, 8)
    eager = model(x)
    compile_denoiser(model, "eager")
    assert [name for name, _ in model.named_parameters()] == names
    assert torch.equal(model(x), eager)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["anima", "sdxl"])
def test_torch_compile_first_step_gradient_equals_eager(tmp_path, tmp_path_factory, model):
    want = reference_gradients(tmp_path_factory, model)
    got = first_step_gradients(tmp_path, model, "--torch_compile")
    error = relative_error(got, want)
    print(f"{model} --torch_compile (inductor): relative gradient error vs eager {error:.3g}")
    assert error <= 1e-5


# the options whose code runs inside the compiled denoiser (each traced in one graph, no break); --blocks_to_swap
# keeps the swapped blocks out of the graph on purpose (torch.compiler.disable: each swap replaces weight storage)
COMPILED_OPTIONS = [
    pytest.param("anima", ["--network_args", "module_dropout=0.1", "rank_dropout=0.1"], id="anima-dropouts"),
    pytest.param("anima", ["--network_args", "dora_wd=True", "module_dropout=0.1"], id="anima-dora"),
    pytest.param("anima", ["--algo", "loha", "--network_args", "use_scalar=True", "rs_lora=True"], id="anima-loha"),
    pytest.param("anima", ["--gradient_checkpointing", "--fp8_base"], id="anima-checkpointing-fp8"),
    pytest.param("anima", ["--mixed_precision", "bf16", "--full_bf16"], id="anima-full_bf16"),
    pytest.param("sdxl", ["--network_args", "module_dropout=0.1", "rank_dropout=0.1", "conv_dim=2"], id="sdxl"),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, options", COMPILED_OPTIONS)
def test_torch_compile_trains_without_graph_breaks(tmp_path, monkeypatch, model, options):
    """--torch_compile with the options that run inside the denoiser: dynamo traces it once, without a graph break
    (module dropout used to break it at every adapted layer: 22 breaks in the tiny Anima DiT)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(TRAINERS[model], "check_reload", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    counters.clear()
    result = run(tmp_path, model, "--torch_compile", "--dynamo_backend", "aot_eager", "--max_train_steps", "2",
                 "--train_batch_size", "1", *options)  # fmt: skip
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # bf16 Anima compiled twice: its RoPE tables changed dtype
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
        (["--full_bf16", "--mixed_precision", "fp16"], "--full_bf16 needs --mixed_precision bf16"),
        (["--torch_compile", "--dynamo_backend", "nope"], "--dynamo_backend 'nope' is not a torch.compile backend"),
    ],
)
def test_precision_options_that_cannot_work_are_refused_before_models_load(tmp_path, monkeypatch, argv, message):
    from lyco_train.args import UsageError

    monkeypatch.setattr(anima_trainer, "load_models", lambda *a: pytest.fail("model loaded before the check"))
    with pytest.raises(UsageError, match=message):
        run(tmp_path, "anima", *argv)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["sdxl", "anima"])
@pytest.mark.parametrize(
    "options",
    [["--mixed_precision", "fp16"], ["--mixed_precision", "bf16", "--fp8_base", "--full_bf16"], ["--torch_compile"]],
    ids=["fp16", "bf16-fp8-full", "compile"],
)
def test_precisions_end_to_end_on_cuda(tmp_path, model, options):
    """The tiny runs on the GPU (the trainers pick CUDA when present): train, sample, save, reload check."""
    result = run(tmp_path, model, *options, "--max_train_steps", "2", "--sample_every_n_steps", "2")
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.final.is_file()


def test_fp8_base_hands_adapted_bases_to_the_op_in_float8():
    """``--fp8_base``: an adapted layer's base stays a plain float8 weight, so the fused op upcasts it inside each call
    and autograd keeps no upcast copy of it; other layers read theirs through the upcasting parametrization. The
    output is the float32 network holding the same float8-rounded weights."""
    from lyco_train.memory import store_weights_in_fp8
    from peft import inject_adapter_in_model
    from torch.nn.utils import parametrize

    from peft_lyco import LoKrConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).requires_grad_(False)
    model = inject_adapter_in_model(LoKrConfig(r=2, alpha=1.0, target_modules=["0"], init_weights=False), model)
    reference = copy.deepcopy(model)
    assert store_weights_in_fp8(model, torch.float32) == 2
    adapted_base, plain = model[0].get_base_layer(), model[1]
    assert adapted_base.weight.dtype == torch.float8_e4m3fn and not parametrize.is_parametrized(adapted_base, "weight")
    assert parametrize.is_parametrized(plain, "weight")
    assert plain.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    for ours, theirs in ((adapted_base, reference[0].get_base_layer()), (plain, reference[1])):
        theirs.weight.data = theirs.weight.data.to(torch.float8_e4m3fn).float()

    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    x = torch.randn(3, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    out.sum().backward()
    assert (torch.float32, plain.weight.numel()) in saved  # the hook sees the parametrized layer's upcast copy
    assert (torch.float32, adapted_base.weight.numel()) not in saved  # but none of the adapted base
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
