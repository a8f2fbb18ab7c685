"""`model.pretrained`: train from a diffusers-format transformer folder; bad folders fail before anything is built."""
import json

import pytest
import torch

from dopsd_fast.cli import main

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel  # noqa: E402

PIXEL_TINY = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=3, dim=64, n_layers=1, n_refiner_layers=1,
                  n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


def _train(tmp_path, *extra):
    return main(["train", "--no-progress", "--no-samples", "--set", f"train.output_dir={json.dumps(str(tmp_path / 'run'))}",
                 "--set", "train.steps=1", "--set", "train.resume=null", "--set", "model.arch={}", *extra])


def test_train_from_a_diffusers_folder(tmp_path):
    torch.manual_seed(0)
    ZImageTransformer2DModel(**PIXEL_TINY).save_pretrained(tmp_path / "transformer")
    assert _train(tmp_path, "--set", f"model.pretrained={json.dumps(str(tmp_path / 'transformer'))}") == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "student.safetensors").is_file()
    assert not (tmp_path / "run" / "base.safetensors").exists()      # the base lives in the pretrained folder


def test_missing_folder_and_arch_conflict_are_config_errors(tmp_path, capsys):
    assert _train(tmp_path, "--set", f"model.pretrained={json.dumps(str(tmp_path / 'none'))}") == 2
    assert "model.pretrained:" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--set", "model.pretrained=x"]) == 2          # tiny-cpu sets model.arch
    assert "model.arch: must be empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_latent_model_on_pixel_data_is_refused(tmp_path, capsys):
    ZImageTransformer2DModel(**{**PIXEL_TINY, "in_channels": 16}).save_pretrained(tmp_path / "t16")
    assert _train(tmp_path, "--set", f"model.pretrained={json.dumps(str(tmp_path / 't16'))}") == 2
    assert "16-channel latent model" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["zimage-turbo-lora", "zimage-turbo-lora-24gb"])
def test_dry_run_plans_an_official_preset_before_the_download(capsys, preset):
    assert main(["train", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not found yet" in out and "parameters: 6154908736" in out and "trainable_parameters: 158760960" in out


def test_the_24gb_preset_is_the_official_recipe_with_the_cache_required():
    from dopsd_fast.train.config import load_config

    def flat(cfg):
        return {f"{s}.{k}": v for s, keys in cfg.to_dict().items() for k, v in keys.items()}

    official, small = flat(load_config("zimage-turbo-lora")), flat(load_config("zimage-turbo-lora-24gb"))
    assert {k for k in official if official[k] != small[k]} == {"train.output_dir", "data.encode_missing"}
    assert small["model.checkpointing"] == "full" and small["data.encode_missing"] is False
    assert small["data.cache_dir"] == "auto"


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "dim": "64"})),
     'config.json: dim is "64", expected int'),
])
def test_bad_config_json_exits_2_before_anything_is_written(tmp_path, capsys, damage, fragment):
    ZImageTransformer2DModel(**PIXEL_TINY).save_pretrained(tmp_path / "transformer")
    damage(tmp_path / "transformer")
    assert _train(tmp_path, "--set", f"model.pretrained={json.dumps(str(tmp_path / 'transformer'))}") == 2
    err = capsys.readouterr().err
    assert err.startswith("dopsd: error:") and f"{tmp_path / 'transformer'}/{fragment}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_integer_weights_exit_2_before_anything_is_written(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "transformer"
    ZImageTransformer2DModel(**PIXEL_TINY).save_pretrained(folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["x_pad_token"] = tensors["x_pad_token"].to(torch.int32)
    save_file(tensors, str(path))
    assert _train(tmp_path, "--set", f"model.pretrained={json.dumps(str(folder))}") == 2
    err = capsys.readouterr().err
    assert f"{path}: tensor 'x_pad_token' is stored as I32" in err
    assert not (tmp_path / "run").exists()
