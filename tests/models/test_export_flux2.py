"""A LoRA trained on our FLUX.2 [klein] transformer exports in each format: diffusers/PEFT (Flux2KleinPipeline
loads it), full weights (diffusers' Flux2Transformer2DModel loads them) and ComfyUI (the BFL names of ComfyUI's
FLUX.2 model, which our BFL loader maps back)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from dopsd_fast.models.export import (merged_state_dict, save_comfyui_lora, save_diffusers_lora,  # noqa: E402
                                      save_full_weights)
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer, ReferenceCondition  # noqa: E402
from dopsd_fast.models.loading_flux2 import load_flux2_klein_transformer  # noqa: E402
from dopsd_fast.nn.lora_linear import inject_lora, set_active_adapter  # noqa: E402

from test_flux2_klein import TINY, make, randomize_, reference  # noqa: E402  (same folder)
from test_loading_flux2 import to_bfl  # noqa: E402

# the authors' double-block attention set plus the MLP / single-block option (method.md 7)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out"]
# every nn.Linear: embedders, time MLP, the three modulations and norm_out (BFL rows shift | scale), proj_out
EVERY_LINEAR = TARGETS + ["x_embedder", "context_embedder", "linear_1", "linear_2", "linear", "proj_out"]
COMFY = "diffusion_model."


def lora_model(targets: list[str], seed: int = 3) -> Flux2KleinTransformer:
    """Random base weights and a random (non-zero) student LoRA on ``targets``, as after training."""
    model = Flux2KleinTransformer(Flux2KleinConfig(**TINY))
    randomize_(model, seed)
    inject_lora(model, targets, ["student"], 4, 8.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def student_output(model, seed=9):
    x, t, text, _ = make(seed, [(16, 3, 4)], [6])
    set_active_adapter(model, "student")
    with torch.no_grad():
        return model(x, t, cap_feats=text)[0]


def apply_comfy_lora(bfl: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI does with a lora_down/lora_up/alpha file: W += alpha / rank * up @ down for each module, whose
    ``diffusion_model.<name>.weight`` must be a tensor of its FLUX.2 model (= the BFL names)."""
    modules = {k[len(COMFY):].removesuffix(".alpha") for k in lora if k.endswith(".alpha")}
    leaves = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(lora) == {f"{COMFY}{m}.{leaf}" for m in modules for leaf in leaves}
    out = dict(bfl)
    for m in modules:
        assert f"{m}.weight" in bfl, f"{m}: not a module of ComfyUI's FLUX.2 model"
        down, up, alpha = (lora[f"{COMFY}{m}.{leaf}"] for leaf in leaves)
        out[f"{m}.weight"] = bfl[f"{m}.weight"] + alpha / down.shape[0] * up @ down
    return out


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


@pytest.mark.parametrize("targets", [EVERY_LINEAR, ["attn.to_q", "attn.to_v", "attn.add_k_proj"]],
                         ids=["every_linear", "qkv_parts"])
def test_comfyui_lora_has_bfl_names_and_the_same_update(tmp_path, targets):
    """ComfyUI applies the file to the BFL weights; our BFL loader maps them back to the student's model."""
    ours = lora_model(targets)
    lora = load_file(str(save_comfyui_lora(ours, tmp_path / "comfy.safetensors")))
    assert f"{COMFY}double_blocks.0.img_attn.qkv.lora_down.weight" in lora
    assert not any("transformer_blocks" in k for k in lora)
    if targets is EVERY_LINEAR:
        assert not any(type(m) is nn.Linear for m in ours.modules())
        assert {f"{COMFY}single_blocks.1.linear1.alpha", f"{COMFY}final_layer.adaLN_modulation.1.alpha",
                f"{COMFY}double_blocks.1.txt_attn.qkv.alpha", f"{COMFY}img_in.alpha"} <= set(lora)
    merged = apply_comfy_lora(to_bfl(merged_state_dict(ours, adapter=None)), lora)
    save_file(merged, str(tmp_path / "flux-2-klein-merged.safetensors"))
    theirs = load_flux2_klein_transformer(tmp_path / "flux-2-klein-merged.safetensors").eval()
    torch.testing.assert_close(student_output(theirs), student_output(ours), rtol=1e-4, atol=1e-4)


def test_full_weights_load_as_flux2_transformer(tmp_path):
    from diffusers import AutoModel, Flux2Transformer2DModel

    ours = lora_model(EVERY_LINEAR)
    out = save_full_weights(ours, tmp_path / "transformer")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "Flux2Transformer2DModel"
    theirs = AutoModel.from_pretrained(str(out)).eval()   # picks the class from _class_name
    assert isinstance(theirs, Flux2Transformer2DModel)
    x, t, text, _ = make(9, [(16, 3, 4)], [6])
    with torch.no_grad():
        torch.testing.assert_close(reference(theirs, x[0], t[0], text[0]), student_output(ours), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student_output(load_flux2_klein_transformer(out)), student_output(ours),
                               rtol=1e-4, atol=1e-4)


def test_dopsd_export_cli_klein(tmp_path):
    """A tiny-klein-cpu run exported in the three formats, each loaded where it is meant to be used."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    from dopsd_fast.cli import main

    run = tmp_path / "run"
    out_dir = f"train.output_dir={json.dumps(str(run))}"
    assert main(["train", "tiny-klein-cpu", "--no-progress", "--no-samples", "--set", out_dir, "--set", "train.steps=2",
                 "--set", "train.resume=null"]) == 0
    for fmt in ("diffusers", "comfyui", "full"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    full, info = Flux2Transformer2DModel.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not any(info.values()), info
    base = load_file(str(run / "base.safetensors"))
    assert set(base) == set(full.state_dict())

    config = {k: v for k, v in full.config.items() if not k.startswith("_")}
    plain = Flux2Transformer2DModel(**config)
    plain.load_state_dict(base, strict=True)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=plain.eval(), is_distilled=True)
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(48, 4, 4, generator=g), torch.rand(1, generator=g), torch.randn(5, 32, generator=g)
    with torch.no_grad():
        want = reference(full.eval(), x, t, text)
        torch.testing.assert_close(reference(pipe.transformer, x, t, text), want, rtol=1e-4, atol=1e-4)
        pipe.disable_lora()                         # the LoRA is trained: it moves the output
        assert (reference(pipe.transformer, x, t, text) - want).abs().max() > 1e-6

    comfy = load_file(str(tmp_path / "comfyui" / "lora_comfyui.safetensors"))
    merged = apply_comfy_lora(to_bfl(base), comfy)
    save_file(merged, str(tmp_path / "flux-2-klein-tiny.safetensors"))
    got = load_flux2_klein_transformer(tmp_path / "flux-2-klein-tiny.safetensors").state_dict()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
