"""Every bad training input is refused before any work, in one sentence: `<program>: error: ...`,
exit status 2, no traceback, and no file or folder created or changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adm_reference import Spec, random_adm_state_dict
from conftest import run_cli, run_script_directly

from lsun_ddpm import cli
from lsun_ddpm.errors import InputError

SMALL32_CONFIG = {  # a UNet2DModel config with 3 levels: it takes multiples of 4 px
    "sample_size": 32, "block_out_channels": [32, 64, 128], "layers_per_block": 1, "norm_num_groups": 8,
    "attention_head_dim": 32, "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3,
}


def train(*extra: str) -> list[str]:
    """A tiny run on the test images into ./out, plus `extra` (later flags win)."""
    return ["--model_preset", "tiny16", "--train_data_dir", "IMAGES", "--output_dir", "out", "--logger", "none",
            "--gradient_accumulation_steps", "1", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2",
            *extra]


def distill(*extra: str, teacher: str = "PIPELINE", output_dir: str = "out") -> list[str]:
    return ["distill", teacher, "--output_dir", output_dir, "--train_data_dir", "IMAGES", *extra]


# (entry, argv, options file text or None, words the message must hold)
#   script: train_unconditional.py's main(argv), in-process; cli: lsun-ddpm's main(argv), in-process;
#   *-process: the same as a real process, whose whole stderr is checked for a traceback.
CASES = {
    "checkpoint limit -1": ("script", train("--checkpoints_total_limit", "-1"), None,
                            ["--checkpoints_total_limit", "at least 1", "-1"]),
    "checkpoint limit 0": ("cli", ["train", *train("--checkpoints_total_limit", "0")], None,
                           ["--checkpoints_total_limit", "at least 1"]),
    "resolution 0": ("script", train("--resolution", "0"), None, ["--resolution 0", "positive multiple of 2"]),
    "resolution -16": ("cli", ["train", *train("--resolution", "-16")], None,
                       ["--resolution -16", "positive multiple of 2"]),
    "resolution 17": ("script-process", train("--resolution", "17"), None,
                      ["--resolution 17", "tiny16", "2 levels", "multiple of 2", "e.g. 16"]),
    "resolution vs a config file": ("script", train("--model_config_name_or_path", "unet.json", "--resolution", "10"),
                                    None, ["--resolution 10", "unet.json", "3 levels", "multiple of 4"]),
    "unreadable model config": ("script", train("--model_config_name_or_path", "a-file"), None,
                                ["--model_config_name_or_path a-file", "no UNet2DModel config"]),
    "learn_sigma off for a model with v": ("script", train("--model_config_name_or_path", "sigma.json",
                                                           "--learn_sigma", "false"), None,
                                           ["sigma.json", "6 channels", "train it with --learn_sigma"]),
    "learn_sigma for a pretrained model without v": ("script", train("--pretrained_model_name_or_path", "eps_unet",
                                                                     "--learn_sigma"), None,
                                                     ["--learn_sigma", "eps_unet", "only ε", "no weights for v"]),
    "a U-Net with 5 outputs": ("script", train("--model_config_name_or_path", "five.json"), None,
                               ["five.json", "5 output channels", "predicts 3 (ε)"]),
    "pretrained and a model config": ("script", train("--pretrained_model_name_or_path", "eps_unet",
                                                      "--model_config_name_or_path", "unet.json"), None,
                                      ["--pretrained_model_name_or_path", "--model_config_name_or_path", "not both"]),
    "unreadable pretrained model": ("script-process", train("--pretrained_model_name_or_path", "a-file"), None,
                                    ["--pretrained_model_name_or_path a-file", "no UNet2DModel config"]),
    "vlb weight -1": ("cli", ["train", *train("--learn_sigma", "--vlb_weight", "-1")], None,
                      ["--vlb_weight", "0 or more", "-1"]),
    "batch size 0": ("script", train("--train_batch_size", "0"), None, ["--train_batch_size", "at least 1"]),
    "unknown yaml key": ("script", train("--config", "options.yaml"), "learnig_rate: 1e-4\n",
                         ["options.yaml", "'learnig_rate'", "did you mean learning_rate?"]),
    "yaml lr abc": ("cli-process", ["train", *train("--config", "options.yaml")], 'learning_rate: "abc"\n',
                    ["options.yaml", "learning_rate", "a number", "'abc'"]),
    "yaml list for a count": ("script", train("--config", "options.yaml"), "train_batch_size: [8, 16]\n",
                              ["options.yaml", "train_batch_size", "whole number", "[8, 16]"]),
    "yaml steps 2.5": ("script", train("--config", "options.yaml"), "max_train_steps: 2.5\n",
                       ["options.yaml", "max_train_steps", "whole number", "2.5"]),
    "yaml unknown precision": ("script", train("--config", "options.yaml"), "mixed_precision: bf61\n",
                               ["options.yaml", "mixed_precision", "'bf61'", "did you mean bf16?"]),
    "invalid yaml syntax": ("script", train("--config", "options.yaml"), "learning_rate: [1e-4\n",
                      ["options.yaml", "not valid YAML"]),
    "flag steps 2.5": ("script", train("--max_train_steps", "2.5"), None, ["--max_train_steps", "'2.5'"]),
    "misspelt flag": ("cli", ["train", *train("--learnig_rate", "1e-4")], None,
                      ["unknown option --learnig_rate", "did you mean --learning_rate?"]),
    "stray argument": ("script", train("bedrooms"), None, ["unexpected argument 'bedrooms'"]),
    "lr scheduler nonsense": ("script", train("--lr_scheduler", "nonsense"), None,
                              ["--lr_scheduler", "'nonsense'", "constant_with_warmup"]),
    "lr scheduler typo": ("cli", ["train", *train("--lr_scheduler", "cosin")], None,
                          ["--lr_scheduler", "did you mean cosine?"]),
    "beta schedule": ("script", train("--ddpm_beta_schedule", "cosine"), None, ["--ddpm_beta_schedule", "linear"]),
    "mixed precision fp8": ("script", train("--mixed_precision", "fp8"), None, ["--mixed_precision", "'fp8'"]),
    "output dir is a file": ("cli", ["train", *train("--output_dir", "a-file")], None,
                             ["--output_dir", "'a-file' is a file"]),
    "output dir inside a file": ("script", train("--output_dir", "a-file/run"), None,
                                 ["--output_dir", "'a-file' is a file"]),
    "max steps 0": ("script", train("--max_train_steps", "0"), None, ["--max_train_steps", "at least 1"]),
    "epochs 0": ("script", train("--num_epochs", "0"), None, ["--num_epochs", "at least 1"]),
    "learning rate 0": ("script", train("--learning_rate", "0"), None, ["--learning_rate", "positive"]),
    "learning rate nan": ("script", train("--learning_rate", "nan"), None, ["--learning_rate", "positive"]),
    "warm-up -1": ("script", train("--lr_warmup_steps", "-1"), None, ["--lr_warmup_steps", "0 or more"]),
    "workers -1": ("script", train("--dataloader_num_workers", "-1"), None, ["--dataloader_num_workers", "0 or more"]),
    "ema decay 1.5": ("script", train("--ema_max_decay", "1.5"), None, ["--ema_max_decay", "between 0 and 1"]),
    "adam beta 1": ("script", train("--adam_beta2", "1"), None, ["--adam_beta2", "below 1"]),
    "seed -1": ("script", train("--seed", "-1"), None, ["--seed", "-1"]),
    "more sampling steps than T": ("script", train("--ddpm_num_inference_steps", "2000"), None,
                                   ["--ddpm_num_inference_steps", "--ddpm_num_steps"]),
    "bad hub repo id": ("script", train("--push_to_hub", "--hub_model_id", "me/my model"), None,
                        ["--hub_model_id", "'me/my model'", "not a valid Hub repo id"]),
    "repo id from output dir .": ("cli", ["train", *train("--push_to_hub", "--output_dir", ".")], None,
                                  ["--hub_model_id", "--output_dir", "'.'"]),
    "existing run folder, bad option": ("script", train("--output_dir", "run", "--resume_from_checkpoint", "latest",
                                                        "--learning_rate", "-1"), None, ["--learning_rate", "-1"]),
    "existing run folder, resolution": ("cli", ["train", *train("--output_dir", "run", "--resume_from_checkpoint",
                                                                "latest", "--resolution", "9")], None,
                                        ["--resolution 9"]),
    "demo into a file": ("cli", ["demo", "--output_dir", "a-file"], None, ["--output_dir", "'a-file' is a file"]),
    "demo resolution": ("cli", ["demo", "--output_dir", "out", "--resolution", "30"], None,
                        ["--resolution 30", "small32", "multiple of 4"]),
    "demo too small for LPIPS": ("cli", ["demo", "--output_dir", "out", "--model_preset", "tiny16",
                                         "--resolution", "16"], None, ["--resolution 16", "AlexNet", "31 px"]),
    "evaluate too few samples": ("cli", ["evaluate", "run", "--num_samples", "3"], None,
                                 ["--num_samples must be at least 4", "precision/recall", "got 3"]),
    "evaluate batch size 0": ("cli", ["evaluate", "run", "--batch_size", "0"], None, ["--batch_size must be at least 1, got 0"]),
    "evaluate missing weights file": ("cli", ["evaluate", "run", "--inception_weights", "nowhere.pt"], None,
                                      ["--inception_weights 'nowhere.pt' is not a file"]),
    "evaluate stats not npz": ("cli", ["evaluate", "run", "--reference_stats", "stats.txt"], None,
                               ["--reference_stats 'stats.txt'", "must end in .npz"]),
    "evaluate stats a folder": ("cli", ["evaluate", "run", "--reference_stats", "run"], None,
                                ["--reference_stats 'run' is a folder"]),
    "evaluate run dir is a file": ("cli", ["evaluate", "run", "--run_dir", "a-file"], None,
                                   ["--run_dir", "'a-file' is a file"]),
    "evaluate a model that is not there": ("cli-process", ["evaluate", "nowhere", "--train_data_dir", "IMAGES"], None,
                                           ["cannot load the scheduler of 'nowhere'"]),
    "push a folder that is no run": ("cli", ["push", "nowhere", "--hub_model_id", "me/m", "--dry_run", "out"], None,
                                     ["nowhere"]),
    "convert-adm a checkpoint that is not there": ("cli", ["convert-adm", "nowhere.pt", "out"], None,
                                                   ["CHECKPOINT 'nowhere.pt' is not a file"]),
    "convert-adm a file that is no checkpoint": ("cli", ["convert-adm", "a-file", "out"], None,
                                                 ["a-file did not load as tensors only", "refused"]),
    "convert-adm into a busy folder": ("cli", ["convert-adm", "adm.pt", "run"], None,
                                       ["OUT_DIR 'run' is not empty and was not written by convert-adm"]),
    "convert-adm into a file": ("cli", ["convert-adm", "adm.pt", "a-file"], None, ["OUT_DIR", "'a-file' is a file"]),
    "convert-adm a flag the tensors contradict": ("cli", ["convert-adm", "adm.pt", "out", "--num_channels", "128"],
                                                  None, ["--num_channels 128 does not match the checkpoint",
                                                         "input_blocks.0.0.weight has 32 output channels"]),
    "convert-adm class-conditional": ("cli", ["convert-adm", "adm-classes.pt", "out"], None,
                                      ["class-conditional", "no class labels"]),
    "sample a training checkpoint": ("cli", ["sample", "run/checkpoint-2"], None,
                                     ["run/checkpoint-2 is a training checkpoint", "not a pipeline folder",
                                      "pass its run folder, run,", "--weights raw"]),
    "interpolate a path that is not there": ("cli", ["interpolate", "./runs/nowhere", "--seeds", "1", "2"], None,
                                             ["./runs/nowhere: no such folder", "a Hub repo id (USER/NAME)"]),
    "evaluate a folder that is no pipeline": ("cli", ["evaluate", "eps_unet", "--train_data_dir", "IMAGES"], None,
                                              ["eps_unet is a folder but no pipeline folder"]),
    "sample negative seed": ("cli", ["sample", "PIPELINE", "--seed", "-1"], None, ["--seed must be at least 0, got -1"]),
    "neighbours negative seed": ("cli", ["neighbours", "--model", "PIPELINE", "--train_data_dir", "IMAGES", "--seed",
                                         "-2"], None, ["--seed must be at least 0, got -2"]),
    # the tiny pipeline's scheduler has 1000 training timesteps
    "sample more steps than timesteps": ("cli", ["sample", "PIPELINE", "--scheduler", "ddim", "--num_inference_steps",
                                                 "1001"], None, ["1001 inference steps", "1000 timesteps"]),
    "evaluate more steps than timesteps": ("cli", ["evaluate", "PIPELINE", "--train_data_dir", "IMAGES",
                                                   "--num_inference_steps", "1001"], None,
                                           ["1001 inference steps", "--num_inference_steps 1000 or fewer"]),
    "neighbours more steps than timesteps": ("cli", ["neighbours", "--model", "PIPELINE", "--train_data_dir", "IMAGES",
                                                     "--resolution", "32", "--random_backbone", "--scheduler", "ddpm",
                                                     "--num_inference_steps", "1001"], None,
                                             ["1001 inference steps (ddpm)", "1000 timesteps"]),
    "distill 5 steps": ("cli", distill("--student_steps", "5"), None,  # 5 divides T = 1000
                        ["--student_steps 5", "power of two", "T = 1000", "1, 2, 4, 8"]),
    "distill 16 steps with T = 1000": ("cli", distill("--student_steps", "16"), None,
                                       ["--student_steps 16", "stock DDIMScheduler", "1, 2, 4, 8"]),
    "distill as many steps as the start": ("cli", distill("--student_steps", "8", "--start_steps", "8"), None,
                                           ["--student_steps 8 must be fewer than --start_steps 8"]),
    "distill a teacher of another T": ("cli", distill("--student_steps", "8", teacher="t100"), None,
                                       ["--student_steps 8", "T = 100", "1, 2, 4"]),
    "distill a teacher that is no pipeline": ("cli", distill(teacher="eps_unet"), None,
                                              ["eps_unet is a folder but no pipeline folder"]),
    "distill a v-prediction teacher": ("cli", distill(teacher="vteacher"), None,
                                       ["TEACHER vteacher predicts 'v_prediction'", "a DDPM that predicts ε",
                                        "a student that distill wrote"]),
    "distill a student to as many steps": ("cli", distill("--student_steps", "2", teacher="student2"), None,
                                           ["TEACHER student2 is a student that samples in 2 steps",
                                            "--student_steps 1 or less"]),
    "distill with a model flag": ("cli", distill("--model_preset", "tiny16"), None,
                                  ["--model_preset is not a distill flag", "its teacher's"]),
    "distill without an output folder": ("cli", ["distill", "PIPELINE", "--train_data_dir", "IMAGES"], None,
                                         ["--output_dir is required"]),
    "distill into a training run": ("cli", distill(output_dir="run"), None, ["--output_dir run holds"]),
}


def with_images(argv: list[str], folder: Path, pipeline_folder: Path | None = None) -> list[str]:
    """`argv` with IMAGES (and PIPELINE) replaced by the test images' (and the tiny pipeline's) folder."""
    paths = {"IMAGES": str(folder), "PIPELINE": str(pipeline_folder)}
    return [paths.get(arg, arg) for arg in argv]


def make_starting_state(root: Path) -> None:
    """A file where a folder might be asked for, a model config, a run folder with a checkpoint, two tiny
    guided-diffusion checkpoints (one class-conditional), and the configs of three pipelines that distill
    refuses as teachers."""
    (root / "a-file").write_bytes(b"not a folder")
    torch.save(random_adm_state_dict(Spec()), root / "adm.pt")
    torch.save(random_adm_state_dict(Spec(class_cond=True)), root / "adm-classes.pt")
    (root / "unet.json").write_text(json.dumps(SMALL32_CONFIG))
    (root / "sigma.json").write_text(json.dumps({**SMALL32_CONFIG, "out_channels": 6}))  # [ε, v]
    (root / "five.json").write_text(json.dumps({**SMALL32_CONFIG, "out_channels": 5}))
    (root / "eps_unet").mkdir()
    (root / "eps_unet" / "config.json").write_text(json.dumps(SMALL32_CONFIG))  # a U-Net folder's config
    checkpoint = root / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (root / "run" / "training_config.yaml").write_text("learning_rate: 0.0003\n")
    linear = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
    write_pipeline_configs(root / "vteacher", {**linear, "prediction_type": "v_prediction"})
    write_pipeline_configs(root / "t100", {**linear, "num_train_timesteps": 100})
    write_pipeline_configs(root / "student2", {**linear, "prediction_type": "v_prediction"})
    (root / "student2" / "distillation.json").write_text(json.dumps({"student_steps": 2}))


def write_pipeline_configs(folder: Path, scheduler_config: dict) -> None:
    """What a command reads of a pipeline folder before its weights: model_index.json and the scheduler's config."""
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **scheduler_config}))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (its Hub cache aside) with its bytes (None for a folder)."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*")) if "hf_home" not in path.relative_to(root).parts}


