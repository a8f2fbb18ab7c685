"""FLUX.2 [klein] weights: diffusers folders and BFL single files load into our transformer."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dopsd_fast.models.loading import WeightsError
from dopsd_fast.models.loading_flux2 import diffusers_to_bfl, load_flux2_klein_transformer, swap_halves

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel  # noqa: E402

from test_flux2_klein import TINY, make, randomize_, reference  # noqa: E402  (same folder)


@pytest.fixture(scope="module")
def theirs():
    model = Flux2Transformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    randomize_(model, seed=7)
    return model.eval()


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> BFL names (written by hand; checked against diffusers' own converter below), any block counts."""
    blocks = lambda prefix: range(len({k.split(".")[1] for k in sd if k.startswith(prefix)}))
    out = {"img_in.weight": sd["x_embedder.weight"], "txt_in.weight": sd["context_embedder.weight"],
           "time_in.in_layer.weight": sd["time_guidance_embed.timestep_embedder.linear_1.weight"],
           "time_in.out_layer.weight": sd["time_guidance_embed.timestep_embedder.linear_2.weight"],
           "final_layer.linear.weight": sd["proj_out.weight"],
           "final_layer.adaLN_modulation.1.weight": swap_halves(sd["norm_out.linear.weight"])}
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        out[f"{m}.lin.weight"] = sd[f"{m}.linear.weight"]
    for i in blocks("transformer_blocks."):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s, (a, b, c, proj, nq, nk, ff) in {
                "img": ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
                "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k",
                        "ff_context")}.items():
            out[f"{q}{s}_attn.qkv.weight"] = torch.cat([sd[f"{p}attn.{n}.weight"] for n in (a, b, c)])
            out[f"{q}{s}_attn.proj.weight"] = sd[f"{p}attn.{proj}.weight"]
            out[f"{q}{s}_attn.norm.query_norm.scale"] = sd[f"{p}attn.{nq}.weight"]
            out[f"{q}{s}_attn.norm.key_norm.scale"] = sd[f"{p}attn.{nk}.weight"]
            out[f"{q}{s}_mlp.0.weight"] = sd[f"{p}{ff}.linear_in.weight"]
            out[f"{q}{s}_mlp.2.weight"] = sd[f"{p}{ff}.linear_out.weight"]
    for i in blocks("single_transformer_blocks."):
        p, q = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[f"{q}linear1.weight"], out[f"{q}linear2.weight"] = sd[f"{p}to_qkv_mlp_proj.weight"], sd[f"{p}to_out.weight"]
        out[f"{q}norm.query_norm.scale"], out[f"{q}norm.key_norm.scale"] = sd[f"{p}norm_q.weight"], sd[f"{p}norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def assert_same_outputs(ours, theirs):
    x, t, text, _ = make(11, [(16, 3, 4)], [6])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cap_feats=text)[0].float(), reference(theirs, x[0], t[0], text[0]),
                                   rtol=1e-5, atol=1e-5)


def test_hand_written_bfl_layout_agrees_with_diffusers_converter(theirs):
    sd = theirs.state_dict()
    converted = convert_flux2_transformer_checkpoint_to_diffusers(to_bfl(sd))
    assert set(converted) == set(sd)
    for k in sd:
        torch.testing.assert_close(converted[k], sd[k], rtol=0, atol=0)


def test_diffusers_to_bfl_runs_the_table_backwards(theirs):
    """Each diffusers tensor is its block of the BFL tensor it was loaded from (ComfyUI LoRA export's names)."""
    sd = theirs.state_dict()
    bfl = to_bfl(sd)
    for name, w in sd.items():
        target, part, parts, rows = diffusers_to_bfl(name)
        torch.testing.assert_close(rows(bfl[target].chunk(parts)[part]), w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no FLUX.2 tensor"):
        diffusers_to_bfl("transformer_blocks.0.attn.to_qkv.weight")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfy_prefix"])
def test_bfl_single_file_loads(theirs, tmp_path, prefix):
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({prefix + k: v for k, v in to_bfl(theirs.state_dict()).items()}, str(path))
    ours = load_flux2_klein_transformer(path)
    assert ours.config.num_layers == TINY["num_layers"] and ours.config.axes_dims_rope == TINY["axes_dims_rope"]
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("shard", ["10GB", "40KB"], ids=["single", "sharded"])
def test_diffusers_folder_loads(theirs, tmp_path, shard):
    theirs.save_pretrained(tmp_path, max_shard_size=shard, safe_serialization=True)
    assert_same_outputs(load_flux2_klein_transformer(tmp_path), theirs)
    model = load_flux2_klein_transformer(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_broken_weights_fail_naming_the_problem(theirs, tmp_path):
    bfl = to_bfl(theirs.state_dict())
    del bfl["single_blocks.1.linear2.weight"]
    bfl["double_blocks.0.img_attn.qkv.weight"] = bfl["double_blocks.0.img_attn.qkv.weight"][:, :-1].contiguous()
    path = tmp_path / "broken.safetensors"
    save_file(bfl, str(path))
    with pytest.raises(WeightsError, match=r"1 missing \(e\.g\. single_transformer_blocks\.1\.attn\.to_out\.weight\).*"
                                           r"mis-shaped \(e\.g\. transformer_blocks\.0\.attn\.to_k\.weight"):
        load_flux2_klein_transformer(path)
    save_file({"foo.weight": torch.randn(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not a FLUX.2 transformer file in BFL layout"):
        load_flux2_klein_transformer(tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_flux2_klein_transformer(tmp_path / "nope")
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_flux2_klein_transformer(tmp_path / "folder")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfy_prefix"])
def test_non_finite_bfl_tensor_is_refused_by_its_name_in_the_file(theirs, tmp_path, prefix):
    bfl = to_bfl(theirs.state_dict())
    bfl["double_blocks.0.img_attn.qkv.weight"][0, 0] = float("nan")     # one fused tensor -> to_q, to_k, to_v
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({prefix + k: v for k, v in bfl.items()}, str(path))
    with pytest.raises(WeightsError, match=f"{path}: tensor '{prefix}double_blocks.0.img_attn.qkv.weight' holds NaN"):
        load_flux2_klein_transformer(path)


def test_integer_bfl_tensor_and_wrong_config_types_are_refused(theirs, tmp_path):
    bfl = to_bfl(theirs.state_dict())
    bfl["img_in.weight"] = bfl["img_in.weight"].to(torch.int32)          # a cast would load garbage silently
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file(bfl, str(path))
    with pytest.raises(WeightsError, match=f"{path}: tensor 'img_in.weight' is stored as I32"):
        load_flux2_klein_transformer(path)
    folder = tmp_path / "transformer"
    theirs.save_pretrained(folder)
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": "one"}))
    with pytest.raises(WeightsError, match=f'{config}: num_layers is "one", expected int'):
        load_flux2_klein_transformer(folder)
    config.write_text("[]")
    with pytest.raises(WeightsError, match=f"{config}: expected a JSON object"):
        load_flux2_klein_transformer(folder)
