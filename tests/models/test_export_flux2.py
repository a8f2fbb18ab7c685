"""A LoRA trained on our FLUX.2 [klein] transformer exports in the diffusers/PEFT format that Flux2KleinPipeline loads."""
import json
import os

import pytest
import torch
from safetensors import safe_open

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dopsd_fast.models.export import save_diffusers_lora  # noqa: E402
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer, ReferenceCondition  # noqa: E402
from dopsd_fast.nn.lora_linear import inject_lora, set_active_adapter  # noqa: E402

from test_flux2_klein import TINY, make, randomize_, reference  # noqa: E402  (same folder)

# the authors' double-block attention set plus the MLP / single-block option (method.md 7)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out"]


def test_lora_loads_into_flux2_klein_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    ours = Flux2KleinTransformer(Flux2KleinConfig(**TINY))
    randomize_(ours, seed=3)
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    replaced = inject_lora(ours, TARGETS, ["student"], 4, 8.0)
    assert len(replaced) == 2 * 12 + 2 * 2            # 2 double blocks x 12 linears + 2 single blocks x 2
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    path = save_diffusers_lora(ours, tmp_path / "lora")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and len(meta["transformer.target_modules"]) == len(replaced)

    theirs = Flux2Transformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    theirs.load_state_dict(base, strict=True)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=theirs.eval(), is_distilled=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))

    x, t, text, refs = make(9, [(16, 3, 4)], [6], [[(16, 2, 2)]])
    with torch.no_grad():
        set_active_adapter(ours, "student")
        want = ours(x, t, cap_feats=[ReferenceCondition(text[0], refs[0])])[0]
        set_active_adapter(ours, None)
        plain = ours(x, t, cap_feats=[ReferenceCondition(text[0], refs[0])])[0]
        got = reference(pipe.transformer, x[0], t[0], text[0], refs[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - plain).abs().max() > 1e-2                # the LoRA really changes the output
