"""models/checkpointing.py: every mode gives full checkpointing's outputs and gradients bit for bit (fp32, both
families, full weights and LoRA), selective reruns no GEMM or attention, and
auto measures every block on its first forward and leaves unchecked as many blocks as the budget holds."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dopsd_fast.method.roles import LoRARoles
from dopsd_fast.models.checkpointing import GEMMS, KEPT, CheckpointPlan
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.nn.lora_linear import quantize_base
from dopsd_fast.ops._dispatch import use_backend

# Z-Image: 1 context refiner, 1 noise refiner, 3 layers = blocks 0-4; klein: 2 double + 2 single = blocks 0-3.
# Widths >= 64 so that a rank-3 adapter is low rank to selective's policy (rank x 16 < width), as at real sizes.
ZIMAGE = ZImageConfig(in_channels=4, dim=64, n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                      axes_dims=(8, 12, 12), axes_lens=(256, 32, 32))
KLEIN = Flux2KleinConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=4, joint_attention_dim=24, timestep_guidance_channels=256, mlp_ratio=3.0,
                         axes_dims_rope=(4, 4, 4, 4))
TARGETS = {"z_image": ["attention.to_q", "attention.to_v", "feed_forward.w1", "feed_forward.w2"],
           "flux2_klein": ["attn.to_q", "attn.add_v_proj", "attn.to_qkv_mlp_proj", "ff.linear_out"]}


def build(family: str, lora: bool):
    """A tiny model with random weights (adapters too): its roles with LoRA, else every weight trainable."""
    torch.manual_seed(0)
    model = ZImageTransformer(ZIMAGE) if family == "z_image" else Flux2KleinTransformer(KLEIN)
    roles = LoRARoles(model, TARGETS[family], rank=3, alpha=5.0) if lora else None
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model, roles


def inputs(family: str):
    g = torch.Generator().manual_seed(2)
    if family == "z_image":
        x = [torch.randn(4, 1, h, w, generator=g) for h, w in [(6, 8), (4, 6)]]
        feats = [torch.randn(n, 16, generator=g) for n in (5, 40)]
    else:
        x = [torch.randn(16, h, w, generator=g) for h, w in [(3, 5), (2, 3)]]
        feats = [torch.randn(n, 24, generator=g) for n in (5, 9)]
    return x, torch.tensor([0.3, 0.6]), feats


def forward_backward(model, family, plan):
    """Outputs and every gradient after one backward of a fixed non-uniform cotangent under ``plan`` (LoRA: the
    student adapter, active after LoRARoles)."""
    model.checkpointing = plan
    model.zero_grad(set_to_none=True)
    x, t, feats = inputs(family)
    out = model(x, t, cap_feats=feats)
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def assert_bitwise(got, want):
    (out, grads), (out_ref, grads_ref) = got, want
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(grads) == set(grads_ref) and grads
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full_weights", "lora"])
@pytest.mark.parametrize("family", ["z_image", "flux2_klein"])
def test_every_mode_equals_full_checkpointing(family, lora):
    model, _ = build(family, lora)
    full = forward_backward(model, family, CheckpointPlan("full"))
    for mode in ("none", "selective"):
        assert_bitwise(forward_backward(model, family, CheckpointPlan(mode)), full)
    auto = CheckpointPlan("auto", budget=2**40)
    assert_bitwise(forward_backward(model, family, auto), full)        # measuring: fully checkpointed
    every_other = frozenset(range(0, len(auto.blocks), 2))
    half = CheckpointPlan("auto", budget=2**40, checkpointed=every_other, blocks=auto.blocks)
    assert_bitwise(forward_backward(model, family, half), full)        # every other block checkpointed


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def backward_calls(model, family, mode) -> collections.Counter:
    """Ops the backward runs (a recompute included); the forward outside the counter."""
    model.checkpointing = CheckpointPlan(mode)
    x, t, feats = inputs(family)
    loss = sum(o.square().sum() for o in model(x, t, cap_feats=feats))     # LoRA: each linear with its active adapter
    with OpCounter() as counter:
        loss.backward()
    return counter.calls


@pytest.mark.parametrize("lora", [False, True], ids=["full_weights", "lora"])
@pytest.mark.parametrize("family", ["z_image", "flux2_klein"])
def test_selective_reruns_no_full_gemm_or_attention(family, lora):
    """Selective's backward runs the GEMMs and attentions of no checkpointing's (the gradient ones) plus, with LoRA,
    each adapter's low-rank up-projection; full's reruns every forward GEMM; both rerun the norms (every block's
    RMSNorms)."""
    model, roles = build(family, lora)
    none, selective, full = (backward_calls(model, family, mode) for mode in ("none", "selective", "full"))
    # every adapted linear runs once, with grad: its up-projection is the addmm that adds it into the base output
    rerun_up_projections = len(roles.targets) if lora else 0
    addmm = torch.ops.aten.addmm.default
    assert selective[addmm] == none[addmm] + rerun_up_projections
    for op in [*GEMMS, *KEPT]:
        assert selective[op] == none[op] or op is addmm, op
    assert sum(full[op] for op in GEMMS) > sum(selective[op] for op in GEMMS)
    rsqrt = torch.ops.aten.rsqrt.default        # every RMSNorm's (the reference epilogues run as aten ops in eager)
    assert selective[rsqrt] == full[rsqrt] > none[rsqrt]


@pytest.mark.fused
def test_selective_saves_our_attention_op():
    """Under the Triton ops (interpreter) attention is dopsd::packed_attention: saved by selective, not rerun."""
    model, _ = build("z_image", lora=False)
    with use_backend("triton"):
        full = forward_backward(model, "z_image", CheckpointPlan("full"))
        assert_bitwise(forward_backward(model, "z_image", CheckpointPlan("selective")), full)
        none, selective, full = (backward_calls(model, "z_image", mode) for mode in ("none", "selective", "full"))
    attention = torch.ops.dopsd.packed_attention.default
    assert full[attention] > selective[attention] == none[attention] == 0


def test_auto_measures_every_block_once():
    model, _ = build("z_image", lora=False)
    plan = CheckpointPlan("auto", budget=2**40)
    forward_backward(model, "z_image", plan)
    assert plan.measuring and set(plan.blocks) == set(range(5))
    assert all(b.saved > 0 and b.inputs > 0 for b in plan.blocks.values())
    layers = [plan.blocks[i] for i in (2, 3, 4)]       # one stack, one shape: one size
    assert layers[0] == layers[1] == layers[2]
    measured = dict(plan.blocks)
    forward_backward(model, "z_image", plan)     # later forwards do not measure again
    assert plan.blocks == measured


def test_fit_keeps_as_many_blocks_as_the_budget_holds():
    model, _ = build("z_image", lora=False)
    plan = CheckpointPlan("auto", budget=1)
    forward_backward(model, "z_image", plan)
    resident = 10**6
    by_size = sorted(plan.blocks, key=lambda i: (plan.blocks[i].saved, i))
    saved = [plan.blocks[i].saved for i in by_size]
    floor = resident + sum(b.inputs for b in plan.blocks.values())
    for kept in range(len(saved) - 1):   # (all but one kept costs what all kept does: the largest one's recompute)
        # exactly `kept` blocks unchecked, plus the largest checkpointed one's recompute in the backward
        budget = floor + sum(saved[:kept]) + max(saved[kept:])
        fitted = CheckpointPlan("auto", budget=budget, blocks=plan.blocks).fit(resident)
        assert fitted.checkpointed == frozenset(by_size[kept:]) and fitted.need == budget
        tighter = CheckpointPlan("auto", budget=budget - 1, blocks=plan.blocks).fit(resident)
        assert len(tighter.checkpointed) == len(by_size) - max(kept - 1, 0)
        assert (tighter.need > tighter.budget) == (kept == 0)
    generous = CheckpointPlan("auto", budget=2**40, blocks=plan.blocks).fit(resident)
    assert generous.checkpointed == frozenset() and not generous.measuring
    assert "0 of 5 blocks checkpointed" in generous.describe()
    tiny = CheckpointPlan("auto", budget=1, blocks=plan.blocks).fit(resident)
    assert tiny.checkpointed == frozenset(range(5))
    assert "5 of 5 blocks checkpointed" in tiny.describe() and "does not fit" in tiny.describe()
    # K graphs alive (no per-step backward) need K times the activations
    assert len(CheckpointPlan("auto", budget=floor + sum(saved), blocks=plan.blocks).fit(resident, 4).checkpointed) > 0


def test_plan_refuses_unknown_modes_and_auto_without_budget():
    with pytest.raises(ValueError, match="not one of"):
        CheckpointPlan("some")
    with pytest.raises(ValueError, match="needs a memory budget"):
        CheckpointPlan("auto")


def test_fp8_base_every_mode_equals_full_checkpointing():
    """model.base_precision=fp8 (the CPU emulation): a recomputed forward quantises its activations alike."""
    model, _ = build("z_image", lora=True)
    assert quantize_base(model) > 0
    full = forward_backward(model, "z_image", CheckpointPlan("full"))
    for mode in ("none", "selective"):
        assert_bitwise(forward_backward(model, "z_image", CheckpointPlan(mode)), full)