def run_in_process(entry: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = cli.train_main if entry == "script" else cli.main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_as_process(entry: str, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    result = (run_script_directly(cwd, *argv, own_process=True) if entry == "script-process"
              else run_cli(cwd, *argv, check=False, own_process=True))
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("entry, argv, options_file, words", [
    pytest.param(*case, id=name, marks=[pytest.mark.slow] if case[0].endswith("-process") else [])
    for name, case in CASES.items()])
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(entry, argv, options_file, words, tmp_path,
                                                            image_folder, tiny_pipeline_folder, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LSUN_DDPM_DEBUG", raising=False)
    make_starting_state(tmp_path)
    if options_file is not None:
        (tmp_path / "options.yaml").write_text(options_file)
    argv = with_images(argv, image_folder, tiny_pipeline_folder)
    before = snapshot(tmp_path)
    before_pipeline = snapshot(tiny_pipeline_folder)

    if entry.endswith("-process"):
        status, out, err = run_as_process(entry, argv, tmp_path)
    else:
        status, out, err = run_in_process(entry, argv, capsys)

    program = "train_unconditional.py" if entry.startswith("script") else f"lsun-ddpm {argv[0]}"
    assert status == 2, err[-2000:]
    assert "Traceback" not in out + err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"{program}: error: "), err[-2000:]
    for word in words:
        assert word in message
    if not entry.endswith("-process"):
        assert err.strip() == message  # one line, nothing else
    assert snapshot(tmp_path) == before  # nothing created, nothing changed
    assert snapshot(tiny_pipeline_folder) == before_pipeline


def test_debug_flag_and_variable_show_the_traceback(tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LSUN_DDPM_DEBUG", raising=False)
    bad = with_images(train("--train_batch_size", "0"), image_folder)
    with pytest.raises(InputError, match="--train_batch_size"):
        cli.main(["train", *bad, "--debug"])
    with pytest.raises(InputError, match="--train_batch_size"):
        cli.train_main(["--debug", *bad])
    monkeypatch.setenv("LSUN_DDPM_DEBUG", "1")
    with pytest.raises(InputError, match="--train_batch_size"):
        cli.train_main(bad)
    assert not (tmp_path / "out").exists()


def test_train_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lsun-ddpm train ")
    assert "--debug" in out


def test_an_unknown_command_names_the_close_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "lsun-ddpm: error: unknown command 'trian'; did you mean train?" in capsys.readouterr().err


@pytest.mark.slow
def test_a_completed_run_whose_push_fails_offline_says_how_to_push_it_and_exits_3(tmp_path, image_folder):
    result = run_script_directly(tmp_path, *with_images(train("--max_train_steps", "2", "--train_batch_size", "4",
                                                              "--push_to_hub", "--hub_model_id", "someone/bedrooms"),
                                                        image_folder),
                                 own_process=True)  # offline (HF_HUB_OFFLINE, read at import): the upload must fail
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("train_unconditional.py: error: training finished and the run is saved in out")
    assert "`lsun-ddpm push out --hub_model_id someone/bedrooms`" in message
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["optimizer_steps"] == 2
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_convert_adm_help_names_the_download_and_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert-adm", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "curl -LO https://openaipublic.blob.core.windows.net/diffusion/jul-2021/lsun_bedroom.pt" in out
    assert "lsun-ddpm convert-adm lsun_bedroom.pt adm-lsun-bedroom-256" in out and "--resblock_updown True" in out


def test_distill_into_a_folder_another_job_holds_is_refused_and_changes_nothing(tmp_path, image_folder,
                                                                              tiny_pipeline_folder, monkeypatch,
                                                                              capsys):
    from lsun_ddpm.train.run_lock import acquire_run_lock

    monkeypatch.chdir(tmp_path)
    with acquire_run_lock(tmp_path / "out"):  # as another job's lock: flock conflicts between two opens
        before = snapshot(tmp_path)
        status, _, err = run_in_process("cli", with_images(distill(), image_folder, tiny_pipeline_folder), capsys)
        assert snapshot(tmp_path) == before
    assert status == 2 and "Traceback" not in err
    assert err.strip().startswith("lsun-ddpm distill: error: out is in use by another training job")
