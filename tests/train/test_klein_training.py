"""D-OPSD on a tiny FLUX.2 [klein]-architecture model: plans, the reference teacher, a CPU run, sampling."""
import contextlib
import io
import json

import pytest
import torch

from dopsd_fast.cli import main
from dopsd_fast.method.schedule import FLUX2, empirical_mu_sigmas
from dopsd_fast.method.step import dopsd_step
from dopsd_fast.models.flux2_klein import Flux2KleinTransformer, ReferenceCondition
from dopsd_fast.train.build import resolve_plan
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.trainer import make_trainer


def klein_trainer(tmp_path, *overrides):
    cfg = load_config("tiny-klein-cpu", [f"train.output_dir={tmp_path}", "train.resume=null", *overrides])
    return make_trainer(cfg, progress=False)


@pytest.mark.parametrize("preset, params, trainable, modules", [
    ("flux2-klein-4b-lora", 3_875_544_576, 15_728_640, 40), ("flux2-klein-9b-lora", 9_078_581_248, 33_554_432, 64)])
def test_official_presets_plan_before_download(preset, params, trainable, modules):
    """method.md 7: the authors' effective targets are the double-block attention projections only."""
    plan = resolve_plan(load_config(preset), need_weights=False)
    assert (plan.total_params, plan.trainable_params, plan.lora_modules) == (params, trainable, modules)
    assert plan.sigmas == pytest.approx([1.0, 0.96738, 0.90814, 0.76720, 0.0], abs=1e-5)   # 1024^2, K = 4
    everything = ["adapter.targets=[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj, "
                  "attn.add_v_proj, attn.to_add_out, ff.linear_in, ff.linear_out, ff_context.linear_in, "
                  "ff_context.linear_out, attn.to_qkv_mlp_proj, attn.to_out]"]
    wide = resolve_plan(load_config(preset, everything), need_weights=False)
    assert wide.lora_modules == modules + (4 * modules // 8) + 2 * (20 if "4b" in preset else 24)


def test_family_specific_config_errors():
    with pytest.raises(ConfigError, match="context.teacher: reference needs"):
        load_config("tiny-cpu", ["context.teacher=reference"])
    with pytest.raises(ConfigError, match="model.arch.in_channels: .*3 \\* p\\^2"):
        resolve_plan(load_config("tiny-klein-cpu", ["model.arch.in_channels=16"]))
    with pytest.raises(ConfigError, match="model.arch.num_layers: expected a positive integer"):
        resolve_plan(load_config("tiny-klein-cpu", ["model.arch.num_layers=-1"]))
    with pytest.raises(ConfigError, match="unknown Flux2KleinConfig keys"):
        resolve_plan(load_config("tiny-klein-cpu", ["model.arch.dim=8"]))


def test_reference_teacher_context_and_schedule(tmp_path):
    tr = klein_trainer(tmp_path)
    assert tr.flow is FLUX2 and isinstance(tr.model, Flux2KleinTransformer)
    assert tr.sigmas == empirical_mu_sigmas(64, 4)           # 32^2 pixels in 4 x 4 patches: 64 target tokens
    pair = tr.dataset[0]
    prompt = pair.captions[1]
    (c_s,), (c_t,) = tr.text_encoder([prompt]), tr.mm_encoder([prompt], [pair.image])
    assert isinstance(c_t, ReferenceCondition) and len(c_t.refs) == 1
    torch.testing.assert_close(tr.codec.decode(c_t.refs[0]), pair.image)     # the clean target, losslessly
    # the student prompt is a token prefix of the teacher's: its feature rows are the teacher's first rows
    assert len(c_t.text) > len(c_s)
    torch.testing.assert_close(c_t.text[: len(c_s)], c_s, rtol=0, atol=0)
    x = [torch.randn(tr.codec.latent_shape(32, 32))]
    with torch.no_grad():
        out = tr.model(x, torch.tensor([0.5]), cap_feats=[c_t])[0]
    assert out.shape == x[0].shape                           # sliced back to the target tokens


def eval_loss(tr) -> float:
    """D-OPSD loss over every pair with fixed noise (a deterministic probe; gradients are thrown away)."""
    total = 0.0
    for i in range(len(tr.dataset)):
        pair = tr.dataset[i]
        prompt = [pair.captions[1]]
        shape = [tr.codec.latent_shape(*pair.image.shape[-2:])]
        total += dopsd_step(tr.roles, tr.flow, tr.text_encoder(prompt), tr.mm_encoder(prompt, [pair.image]), shape,
                            tr.sigmas, generator=torch.Generator().manual_seed(i)).loss
    tr.optimizer.zero_grad(set_to_none=True)
    return total / len(tr.dataset)


def test_klein_dopsd_loss_falls_and_samples(tmp_path, capsys):
    tr = klein_trainer(tmp_path, "train.steps=60", "train.checkpoint_every=60")
    before = eval_loss(tr)
    with contextlib.redirect_stdout(io.StringIO()):
        results = tr.train()
    after = eval_loss(tr)
    assert all(torch.isfinite(torch.tensor(r.loss)) and r.flops > 0 for r in results)
    assert after < 0.6 * before, f"klein D-OPSD loss did not fall: {before:.3g} -> {after:.3g}"
    out = tmp_path / "grid.png"
    assert main(["sample", str(tmp_path), "--prompt", "a red circle", "--steps", "4", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["steps"] == 4 and report["checkpoint"].endswith("step-000060")
