"""One options dataclass: the paper's defaults, YAML/JSON files, flags that override them."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lsun_ddpm.train.options import TrainingConfig
from lsun_ddpm.train.parsing import check_training_inputs, parse_training_config
from lsun_ddpm.errors import InputError
from lsun_ddpm.train.fast_defaults import default_torch_compile

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_recipe():
    config = parse_training_config([])
    assert config.model_preset == "paper128"
    assert (config.train_batch_size, config.gradient_accumulation_steps) == (8, 16)
    assert config.learning_rate == 3e-4 and config.max_grad_norm == 1.0
    assert config.use_ema and config.ema_max_decay == 0.9999
    assert (config.ddpm_num_steps, config.ddpm_beta_schedule, config.prediction_type) == (1000, "linear", "epsilon")
    assert config.dataset_name == "pcuenq/lsun-bedrooms" and config.logger == "tensorboard"


def test_diffusers_flag_names_parse():
    config = parse_training_config([
        "--train_data_dir", "imgs", "--resolution", "64", "--no_center_crop", "--random_flip", "false",
        "--output_dir", "out", "--train_batch_size", "2", "--num_epochs", "3", "--gradient_accumulation_steps", "4",
        "--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "7", "--use_ema", "false",
        "--mixed_precision", "bf16", "--checkpointing_steps", "9", "--checkpoints_total_limit", "2",
        "--resume_from_checkpoint", "latest", "--logger", "none", "--logging_dir", "tb", "--seed", "1",
        "--eval_batch_size", "4", "--ddpm_num_inference_steps", "50", "--dataloader_num_workers", "2",
    ])
    expected = {
        "train_data_dir": "imgs", "resolution": 64, "center_crop": False, "random_flip": False, "output_dir": "out",
        "train_batch_size": 2, "num_epochs": 3, "gradient_accumulation_steps": 4, "learning_rate": 1e-4,
        "lr_scheduler": "cosine", "lr_warmup_steps": 7, "use_ema": False, "mixed_precision": "bf16",
        "checkpointing_steps": 9, "checkpoints_total_limit": 2, "resume_from_checkpoint": "latest",
        "logger": "none", "logging_dir": "tb", "seed": 1, "eval_batch_size": 4, "ddpm_num_inference_steps": 50,
        "dataloader_num_workers": 2,
    }
    assert {name: getattr(config, name) for name in expected} == expected
    defaults = TrainingConfig()
    assert not [name for name, value in expected.items() if getattr(defaults, name) == value]  # each flag changed it


def test_yaml_file_with_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\ntrain_batch_size: 4\nuse_ema: false\n")
    config = parse_training_config(["--config", str(path), "--train_batch_size", "2"])
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.train_batch_size == 2  # the flag wins over the file
    assert config.use_ema is False


def test_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"max_train_steps": 12, "model_preset": "tiny16"}))
    config = parse_training_config(["--config", str(path)])
    assert (config.max_train_steps, config.model_preset) == (12, "tiny16")


def test_unknown_option_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rat: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_training_config(["--config", str(path)])


def test_invalid_values_are_errors():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        parse_training_config(["--gradient_accumulation_steps", "0"])
    with pytest.raises(ValueError, match="max_train_steps"):
        parse_training_config(["--streaming"])
    with pytest.raises(InputError, match="mixed_precision"):  # one sentence, not argparse's usage + exit
        parse_training_config(["--mixed_precision", "fp8"])


def test_the_shipped_paper_config_parses_and_keeps_the_recipe():
    config = parse_training_config(["--config", str(REPO_ROOT / "configs" / "lsun_bedroom_128.yaml")])
    assert config.model_preset == "paper128" and config.resolution == 128
    assert config.train_batch_size * config.gradient_accumulation_steps == 128
    assert config.learning_rate == 3e-4 and config.ema_max_decay == 0.9999
    # precision and compilation are the device's defaults: bf16 where it is fast, compiled on a GPU
    assert config.mixed_precision is None and config.channels_last is None and config.torch_compile is None
    assert default_torch_compile(torch.device("cuda"), config.max_train_steps * config.gradient_accumulation_steps)


def test_the_shipped_adm_fine_tuning_config_fine_tunes_a_learned_variance_model_at_128(tmp_path):
    from lsun_ddpm.model.diffusion import make_noise_scheduler
    from lsun_ddpm.train.export import save_pipeline_folder
    from lsun_ddpm.model.unet import ADMUNet2DModel

    converted = tmp_path / "adm-lsun-bedroom-256"  # as convert-adm writes it: 6 outputs, sample_size 256
    model = ADMUNet2DModel.from_preset("tiny16", out_channels=6, sample_size=256)
    save_pipeline_folder(model, make_noise_scheduler(variance_type="learned_range"), converted)
    config = parse_training_config(["--config", str(REPO_ROOT / "configs" / "adm_lsun_bedroom_finetune_128.yaml"),
                                    "--pretrained_model_name_or_path", str(converted),
                                    "--output_dir", str(tmp_path / "out")])
    check_training_inputs(config)
    assert config.resolution == 128 and config.learn_sigma is True and config.vlb_weight == 0.001
    assert config.learning_rate == 1e-4 and config.train_batch_size * config.gradient_accumulation_steps == 128
    assert config.model_config_name_or_path is None  # the architecture is the pretrained model's


def test_saved_config_has_no_token_and_round_trips(tmp_path):
    config = parse_training_config(["--hub_token", "hf_secret_value", "--max_train_steps", "5"])
    config.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "hf_secret_value" not in text and "hub_token" not in text
    again = parse_training_config(["--config", str(tmp_path / "config.yaml")])
    assert again.to_dict() == config.to_dict()
    assert isinstance(yaml.safe_load(text), dict)


def test_a_saved_config_reused_for_a_new_run_neither_resumes_nor_pushes_into_the_old_one(tmp_path):
    old = parse_training_config(["--output_dir", "runs/bedroom-a", "--push_to_hub",
                                 "--resume_from_checkpoint", "checkpoint-6"])
    assert old.hub_model_id == "bedroom-a"  # by default the output folder's name
    old.save(tmp_path / "config.yaml")
    new = parse_training_config(["--config", str(tmp_path / "config.yaml"), "--output_dir", "runs/bedroom-b"])
    assert new.resume_from_checkpoint is None and new.hub_model_id == "bedroom-b"
    chosen = parse_training_config(["--output_dir", "runs/a", "--push_to_hub", "--hub_model_id", "me/bedrooms"])
    chosen.save(tmp_path / "chosen.yaml")
    again = parse_training_config(["--config", str(tmp_path / "chosen.yaml"), "--output_dir", "runs/b"])
    assert again.hub_model_id == "me/bedrooms"  # a repo the user named stays


def test_num_epochs_on_the_command_line_wins_over_a_files_step_count(tmp_path):
    """diffusers' script has --num_epochs only: given, it sets the length even where the file sets steps."""
    (tmp_path / "config.yaml").write_text("max_train_steps: 100000\nnum_epochs: 1\n")
    by_epochs = parse_training_config(["--config", str(tmp_path / "config.yaml"), "--num_epochs", "3"])
    assert by_epochs.max_train_steps is None and by_epochs.num_epochs == 3
    both = parse_training_config(["--config", str(tmp_path / "config.yaml"), "--num-epochs", "3",
                                  "--max_train_steps", "7"])
    assert both.max_train_steps == 7
    assert parse_training_config(["--config", str(tmp_path / "config.yaml")]).max_train_steps == 100000


def test_the_lr_schedules_are_those_diffusers_script_offers():
    with pytest.raises(InputError, match="--lr_scheduler"):
        parse_training_config(["--lr_scheduler", "piecewise_constant"])  # it needs step rules no option gives
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"):
        assert parse_training_config(["--lr_scheduler", name]).lr_scheduler == name


def test_a_config_that_is_a_folder_or_missing_is_one_sentence(tmp_path):
    with pytest.raises(InputError, match="--config .*: is a directory"):
        parse_training_config(["--config", str(tmp_path)])
    with pytest.raises(InputError, match="--config .*: no such file or directory"):
        parse_training_config(["--config", str(tmp_path / "missing.yaml")])


def test_wandb_logging_without_wandb_installed_is_refused(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    config = parse_training_config(["--logger", "wandb", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="--logger wandb needs the wandb package"):
        check_training_inputs(config)


def test_every_option_has_a_default():
    assert TrainingConfig().output_dir
