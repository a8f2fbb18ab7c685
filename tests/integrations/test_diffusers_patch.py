"""apply_dopsd_kernels on diffusers' own ZImageTransformer2DModel and Flux2Transformer2DModel: the patched model
equals the unpatched one (forward and every parameter / LoRA gradient), with and without PEFT adapters and gradient
checkpointing, on the reference, Triton (interpreter, tests/conftest.py) and cpp backends; state-dict keys
unchanged; remove() restores bitwise-identical outputs; torch.compile of the patched model. Tiny configs, random
weights at a realistic scale, a batch of 2 (Z-Image: unequal caption lengths, so the main layers get a key-padding
mask and per-sample modulation; FLUX.2: per-sample modulation of both streams and the single stream)."""
import contextlib
import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from dopsd_fast.models.flux2_klein import grid_positions, text_positions
from dopsd_fast.models.z_image import ZImageConfig
from dopsd_fast.ops._dispatch import NATIVE_OPS, use_backend
from dopsd_fast.testing import module_from_file, randomize_weights

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from dopsd_fast.integrations.diffusers import TESTED_DIFFUSERS, apply_dopsd_kernels  # noqa: E402

TINY = ZImageConfig(in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                    axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
TINY_KLEIN = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=[4, 4, 4, 4], rope_theta=2000, eps=1e-6, guidance_embeds=False)
# every Linear of the blocks and the modulation that feeds them (Z-Image's final-layer adaLN_modulation.0 is a SiLU;
# FLUX.2's double-block to_out is a ModuleList, its single-block to_out a Linear)
TARGETS = {
    "z_image": r".*(to_q|to_k|to_v|to_out\.0|w1|w2|w3|(layers|noise_refiner)\.\d+\.adaLN_modulation\.0)$",
    "flux2": r".*(to_q|to_k|to_v|to_out\.0|single_transformer_blocks\.\d+\.attn\.to_out|add_[qkv]_proj|to_add_out"
             r"|to_qkv_mlp_proj|linear_in|linear_out|modulation_img\.linear|modulation_txt\.linear"
             r"|single_stream_modulation\.linear)$",
}
OPS = {"z_image": {"modulated_rms_norm", "gated_residual", "qk_norm_rope"},
       "flux2": {"modulated_layer_norm", "qk_norm_rope"}}
FP32 = dict(rtol=1e-5, atol=1e-5)
BASELINE = Path(__file__).resolve().parents[2] / "bench" / "baselines" / "released_loop.py"


def diffusers_transformer(family: str = "z_image"):
    """Z-Image: bench/baselines/released_loop.py's tiny diffusers model (bench/ is not a package: loaded from its
    file); FLUX.2: tests/models/test_flux2_klein.py's tiny config."""
    if family == "flux2":
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

        return Flux2Transformer2DModel(**TINY_KLEIN)
    return module_from_file(BASELINE).diffusers_transformer(TINY)


def add_lora(model: torch.nn.Module, family: str) -> torch.nn.Module:
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS[family]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():    # lora_B starts at zero: make it non-zero so lora_A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def forward(model, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.3, 0.8])
    if "Flux2" in type(getattr(model, "_orig_mod", model)).__name__:
        x = torch.randn(2, 12, 16, generator=g).to(dtype)                       # a 3 x 4 latent grid per sample
        txt = torch.randn(2, 7, TINY_KLEIN["joint_attention_dim"], generator=g).to(dtype)
        return [model(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=grid_positions(3, 4),
                      txt_ids=text_positions(7), return_dict=False)[0]]
    x = [torch.randn(16, 1, 8, 8, generator=g).to(dtype) for _ in range(2)]           # 16 image tokens each
    caps = [torch.randn(n, TINY.cap_feat_dim, generator=g).to(dtype) for n in (5, 40)]  # padded to 32 and 64
    return model(x, t, caps, return_dict=False)[0]


def run(model, dtype=torch.float32):
    """Outputs and the gradient of every trainable parameter for a fixed random projection of the outputs."""
    for p in model.parameters():
        p.grad = None
    out = forward(model, dtype)
    g = torch.Generator().manual_seed(3)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in out)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad}     # a torch.compile wrapper's names, as the model's
    assert grads and all(v is not None for v in grads.values())
    return [o.detach() for o in out], grads


