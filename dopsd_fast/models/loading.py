"""Load diffusers-format component folders (config.json + one or sharded safetensors): our Z-Image transformer,
the Qwen3 text encoder (transformers) and the VAE (diffusers' AutoencoderKL).

Keys and shapes are checked against the model from the file headers before any tensor is read, so a wrong
folder fails fast with the names that differ; a tensor holding NaN or Inf is refused by name once read.
Weights are never unpickled.
"""
from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from .._extras import require
from ..progress import progress
from .z_image import ZImageConfig, ZImageTransformer

WEIGHTS = "diffusion_pytorch_model"
Key = TypeVar("Key")


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; the message names the file and what differs."""


def _weight_map(folder: Path, stem: str = WEIGHTS) -> dict[str, Path]:
    """Tensor name -> the shard file holding it (``stem``: diffusion_pytorch_model for diffusers, model for transformers)."""
    index, single = folder / f"{stem}.safetensors.index.json", folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from None
        files = {name: folder / shard for name, shard in mapping.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing[:3])}; "
                               "the download is incomplete")
        return files
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise WeightsError(f"{folder}: no {single.name} or {index.name}; point the config at the component's "
                       "folder inside a diffusers checkpoint (transformer/, text_encoder/, vae/)")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None


def read_config(folder: Path) -> ZImageConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a diffusers transformer folder has config.json beside its weights")
    raw = read_json_object(path)
    if raw.pop("siglip_feat_dim", None) is not None:
        raise WeightsError(f"{path}: siglip_feat_dim is set (Z-Image omni weights); only text-to-image weights load")
    return config_from_json(path, ZImageConfig, raw)


def read_json_object(path: Path) -> dict:
    """A ``config.json`` as a dict; WeightsError naming the file when it is not UTF-8 JSON or not an object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err}); the file is damaged: download it again") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a JSON object of config keys, got a {type(raw).__name__}; "
                           "download the folder's config.json again")
    return raw


def _fits(value, tp) -> bool:
    """Whether a JSON value can stand for a config field annotated ``tp``: int, float, bool, tuple[int, ...],
    X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is tuple:
        return isinstance(value, list) and all(_fits(v, typing.get_args(tp)[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):          # JSON writes 3.0 as 3: an integer stands for a float, never the reverse
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    return True


def config_from_json(path: Path, cls: type, raw: dict):
    """``cls.from_dict(raw)`` with every field's type checked first, so ``"dim": "big"`` is refused here, naming
    the file and key, instead of failing inside the model's constructor."""
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key in hints and not _fits(value, hints[key]):
            want = str(hints[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise WeightsError(f"{path}: {key} is {json.dumps(value)}, expected {want}; fix that key or download "
                               "config.json again")
    try:
        return cls.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{path}: {err}; fix config.json or download it again") from None


def build_on_meta(model_cls: type, config, folder: Path):
    """The model of ``config`` on the meta device; WeightsError naming the folder's config.json if none can be built."""
    try:
        with torch.device("meta"):
            return model_cls(config)
    except (TypeError, ValueError, ZeroDivisionError, AssertionError, RuntimeError) as err:
        raise WeightsError(f"{folder / 'config.json'}: describes no buildable {model_cls.__name__} ({err}; config: "
                           f"{config}); download config.json again") from None


def refuse_integer_weights(files: dict[str, Path], names) -> None:
    """WeightsError naming the first tensor of ``names`` (file keys of floating-point model tensors) that a file
    stores as integers or booleans: a cast would load its values as weights without a word (a quantized export, or
    not this model's file). Read from the headers; no tensor is read."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path in sorted(by_file):
        with _open(path) as f:
            for name in by_file[path]:
                code = f.get_slice(name).get_dtype()            # "F32", "BF16", "F8_E4M3", "I32", "U8", "BOOL"
                if not (code.startswith("F") or code == "BF16"):
                    raise WeightsError(f"{path}: tensor {name!r} is stored as {code}, but the model holds "
                                       "floating-point weights there (a quantized or foreign export?); point the "
                                       "config at the original floating-point (F32/BF16/F16) safetensors")


def describe_mismatch(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """None when names and shapes agree; otherwise a one-line summary of what is missing, extra, mis-shaped."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k}: file {found[k]} vs model {expected[k]}" for k in sorted(expected) if k in found and found[k] != expected[k]]
    parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
    parts += [f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})"] if extra else []
    parts += [f"{len(shapes)} mis-shaped (e.g. {'; '.join(shapes[:3])})"] if shapes else []
    return "; ".join(parts) or None


