"""read_lora (adapter.init_from) is the inverse of export.py's LoRA writers: what save_diffusers_lora and
save_comfyui_lora write loads back into a fresh adapter exactly, for Z-Image (fused qkv) and FLUX.2 [klein] (BFL
names, fused qkv, norm_out's swapped halves); a foreign fused adapter keeps its update; bad files are named."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.contexts.tiny import TINY_TRANSFORMER
from dopsd_fast.models.export import (LORA_FILE, comfyui_lora_tensors, lora_modules, save_comfyui_lora,
                                      save_diffusers_lora)
from dopsd_fast.models.flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from dopsd_fast.models.loading import WeightsError
from dopsd_fast.models.lora_load import read_lora
from dopsd_fast.models.z_image import ZImageConfig, ZImageTransformer
from dopsd_fast.nn.lora_linear import adapter_parameters, inject_lora

ZIMAGE_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                  "feed_forward.w2", "feed_forward.w3"]
# klein: double-block attention and MLPs, single blocks, and norm_out (BFL rows shift | scale, swapped)
KLEIN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "attn.to_qkv_mlp_proj",
                 "attn.to_out", "linear"]
KLEIN = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=256, mlp_ratio=3.0,
             axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6, guidance_embeds=False)
RANK, ALPHA = 4, 8.0


def fresh(family: str, targets=None, rank=RANK, alpha=ALPHA):
    """A tiny model with a fresh student adapter (B = 0), as a run with adapter.init_from builds it."""
    if family == "z_image":
        model = ZImageTransformer(ZImageConfig.from_dict(TINY_TRANSFORMER))
    else:
        model = Flux2KleinTransformer(Flux2KleinConfig(**KLEIN))
    inject_lora(model, targets or (ZIMAGE_TARGETS if family == "z_image" else KLEIN_TARGETS), ["student"], rank, alpha)
    return model


def trained(family: str, seed: int = 0):
    """A model whose student adapter is random and non-zero, as after training."""
    model = fresh(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, "student").values():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["z_image", "flux2_klein"])
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_written_lora_loads_back_exactly(tmp_path, family, fmt):
    src = trained(family)
    if fmt == "diffusers":
        path = save_diffusers_lora(src, tmp_path)
        source = tmp_path                                       # the folder holding pytorch_lora_weights.safetensors
    else:
        path = source = save_comfyui_lora(src, tmp_path / "comfy.safetensors")
    dst = fresh(family)
    loaded, where, left_out = read_lora(source, dst)
    assert where == path and left_out == 0
    expected = adapter_parameters(src, "student")
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v.detach()), k


def test_comfyui_names_are_the_ones_comfyui_reads(tmp_path):
    """The klein file holds BFL names (fused double-block qkv, final_layer.adaLN_modulation) and loads back."""
    keys = set(comfyui_lora_tensors(trained("flux2_klein")))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in keys


def test_foreign_fused_qkv_adapter_keeps_its_update(tmp_path):
    """A rank-r adapter another trainer put on ComfyUI's fused attention.qkv (shared down, up over q|k|v rows) and
    diffusers names under diffusion_model. (ai-toolkit's layout): each part's update equals the file's rows."""
    model = fresh("z_image")
    mods = lora_modules(model)
    dim = mods["layers.0.attention.to_q"].in_features
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(RANK, dim, generator=g), torch.randn(3 * dim, RANK, generator=g)
    w1 = mods["layers.0.feed_forward.w1"]
    a1, b1 = torch.randn(RANK, w1.in_features, generator=g), torch.randn(w1.out_features, RANK, generator=g)
    save_file({"diffusion_model.layers.0.attention.qkv.lora_down.weight": down,
               "diffusion_model.layers.0.attention.qkv.lora_up.weight": up,
               "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(ALPHA),
               "diffusion_model.layers.0.feed_forward.w1.lora_A.weight": a1,
               "diffusion_model.layers.0.feed_forward.w1.lora_B.weight": b1,
               "diffusion_model.layers.0.feed_forward.w1.alpha": torch.tensor(ALPHA)}, str(tmp_path / "x.safetensors"))
    loaded, _, left_out = read_lora(tmp_path / "x.safetensors", model)
    assert left_out == len(mods) - 4
    for i, leaf in enumerate(("to_q", "to_k", "to_v")):
        a, b = loaded[f"layers.0.attention.{leaf}.lora_A.student"], loaded[f"layers.0.attention.{leaf}.lora_B.student"]
        torch.testing.assert_close(b @ a, (up @ down)[i * dim:(i + 1) * dim])
    assert torch.equal(loaded["layers.0.feed_forward.w1.lora_A.student"], a1)
    assert torch.equal(loaded["layers.0.feed_forward.w1.lora_B.student"], b1)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, message", [
    ("rank", "has rank 4, alpha 8, but this run's adapter has rank 2, alpha 8; set the file's values "
             "(--set adapter.rank=4 --set adapter.alpha=8)"),
    ("alpha", "has rank 4, alpha 8, but this run's adapter has rank 4, alpha 4"),
    ("targets", "adapts part 1 of 3, which this run's adapter.targets leave out; add that projection"),
    ("unknown", "module 'layers.0.attention.to_x' is not one of this run's"),
    ("not_lora", "tensor 'layers.0.attention.to_q.weight' is not a LoRA tensor"),
    ("nan", "holds NaN or Inf values"),
    ("shape", "which needs (4, 64) and (64, 4); the LoRA was trained on another model"),
    ("half", "lacks its up tensor"),
])
def test_bad_lora_files_are_named(tmp_path, case, message):
    src = trained("z_image")
    diffusers = load_file(str(save_diffusers_lora(src, tmp_path)))
    comfy = save_comfyui_lora(src, tmp_path / "comfy.safetensors")
    path, model = tmp_path / LORA_FILE, fresh("z_image")
    q = "transformer.layers.0.attention.to_q"
    if case == "rank":
        model = fresh("z_image", rank=2)
    elif case == "alpha":
        model = fresh("z_image", alpha=4.0)
    elif case == "targets":
        path, model = comfy, fresh("z_image", targets=["attention.to_q", "attention.to_v", "attention.to_out.0",
                                                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"])
    elif case == "unknown":
        path = _write(tmp_path / "u.safetensors", {"layers.0.attention.to_x.lora_A.weight": torch.ones(4, 64),
                                                   "layers.0.attention.to_x.lora_B.weight": torch.ones(64, 4)})
    elif case == "not_lora":
        path = _write(tmp_path / "n.safetensors", {"layers.0.attention.to_q.weight": torch.ones(64, 64)})
    elif case == "nan":
        diffusers[f"{q}.lora_B.weight"][0, 0] = float("nan")
        path = _write(tmp_path / "nan.safetensors", diffusers)
    elif case == "shape":
        path = _write(tmp_path / "s.safetensors", {f"{q}.lora_A.weight": torch.ones(4, 32),
                                                   f"{q}.lora_B.weight": torch.ones(64, 4),
                                                   f"{q}.alpha": torch.tensor(ALPHA)})
    elif case == "half":
        path = _write(tmp_path / "h.safetensors", {f"{q}.lora_A.weight": torch.ones(4, 64)})
    with pytest.raises(WeightsError) as err:
        read_lora(path, model)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


@pytest.mark.parametrize("case", ["missing", "hub_id", "folder", "pickle", "corrupt"])
def test_unreadable_sources_are_named(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = {"missing": tmp_path / "nope.safetensors", "hub_id": "someone/some-lora", "folder": tmp_path,
              "pickle": tmp_path / "lora.pt", "corrupt": tmp_path / "bad.safetensors"}[case]
    (tmp_path / "lora.pt").write_bytes(b"\x80\x04.")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    message = {"missing": "no such file or folder", "hub_id": "Hugging Face ids are not resolved yet",
               "folder": f"a folder without {LORA_FILE} (.safetensors files there: bad.safetensors)",
               "pickle": "read only from safetensors (never pickle)",
               "corrupt": "not a readable safetensors file"}[case]
    with pytest.raises(WeightsError) as err:
        read_lora(source, fresh("z_image"))
    assert message in str(err.value) and str(source) in str(err.value)