def assert_close(a, b, rtol: float, atol: float):
    """Outputs elementwise; gradients with atol relative to the tensor's largest entry: a weight gradient sums
    over every token, and where those terms cancel an entry carries the rounding of the large ones (observed: one
    entry of 16384 of an adaLN weight gradient off by 2.2e-5 at magnitude 1, in a tensor reaching 11)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    for oa, ob in zip(out_a, out_b):
        torch.testing.assert_close(oa, ob, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = max(float(grads_b[name].abs().max()), 1.0)
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name}: {m}")


def spy_backends(monkeypatch) -> set:
    """Records (op, backend) of every op call that goes through the dispatcher."""
    import dopsd_fast.ops.epilogues as epilogues
    import dopsd_fast.ops.packed_attention as attention
    from dopsd_fast.ops._dispatch import backend_for

    ran = set()

    def spy(op, *tensors):
        chosen = backend_for(op, *tensors)
        ran.add((op, chosen))
        return chosen

    for module in (epilogues, attention):
        monkeypatch.setattr(module, "backend_for", spy)
    return ran


@pytest.fixture(scope="module")
def models():
    """family -> (base model, base model + a random LoRA adapter), built once."""
    built = {}
    for family in ("z_image", "flux2"):
        base = randomize_weights(diffusers_transformer(family), norm_spread=0.2, other_scale=0.5)
        built[family] = base, add_lora(copy.deepcopy(base), family)
    return built


@pytest.fixture(scope="module")
def base(models):
    return models["z_image"][0]


CASES = list(itertools.product(["z_image", "flux2"], ["reference", "triton", "cpp"], ["sdpa", "dopsd"],
                               [False, True], [False, True]))


@pytest.mark.fused
@pytest.mark.parametrize("family,backend,attention,use_lora,checkpointing", CASES,
                         ids=["-".join([f, b, a, "lora" if l else "full", "ckpt" if c else "nockpt"])
                              for f, b, a, l, c in CASES])
def test_patched_equals_unpatched_fp32(models, family, backend, attention, use_lora, checkpointing, monkeypatch):
    model = models[family][use_lora]
    ran = spy_backends(monkeypatch)
    model.gradient_checkpointing = False
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        keys = list(model.state_dict())
        expected = run(model)
        with use_backend(backend):
            handle = apply_dopsd_kernels(model, attention=attention)
            try:
                got = run(model)
            finally:
                handle.remove()
        assert list(model.state_dict()) == keys
        # our ops ran, on the backend asked for (an op without a cpp kernel keeps its auto choice under cpp)
        assert {op for op, b in ran if b == backend or (backend == "cpp" and op not in NATIVE_OPS)} >= OPS[family]
        assert ("packed_attention" in {op for op, _ in ran}) == (attention == "dopsd")
        if use_lora:
            assert any("lora_A" in n for n in got[1]) and all("lora_" in n for n in got[1])
        assert_close(got, expected, **FP32)
        restored = run(model)
        for a, b in zip(restored[0], expected[0]):
            assert torch.equal(a, b)      # remove() gives back diffusers' own forward: bitwise
    finally:
        model.disable_gradient_checkpointing()


@pytest.mark.fused
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
@pytest.mark.parametrize("family", ["z_image", "flux2"])
def test_bf16_within_twice_diffusers_error(models, family, mode, backend):
    """bf16 (a bf16 model, or fp32 weights under CPU bf16 autocast): our kernels keep fp32 inside and round once where
    diffusers rounds after every elementwise op (1 + scale, tanh(gate), the products and the residual add, in bf16),
    so the two do not agree to fp32 tolerances. Judged like flash-attention's tests, against the fp32 model: the
    patched model's output error, and its error over all gradients together, are at most 2x diffusers' own bf16
    error; each gradient tensor alone at most 3x (a max over ~60 tensors of one seed: observed worst 1.03 to 2.4,
    highest for the Triton / cpp backends, e.g. the Z-Image context refiner's to_q / to_k / norm_q / norm_k under
    autocast, 0.08 relative where diffusers has 0.035); each error has a floor of 1e-3 relative."""
    base = models[family][0]
    truth = run(base)
    if mode == "autocast":
        model, dtype, context = copy.deepcopy(base), torch.float32, torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        model, dtype, context = copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16, contextlib.nullcontext()
    with context:
        theirs = run(model, dtype)
        # our attention too on the Triton backend (its kernel; the other backends run SDPA either way)
        with apply_dopsd_kernels(model, attention="dopsd" if backend == "triton" else "sdpa"), use_backend(backend):
            ours = run(model, dtype)

    def err(a: list, b: list) -> float:
        diff = sum(float((x.float() - y.float()).norm()) ** 2 for x, y in zip(a, b))
        return max(math.sqrt(diff / sum(float(y.float().norm()) ** 2 for y in b)), 1e-3)

    names = list(truth[1])
    grads = [[side[1][n] for n in names] for side in (ours, theirs, truth)]
    output = err(ours[0], truth[0]) / err(theirs[0], truth[0])
    overall = err(grads[0], grads[2]) / err(grads[1], grads[2])
    per_tensor = {n: err([o], [t]) / err([d], [t]) for n, o, d, t in zip(names, *grads)}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"{family} {mode} {backend}: error / diffusers' bf16 error: output {output:.2f}, gradients {overall:.2f}, "
          f"worst tensor {per_tensor[worst]:.2f} ({worst})")
    assert output <= 2.0 and overall <= 2.0 and per_tensor[worst] <= 3.0


def test_refuses_unknown_models_and_versions(base, monkeypatch):
    import diffusers

    with pytest.raises(ValueError, match="ZImageTransformer2DModel, Flux2Transformer2DModel"):
        apply_dopsd_kernels(torch.nn.Linear(2, 2))
    monkeypatch.setattr(diffusers, "__version__", "0.30.0")
    with pytest.raises(ValueError, match=f">={TESTED_DIFFUSERS[0]}"):
        apply_dopsd_kernels(base)
    apply_dopsd_kernels(base, allow_untested_version=True).remove()
    monkeypatch.undo()
    with apply_dopsd_kernels(base):
        with pytest.raises(ValueError, match="already patched"):
            apply_dopsd_kernels(base)
    assert all("forward" not in m.__dict__ for m in base.modules())


def test_omni_per_token_modulation_block(base):
    """Omni mode's per-token modulation (noise_mask: noisy / clean rows) maps onto our ops' sample_index."""
    block = copy.deepcopy(base.layers[0])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, TINY.dim, generator=g)
    freqs = torch.polar(torch.ones(2, 40, 16), torch.randn(2, 40, 16, generator=g))
    noise_mask = (torch.rand(2, 40, generator=g) > 0.5).long()
    t_noisy, t_clean = (torch.randn(2, min(TINY.dim, 256), generator=g) for _ in range(2))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 33:] = False
    expected = block(x, mask, freqs, None, noise_mask, t_noisy, t_clean)
    for attention in ("sdpa", "dopsd"):
        from dopsd_fast.integrations.diffusers import _CosSin, _bind, _zimage_block_forward

        block.forward = _bind(_zimage_block_forward, block, rope=_CosSin(), attention=attention, epilogues=True)
        got = block(x, mask, freqs, None, noise_mask, t_noisy, t_clean)
        del block.forward
        torch.testing.assert_close(got[0], expected[0], **FP32)
        torch.testing.assert_close(got[1, :33], expected[1, :33], **FP32)   # rows past the mask: never read


@pytest.mark.parametrize("family", ["z_image", pytest.param("flux2", marks=pytest.mark.compile)])
def test_torch_compile_of_patched_model(models, family, monkeypatch):
    """The patched model compiles as one graph (fullgraph, Inductor C++ on CPU) with our ops as opaque custom ops, and
    equals the eager unpatched model (1e-4: Inductor fuses and reorders fp32 arithmetic of its own). Z-Image ~8 s;
    FLUX.2 ~37 s of Inductor compile on 2 CPU cores (marked `compile`)."""
    torch._dynamo.reset()
    model = copy.deepcopy(models[family][0])
    expected = run(model)
    ran = spy_backends(monkeypatch)
    with apply_dopsd_kernels(model):
        got = run(torch.compile(model, fullgraph=True))
    assert OPS[family] <= {op for op, _ in ran}
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["z_image", "flux2"])
def test_attention_only_patch(models, family, monkeypatch):
    """epilogues=False keeps diffusers' norm / modulation / RoPE maths and swaps the attention alone."""
    model = models[family][1]
    expected = run(model)
    ran = spy_backends(monkeypatch)
    with apply_dopsd_kernels(model, attention="dopsd", epilogues=False):
        got = run(model)
    assert {op for op, _ in ran} <= {"packed_attention", "packed_attention_lse"} and ran
    assert_close(got, expected, **FP32)