def first_nonfinite(tensors: Mapping[Key, torch.Tensor]) -> Key | None:
    """The first name (in order) whose floating-point tensor holds a NaN or an Inf, or None when all are finite.

    One pass over each tensor and one host sync per device (not one per tensor); integer tensors (RNG states,
    step counts) are skipped. Weights, checkpoints and exports are checked with it before they are trusted."""
    floats = [(k, t.detach()) for k, t in tensors.items() if t.is_floating_point()]
    by_device: dict[torch.device, list[tuple[Key, torch.Tensor]]] = {}
    for k, t in floats:
        by_device.setdefault(t.device, []).append((k, t))
    bad = set()
    for items in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        bad.update(k for (k, _), good in zip(items, ok) if not good)
    return next((k for k, _ in floats if k in bad), None)


def nonfinite_weights(path: Path, key: str) -> WeightsError:
    return WeightsError(f"{path}: tensor {key!r} holds NaN or Inf values; the file is corrupt or was saved from a "
                        "diverged run: download it again or point the config (model.pretrained, model.text_encoder, "
                        "model.vae) at other weights")


def file_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only."""
    found = {}
    for path in sorted(set(files.values())):
        with _open(path) as f:
            found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if files.get(k) == path})
    return found


def load_checked(model: torch.nn.Module, folder: Path, stem: str = WEIGHTS, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", rename: Callable[[str], str | None] = lambda k: k,
                 expected: dict[str, tuple[int, ...]] | None = None) -> torch.nn.Module:
    """Fill ``model`` (built on the meta device) from ``folder`` after checking every name and shape.

    ``rename`` maps a file key to a model key (None drops it, e.g. an unused LM head); ``expected`` is the full
    key set to check against when ``model`` keeps only part of it (an encoder cut after its last needed layer).
    Floating tensors are cast to ``dtype`` as they are read.
    """
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    floating = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    files, source = _checked_sources(folder, stem, rename, wanted, expected, floating, type(model).__name__)
    state = {}
    with progress(total=len(wanted), desc=f"loading {folder}", unit="tensor") as bar:
        for path in sorted({files[source[k]] for k in wanted}):
            with _open(path) as f:
                for new in wanted:
                    if files[source[new]] == path:
                        t = f.get_tensor(source[new])
                        state[new] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                        bar.update()
    bad = first_nonfinite(state)        # after the cast: what the model would hold
    if bad is not None:
        raise nonfinite_weights(files[source[bad]], source[bad])
    model.load_state_dict(state, assign=True)
    return model


def _checked_sources(folder: Path, stem: str, rename: Callable[[str], str | None], wanted: dict[str, tuple[int, ...]],
                     expected: dict[str, tuple[int, ...]] | None, floating: list[str], what: str):
    """(tensor name -> shard file, model key -> file key) of ``folder``, after checking from the headers that names
    and shapes match ``wanted`` (or ``expected``) and that the ``floating`` keys are stored as floats."""
    files = _weight_map(folder, stem)
    shapes = file_shapes(files)
    source = {rename(k): k for k in files if rename(k) is not None}      # model key -> file key
    mismatch = describe_mismatch({new: shapes[old] for new, old in source.items()}, expected or wanted)
    if mismatch:
        raise WeightsError(f"{folder}: weights do not match the {what} of its config.json: {mismatch}")
    refuse_integer_weights(files, [source[k] for k in floating])
    return files, source


def tensors_one_at_a_time(folder: Path, wanted: dict[str, tuple[int, ...]], floating: list[str], what: str,
                          dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``load_checked``'s checks, then each tensor of ``wanted`` (key -> shape) read, cast to ``dtype`` and checked
    finite on its own: a model whose parameters are partitioned (ZeRO-3) keeps its slice of each and drops the rest,
    so no whole copy of the model is ever held. Diffusers keys, as the file's."""
    files, source = _checked_sources(folder, WEIGHTS, lambda k: k, wanted, None, floating, what)
    for key in sorted(wanted, key=lambda k: str(files[source[k]])):
        path = files[source[key]]
        with _open(path) as f:      # one opening per tensor: the file's pages it maps count as this process's memory
            t = f.get_tensor(source[key])       # until it closes
        t = t.to(dtype) if t.is_floating_point() else t
        if first_nonfinite({key: t}) is not None:
            raise nonfinite_weights(path, source[key])
        yield key, t


