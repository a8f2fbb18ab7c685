"""LoRALinear vs its definition y = x W^T + b + (alpha/r) (x A^T) B^T; injection keeps checkpoint key names."""
import pytest
import torch
from torch import nn

from dopsd_fast.nn.lora_linear import LoRALinear, adapter_parameters, inject_lora, set_active_adapter

# (rtol, atol as a fraction of the reference's largest magnitude), vs an fp32 reference: bf16 keeps 8 bits.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}


def close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 13)])
def test_forward_and_backward_match_definition(dtype, shape):
    torch.manual_seed(0)
    base = nn.Linear(shape[-1], 11).to(dtype)
    lora = LoRALinear(base, ["student", "teacher"], rank=3, alpha=5.0)
    with torch.no_grad():
        for p in lora.lora_B.values():
            p.normal_()
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    lora.active_adapter = "student"
    y = lora(x)
    a, b = lora.lora_A["student"], lora.lora_B["student"]
    xr = x.detach().float().requires_grad_(True)
    ar, br = a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    ref = xr @ base.weight.float().T + base.bias.float() + (5.0 / 3) * (xr @ ar.T) @ br.T
    close(y, ref, dtype)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for got, want in [(x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)]:
        close(got, want, dtype)
    assert lora.lora_A["teacher"].grad is None, "the inactive adapter gets no gradient"


def test_inject_keeps_base_keys_and_adds_adapter_keys():
    model = nn.Sequential()
    model.add_module("attention", nn.Module())
    model.attention.to_q = nn.Linear(4, 4, bias=False)
    model.attention.norm = nn.LayerNorm(4)
    before = set(model.state_dict())
    assert inject_lora(model, ["attention.to_q"], ["student", "teacher"], 2, 4.0) == ["attention.to_q"]
    after = set(model.state_dict())
    assert before <= after
    assert after - before == {f"attention.to_q.lora_{m}.{n}" for m in "AB" for n in ("student", "teacher")}
    assert list(adapter_parameters(model, "student")) == ["attention.to_q.lora_A.student", "attention.to_q.lora_B.student"]
    set_active_adapter(model, None)
    assert model.attention.to_q.active_adapter is None


def test_inject_with_no_match_names_the_targets():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), ["feed_forward.w9"], ["student"], 2, 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_grad_equals_forward_with_grad(dtype):
    """Without grad the LoRA term is added in place into the base output (the teacher's forwards), with grad out of
    place: the same addmm, bit for bit, and repeated no-grad calls do not change each other's results."""
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(24, 40).to(dtype), ["student"], rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B["student"].normal_()
    x = torch.randn(3, 7, 24, dtype=dtype)
    with_grad = lora(x)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = lora(x)
        again = lora(x)
    assert torch.equal(without, with_grad.detach()) and torch.equal(again, without)
