"""fp32 trainable LoRA weights on a bf16 base: our explicit cast per forward vs torch.autocast (issue 16, item 1).

Both compute in bf16 and give the fp32 adapter the gradient of its bf16 copy; the bench times a LoRA linear's
forward + backward each way at the Z-Image projection shape (CUDA) or a small one (CPU) and asserts they agree.
nn/lora_linear.py casts explicitly: autocast would do the same casts (its cast cache lives for one autocast region)
and does not reach our custom ops.
"""
import pytest
import torch

from dopsd_fast.nn.lora_linear import LoRALinear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = (4096, 3840, 64) if CUDA else (256, 256, 16)     # rows, width, LoRA rank
ROUNDS = 20


def _layer() -> LoRALinear:
    rows, width, rank = SHAPE
    torch.manual_seed(0)
    base = torch.nn.Linear(width, width, bias=False, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, ["student"], rank, 2.0 * rank)
    with torch.no_grad():
        layer.lora_B["student"].normal_(0, 0.02)
    return layer


def _run(layer: LoRALinear, x: torch.Tensor, way: str) -> torch.Tensor:
    if way == "cast":
        y = layer(x)
    else:                  # autocast: the fp32 adapter's GEMMs run in bf16 inside the region (LoRALinear's formula)
        a, b = layer.lora_A["student"], layer.lora_B["student"]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = torch.addmm(torch.nn.functional.linear(x, layer.weight), torch.nn.functional.linear(x, a), b.t(),
                            alpha=layer.scale)
    y.float().square().mean().backward()
    return y


@pytest.mark.parametrize("way", ["cast", "autocast"])
def test_master_cast(benchmark, way):
    layer = _layer()
    x = torch.randn(SHAPE[0], SHAPE[1], device=DEVICE, dtype=torch.bfloat16)
    ref_layer = _layer()
    ref = _run(ref_layer, x, "cast")
    out = _run(layer, x, way)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)        # the same bf16 GEMMs either way
    for name in ("lora_A", "lora_B"):
        g, g_ref = getattr(layer, name)["student"].grad, getattr(ref_layer, name)["student"].grad
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=1e-2, atol=1e-6)   # bf16 products, accumulation order may differ

    def step():
        layer.zero_grad(set_to_none=True)
        _run(layer, x, way)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = "master_cast"
    benchmark.extra_info.update(shape=SHAPE, device=DEVICE)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