def load_zimage_transformer(folder: str | Path, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> ZImageTransformer:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a directory; set model.pretrained to a diffusers transformer/ folder")
    config = read_config(folder)
    model = build_on_meta(ZImageTransformer, config, folder)
    try:
        return load_checked(model, folder, WEIGHTS, dtype, device)
    except WeightsError as err:
        raise WeightsError(f"{err} (config: {config})") from None


def read_component_config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        raise WeightsError(f"{path}: missing; point the config at the {what} folder of a diffusers checkpoint")
    return read_json_object(path)


def load_qwen3_text_encoder(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                            num_layers: int | None = None):
    """A diffusers ``text_encoder/`` folder (Qwen3, as Qwen3Model or Qwen3ForCausalLM keys) -> ``Qwen3Model``.

    ``num_layers`` keeps only the first decoder layers (the rest are checked but never read) and replaces the
    final norm by the identity, so the last hidden state is the raw output of layer ``num_layers``.
    """
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    raw = read_component_config(folder, "text_encoder/")
    try:
        config = Qwen3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
        with torch.device("meta"):
            full = Qwen3Model(config)
    except Exception as err:
        # transformers 5 checks field types with huggingface_hub's StrictDataclassError, no TypeError/ValueError
        if not isinstance(err, (TypeError, ValueError, ZeroDivisionError)) and \
                "StrictDataclassError" not in {c.__name__ for c in type(err).__mro__}:
            raise
        raise WeightsError(f"{folder / 'config.json'}: not a Qwen3 text-encoder config ({' '.join(str(err).split())}); "
                           "download the text_encoder/ folder's config.json again") from None
    expected = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    model = full
    if num_layers is not None and num_layers < config.num_hidden_layers:
        config.layer_types = config.layer_types[:num_layers]
        config.num_hidden_layers = num_layers
        model.layers = model.layers[:num_layers]
        model.norm = torch.nn.Identity()
    rename = lambda k: None if k.startswith("lm_head.") else k.removeprefix("model.")
    load_checked(model, folder, "model", dtype, device, rename, expected)
    with torch.device(device):      # a non-persistent buffer, still on meta: rebuild it
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.eval().requires_grad_(False)


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             vae_class: type | None = None):
    """A diffusers ``vae/`` folder -> diffusers' ``AutoencoderKL`` (or ``vae_class``; not rewritten here)."""
    if vae_class is None:
        vae_class = require("diffusers", "diffusers", "the Z-Image VAE (model.vae)").AutoencoderKL

    folder = Path(folder)
    raw = read_component_config(folder, "vae/")
    with torch.device("meta"):
        try:
            model = vae_class.from_config(raw)
        except (TypeError, ValueError) as err:
            raise WeightsError(f"{folder / 'config.json'}: not an {vae_class.__name__} config ({err})") from None
    return load_checked(model, folder, WEIGHTS, dtype, device).eval().requires_grad_(False)
