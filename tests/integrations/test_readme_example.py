"""README's "Use the ops in your trainer" runs as written: its ```python blocks, in order, in one namespace, with a
tiny random diffusers Z-Image in place of ``from_pretrained`` (no hub weights in CI) and random caption features as
``c_s`` / ``c_t``. Both LoRA adapters start with B = 0, i.e. as the base model, so the example's losses must equal a
hand-written released loop (method.md section 3) on the unpatched base model; and the iteration must train: the
student's adapter moves, the teacher follows it by 1 - 0.9999."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dopsd_fast.testing import randomize_weights

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import ZImageTransformer2DModel  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = dict(in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


def section_blocks(title: str) -> list[str]:
    """The ```python blocks of the README section ``## title`` (up to the next ``## ``)."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def tiny_transformer() -> ZImageTransformer2DModel:
    return randomize_weights(ZImageTransformer2DModel(**TINY), seed=3, norm_spread=0.2, other_scale=0.5)


def released_loop_losses(model, x, c_s, c_t, sigmas) -> list[float]:
    """The released loop's arithmetic (Z-Image: t = 1 - sigma, x0 = x + sigma v, x += v (t_next - t))."""
    losses = []
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((len(x),), 1 - sigma)
            v_t = torch.stack(model(list(x.unbind(0)), t, c_t, return_dict=False)[0])
            v_s = torch.stack(model(list(x.unbind(0)), t, c_s, return_dict=False)[0])
            losses.append(float(F.mse_loss(x + sigma * v_s, x + sigma * v_t)))
            x = x + v_s * ((1 - sigma_next) - (1 - sigma))
    return losses


def test_readme_rollout_example_runs_and_computes_the_released_loop(monkeypatch):
    blocks = section_blocks("Use the ops in your trainer")
    assert len(blocks) == 2 and "apply_dopsd_kernels" in blocks[0] and "distill_rollout" in blocks[1]
    monkeypatch.setattr(ZImageTransformer2DModel, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: tiny_transformer()))
    g = torch.Generator().manual_seed(4)
    namespace = {"c_s": [torch.randn(12, TINY["cap_feat_dim"], generator=g)],
                 "c_t": [torch.randn(40, TINY["cap_feat_dim"], generator=g)]}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)

    transformer, losses = namespace["transformer"], namespace["losses"]
    assert namespace["handle"].blocks, "the example's model ran patched"
    want = released_loop_losses(tiny_transformer(), namespace["x"], namespace["c_s"], namespace["c_t"],
                                [1.0, 0.9, 0.75, 0.5, 0.0])
    # fp32. On CPU ops.rollout_step's reference sums a sample's 16,384 squares sequentially (index_add), mse_loss
    # pairwise: 1.7e-5 relative apart at the first step (same inputs); a wrong formula is off by percents
    assert losses.tolist() == pytest.approx(want, rel=1e-4)
    student, teacher = namespace["adapter"]["student"], namespace["adapter"]["teacher"]
    names = [n for n, _ in transformer.named_parameters() if ".student." in n]     # the order of adapter["student"]
    b = [i for i, n in enumerate(names) if ".lora_B." in n]
    assert b and all(student[i].abs().max() > 0 for i in b), "the optimizer step moved every lora_B from 0"
    for i in b:
        torch.testing.assert_close(teacher[i], (1 - 0.9999) * student[i], rtol=1e-5, atol=1e-12)
