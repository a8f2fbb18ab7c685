"""Load FLUX.2 [klein] transformer weights: a diffusers ``transformer/`` folder or a BFL single file.

The diffusers keys are our parameter names, so a folder loads through ``loading.load_checked``. A BFL file
(``flux-2-klein-4b.safetensors``, optionally with ComfyUI's ``model.diffusion_model.`` prefix) goes through one
rename table plus two special cases (models.md 3.8): fused ``qkv`` of double blocks -> to_q/to_k/to_v
(add_*_proj for text), and ``final_layer.adaLN_modulation.1`` rows (shift | scale) -> ``norm_out.linear``
rows (scale | shift). Its architecture is read off the tensor shapes. Names and shapes are checked from the
header before any tensor is read. ``diffusers_to_bfl`` runs the same table backwards (ComfyUI LoRA export).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .._extras import require
from .flux2_klein import Flux2KleinConfig, Flux2KleinTransformer
from .loading import (WEIGHTS, WeightsError, _open, build_on_meta, config_from_json, describe_mismatch,
                      first_nonfinite, load_checked, load_vae, nonfinite_weights, read_json_object,
                      refuse_integer_weights)

COMFY_PREFIX = "model.diffusion_model."

# BFL name <-> diffusers name, {i} = block index; read left to right to load a BFL file, right to left to export
# a ComfyUI LoRA. "weight"/"scale" suffixes are part of the names.
BFL_RENAMES = [
    ("img_in.weight", "x_embedder.weight"),
    ("txt_in.weight", "context_embedder.weight"),
    ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    ("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    *((f"{m}.lin.weight", f"{m}.linear.weight")
      for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")),
    ("final_layer.linear.weight", "proj_out.weight"),
    ("double_blocks.{i}.img_attn.proj.weight", "transformer_blocks.{i}.attn.to_out.0.weight"),
    ("double_blocks.{i}.txt_attn.proj.weight", "transformer_blocks.{i}.attn.to_add_out.weight"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("double_blocks.{i}.img_mlp.0.weight", "transformer_blocks.{i}.ff.linear_in.weight"),
    ("double_blocks.{i}.img_mlp.2.weight", "transformer_blocks.{i}.ff.linear_out.weight"),
    ("double_blocks.{i}.txt_mlp.0.weight", "transformer_blocks.{i}.ff_context.linear_in.weight"),
    ("double_blocks.{i}.txt_mlp.2.weight", "transformer_blocks.{i}.ff_context.linear_out.weight"),
    ("single_blocks.{i}.linear1.weight", "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight"),
    ("single_blocks.{i}.linear2.weight", "single_transformer_blocks.{i}.attn.to_out.weight"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
]
QKV = re.compile(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.weight")
QKV_NAMES = {"img": ("attn.to_q", "attn.to_k", "attn.to_v"), "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
QKV_PARTS = {name: (stream, i) for stream, names in QKV_NAMES.items() for i, name in enumerate(names)}
QKV_PART = re.compile(rf"transformer_blocks\.(\d+)\.({'|'.join(map(re.escape, QKV_PARTS))})\.weight")
FINAL_MODULATION, NORM_OUT = "final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight"

Convert = Callable[[Tensor], Tensor]


def _template(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)"))


TO_DIFFUSERS = [(_template(bfl), diffusers) for bfl, diffusers in BFL_RENAMES]
TO_BFL = [(_template(diffusers), bfl) for bfl, diffusers in BFL_RENAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(name)
        if m:
            return target.format(**m.groupdict())
    return None


def _same(w: Tensor) -> Tensor:
    return w


def swap_halves(w: Tensor) -> Tensor:
    """Rows (a | b) -> (b | a): BFL's final (shift | scale) <-> diffusers' (scale | shift); its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def bfl_to_diffusers(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], Convert]]:
    """One BFL tensor -> the diffusers tensors it becomes: (name, shape, tensor -> tensor). Unknown names pass
    through unchanged (and are then reported as unexpected)."""
    m = QKV.fullmatch(name)
    if m:
        third = (shape[0] // 3, *shape[1:])
        return [(f"transformer_blocks.{m[1]}.{n}.weight", third, lambda w, i=i: w.chunk(3, dim=0)[i])
                for i, n in enumerate(QKV_NAMES[m[2]])]
    if name == FINAL_MODULATION:
        return [(NORM_OUT, shape, swap_halves)]
    return [(_rename(name, TO_DIFFUSERS) or name, shape, _same)]


def diffusers_to_bfl(name: str) -> tuple[str, int, int, Convert]:
    """The inverse of ``bfl_to_diffusers`` for one diffusers tensor: (BFL name, part, parts, rows). The BFL tensor
    is ``parts`` equal row blocks and this tensor, its rows mapped by ``rows``, is block ``part`` of them (a
    double block's q, k or v in its fused qkv; 0 of 1 otherwise). ValueError for a name BFL files do not have."""
    m = QKV_PART.fullmatch(name)
    if m:
        stream, part = QKV_PARTS[m[2]]
        return f"double_blocks.{m[1]}.{stream}_attn.qkv.weight", part, 3, _same
    if name == NORM_OUT:
        return FINAL_MODULATION, 0, 1, swap_halves
    bfl = _rename(name, TO_BFL)
    if bfl is None:
        raise ValueError(f"{name}: no FLUX.2 tensor in the BFL layout has this name")
    return bfl, 0, 1, _same


def config_from_bfl_shapes(shapes: dict[str, tuple[int, ...]], where: Path) -> Flux2KleinConfig:
    """The architecture of a BFL file, from its tensor shapes (BFL files carry no config)."""
    try:
        dim, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        blocks = lambda prefix: len({int(k.split(".")[1]) for k in shapes if k.startswith(prefix)})
        return Flux2KleinConfig(
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            num_layers=blocks("double_blocks."), num_single_layers=blocks("single_blocks."),
            attention_head_dim=head_dim, num_attention_heads=dim // head_dim,
            joint_attention_dim=shapes["txt_in.weight"][1],
            timestep_guidance_channels=shapes["time_in.in_layer.weight"][1],
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / 2 / dim,
            axes_dims_rope=(head_dim // 4,) * 4)
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{where}: not a FLUX.2 transformer file in BFL layout (missing or odd tensor {err}); "
                           "pass a BFL flux-2-klein-*.safetensors or a diffusers transformer/ folder") from None


def read_flux2_config(folder: Path) -> Flux2KleinConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a diffusers transformer folder has config.json beside its weights")
    return config_from_json(path, Flux2KleinConfig, read_json_object(path))


def _bfl_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """BFL name -> shape, and BFL name -> the key in the file (ComfyUI files prefix every key)."""
    with _open(path) as f:
        raw = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefixed = all(k.startswith(COMFY_PREFIX) for k in raw)
    keys = {(k[len(COMFY_PREFIX):] if prefixed else k): k for k in raw}
    return {k: raw[v] for k, v in keys.items()}, keys


def read_pretrained_config(path: str | Path) -> Flux2KleinConfig:
    """The architecture of a diffusers folder (config.json) or a BFL file (tensor shapes), reading no weights."""
    path = Path(path)
    return config_from_bfl_shapes(_bfl_header(path)[0], path) if path.is_file() else read_flux2_config(path)


def _load_bfl_file(path: Path, dtype: torch.dtype, device: str | torch.device) -> Flux2KleinTransformer:
    shapes, file_keys = _bfl_header(path)
    config = config_from_bfl_shapes(shapes, path)
    with torch.device("meta"):
        model = Flux2KleinTransformer(config)
    plan = {new: (old, shape, fn) for old, s in shapes.items() for new, shape, fn in bfl_to_diffusers(old, s)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = describe_mismatch({k: v[1] for k, v in plan.items()}, expected)
    if mismatch:
        raise WeightsError(f"{path}: weights do not match the FLUX.2 transformer of its shapes ({config}): {mismatch}")
    refuse_integer_weights({k: path for k in file_keys.values()}, [file_keys[old] for old, _, _ in plan.values()])
    state = {}
    with _open(path) as f:
        for new, (old, _, fn) in plan.items():
            state[new] = fn(f.get_tensor(file_keys[old])).to(device=device, dtype=dtype)
    bad = first_nonfinite(state)
    if bad is not None:
        raise nonfinite_weights(path, file_keys[plan[bad][0]])
    model.load_state_dict(state, assign=True)
    return model


def load_flux2_klein_transformer(path: str | Path, dtype: torch.dtype = torch.float32,
                                 device: str | torch.device = "cpu") -> Flux2KleinTransformer:
    """A diffusers ``transformer/`` folder (config.json + one or sharded safetensors) or a BFL single
    ``.safetensors`` file -> our transformer in ``dtype`` on ``device``."""
    path = Path(path)
    if path.is_file():
        return _load_bfl_file(path, dtype, device)
    if not path.is_dir():
        raise WeightsError(f"{path}: not found; set model.pretrained to a diffusers transformer/ folder or a BFL "
                           "flux-2-klein-*.safetensors file")
    config = read_flux2_config(path)
    model = build_on_meta(Flux2KleinTransformer, config, path)
    try:
        return load_checked(model, path, WEIGHTS, dtype, device)
    except WeightsError as err:
        raise WeightsError(f"{err} (config: {config})") from None


def load_flux2_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers FLUX.2 ``vae/`` folder -> diffusers' ``AutoencoderKLFlux2`` (BatchNorm statistics included)."""
    diffusers = require("diffusers", "diffusers", "the FLUX.2 VAE (model.vae)")
    return load_vae(folder, dtype, device, diffusers.AutoencoderKLFlux2)