def test_lora_loaded_into_patched_model(models):
    """A LoRA saved from a PEFT-adapted model loads into a patched one (load_lora_adapter, the transformer side of
    load_lora_weights) by its unchanged module names, and gives what the same load into the unpatched model gives."""
    from peft.utils import get_peft_model_state_dict

    base, adapted = models["z_image"]
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(adapted).items()}
    outputs = []
    for patched in (False, True):
        model = copy.deepcopy(base)
        handle = apply_dopsd_kernels(model) if patched else None
        model.load_lora_adapter(lora, adapter_name="loaded")
        assert sum("lora_A.loaded" in k for k in model.state_dict()) == len(lora) // 2
        with torch.no_grad():
            outputs.append(forward(model, torch.float32))
        if handle is not None:
            handle.remove()
    with torch.no_grad():
        plain = forward(base, torch.float32)
    assert not torch.allclose(outputs[0][0], plain[0])          # the adapter is active
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, **FP32)


def test_deepcopy_of_patched_model_runs_its_own_weights(base):
    """An EMA-style deepcopy of a patched model stays patched and computes with the copy's parameters."""
    model = copy.deepcopy(base)
    with apply_dopsd_kernels(model):
        clone = copy.deepcopy(model)
        assert clone.layers[0].forward.__self__ is clone.layers[0]
        with torch.no_grad():
            before = forward(model, torch.float32)
            clone.layers[0].attention.to_v.weight.mul_(2.0)
            after = forward(model, torch.float32)
            changed = forward(clone, torch.float32)
    for a, b, c in zip(before, after, changed):
        assert torch.equal(a, b) and not torch.allclose(a, c)
