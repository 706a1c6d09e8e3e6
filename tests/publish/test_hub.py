"""Publishing: the model card, the exact upload folder, and pushes to a fake Hub on 127.0.0.1."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, SpaceCard
from PIL import Image

from adm_reference import Spec, random_adm_state_dict
from conftest import REPO_ROOT, offline_env, read_summary, run_training
from fake_hub import FakeHub
from forked_process import run_forked
from lsun_ddpm.publish.card import build_model_card
from lsun_ddpm.publish.upload import prepare_upload, push_run
from lsun_ddpm.publish.space_upload import push_space

TOKEN = "hf_FakeTokenForTests0123456789abcdef"


@pytest.fixture()
def run_folder(tmp_path, tiny_pipeline_folder):
    """A run folder as training leaves it: pipeline, raw weights, config, summary, grid, plus local-only files."""
    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline_folder, run)
    (run / "training_config.yaml").write_text(yaml.safe_dump({
        "dataset_name": "pcuenq/lsun-bedrooms", "train_data_dir": None, "resolution": 16, "train_batch_size": 8,
        "gradient_accumulation_steps": 16, "learning_rate": 3e-4, "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 500, "max_grad_norm": 1.0, "use_ema": True, "ema_max_decay": 0.9999,
        "random_flip": True}))
    (run / "training_summary.json").write_text(json.dumps({
        "optimizer_steps": 1234, "effective_batch_size": 256, "num_processes": 2, "mixed_precision": "bf16",
        "hardware": "2 x NVIDIA H200", "wall_time_seconds": 7384.0, "final_loss": 0.0312, "ema_decay": 0.998}))
    Image.new("RGB", (32, 32), "red").save(run / "sample_grid.png")
    (run / "checkpoint-1000").mkdir()
    (run / "checkpoint-1000" / "optimizer.bin").write_bytes(b"local only")
    (run / "logs").mkdir()
    (run / "logs" / "events").write_bytes(b"local only")
    return run


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def digest(folder):
    return hashlib.sha256(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in folder_bytes(folder).items()},
                                     sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the card


def test_card_metadata_parses_back(run_folder, tmp_path):
    build_model_card(run_folder, "someone/ddpm-bedroom").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["pcuenq/lsun-bedrooms"]
    assert {"diffusers", "ddpm", "lsun"} <= set(card.data.tags)
    assert card.data.eval_results is None  # no evaluation, no numbers


def test_card_body_tells_the_run(run_folder):
    text = build_model_card(run_folder, "someone/ddpm-bedroom").text
    repo_id = "someone/ddpm-bedroom"
    assert f'DDPMPipeline.from_pretrained("{repo_id}"' in text  # the usage snippet names the repo
    assert 'custom_pipeline="ddpm_interpolation"' in text and "DPMSolverMultistepScheduler" in text
    for fact in ("1,234", "256 (micro-batch 8 × accumulation 16 × 2 process(es))", "bf16", "2 x NVIDIA H200",
                 "2 h 3 min", "0.0312", "0.9999", "sample_grid.png", "LSUN was collected by scraping the web",
                 "may contain people", "No FID/KID evaluation"):
        assert fact in text, fact


def test_card_gives_a_resumed_runs_whole_wall_time_and_its_jobs(run_folder):
    summary = json.loads((run_folder / "training_summary.json").read_text())
    segments = [{"first_step": a, "last_step": b, "wall_time_seconds": t} for a, b, t in
                ((0, 500, 3000.0), (500, 1000, 3000.0), (1000, 1234, 1384.0))]
    (run_folder / "training_summary.json").write_text(json.dumps(summary | {"segments": segments}))
    text = build_model_card(run_folder, "someone/m").text
    assert "| wall time | 2 h 3 min, over 3 jobs (the run was resumed 2 times) |" in text


def test_a_kid_without_spread_is_shown_without_one(run_folder):
    (run_folder / "evaluation.json").write_text(json.dumps({"fid": 80.5, "kid": 0.07, "kid_std": None}))
    text = build_model_card(run_folder, "someone/m").text
    assert "| KID | 0.07 |" in text and "±" not in text


def test_card_of_a_fine_tuned_learned_variance_run_says_so(run_folder):
    plain = build_model_card(run_folder, "someone/ddpm-bedroom").text
    assert "simple loss" in plain and "hybrid loss" not in plain and "fine-tuned from" not in plain
    scheduler_file = run_folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "variance_type": "learned_range"}))
    config_file = run_folder / "training_config.yaml"
    config_file.write_text(yaml.safe_dump({**yaml.safe_load(config_file.read_text()), "vlb_weight": 0.001,
                                           "pretrained_model_name_or_path": "adm-lsun-bedroom-256"}))
    text = build_model_card(run_folder, "someone/ddpm-bedroom").text
    assert "hybrid loss ‖ε − ε_θ(x_t, t)‖² + 0.001·L_vlb" in text and "learned_range" in text
    assert "fine-tuned from `adm-lsun-bedroom-256`" in text


def test_card_has_a_model_index_when_an_evaluation_exists(run_folder, tmp_path):
    (run_folder / "evaluation.json").write_text(json.dumps({"fid": 12.5, "kid": 0.0071, "note": "50k samples"}))
    build_model_card(run_folder, "someone/ddpm-bedroom").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values == {"fid": 12.5, "kid": 0.0071}
    assert "model-index" in (tmp_path / "README.md").read_text()
    assert "| FID | 12.5 |" in card.text


def test_model_index_holds_every_metric_evaluate_writes(run_folder, tmp_path):
    (run_folder / "evaluation.json").write_text(json.dumps({
        "fid": 3.25, "kid": 0.0071, "kid_std": 0.0003, "precision": 0.66, "recall": None, "note": "measured so",
        "reference": {"data": {"dataset_name": "pcuenq/lsun-bedrooms", "train_data_dir": None}}}))
    build_model_card(run_folder, "someone/ddpm-bedroom").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {key: result.metric_value for key, result in results.items()} == {"fid": 3.25, "kid": 0.0071,
                                                                            "precision": 0.66}  # null: left out
    assert [results[key].metric_name for key in ("fid", "kid", "precision")] == ["FID", "KID", "Precision"]
    assert {(r.dataset_type, r.dataset_split) for r in results.values()} == {("pcuenq/lsun-bedrooms", "train")}
    for row in ("| FID | 3.25 |", "| KID | 0.0071 ± 0.0003 |", "| Precision | 0.66 |", "measured so"):
        assert row in card.text
    assert "| Recall |" not in card.text


def card_of_a_run_trained_with(run_folder, **options) -> ModelCard:
    """The card of `run_folder` after its training_config.yaml is changed to `options`."""
    config = yaml.safe_load((run_folder / "training_config.yaml").read_text())
    (run_folder / "training_config.yaml").write_text(yaml.safe_dump(config | options))
    return build_model_card(run_folder, "someone/m")


def test_card_of_a_local_folder_run_does_not_claim_lsun(run_folder):
    card = card_of_a_run_trained_with(run_folder, train_data_dir="/data/my_photos")
    assert card.data.datasets is None and "not on LSUN" in card.text and "LSUN bedrooms at" not in card.text
    assert not {"lsun", "bedroom"} & set(card.data.tags)
    assert "images from a local image folder at 16×16" in card.text


def test_card_of_a_hub_dataset_other_than_lsun_names_it_and_has_no_lsun_tags(run_folder):
    card = card_of_a_run_trained_with(run_folder, dataset_name="huggan/flowers-102-categories")
    assert card.data.datasets == ["huggan/flowers-102-categories"] and not {"lsun", "bedroom"} & set(card.data.tags)
    assert "model of **images from huggan/flowers-102-categories at 16×16**" in card.text
    assert "LSUN was collected" not in card.text and "not on LSUN" in card.text


def test_card_of_a_run_without_ema_says_its_samples_are_from_the_raw_weights(no_ema_pipeline_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(no_ema_pipeline_folder, run)
    Image.new("RGB", (32, 32), "red").save(run / "sample_grid.png")
    text = build_model_card(run, "someone/m").text
    assert "*Samples from the raw weights (trained without EMA)" in text
    assert "EMA weights" not in text and "decay up to" not in text and "from the exponential" not in text
    assert "| EMA | none (trained without EMA) |" in text
    assert "`unet/` holds the raw training weights, and there is no `unet_raw/`" in text


@pytest.mark.parametrize("command, flag", [("push", "--hub_model_id"), ("push-space", "--space_id"),
                                           ("push-space", "--model_id")])
def test_an_invalid_repo_id_is_refused_before_anything_is_written(run_folder, tmp_path, command, flag):
    from lsun_ddpm.cli import push_command, push_space_command
    from lsun_ddpm.errors import InputError

    ids = {"--hub_model_id": "someone/m", "--space_id": "someone/space", "--model_id": "someone/m"}
    ids[flag] = "not a/valid id!"
    flags = [item for name in ((["--hub_model_id"] if command == "push" else ["--space_id", "--model_id"]))
             for item in (name, ids[name])]
    handler, positional = (push_command, [str(run_folder)]) if command == "push" else (push_space_command, [])
    with pytest.raises(InputError, match=f"{flag} 'not a/valid id!' is not a valid Hub repo id"):
        handler([*positional, *flags, "--dry_run", str(tmp_path / "upload")])
    assert not (tmp_path / "upload").exists()


# ---------------------------------------------------------------- the upload folder


def test_dry_run_writes_exactly_the_publishable_files(run_folder, tmp_path):
    before = digest(run_folder)
    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", figures=False)
    assert sorted(folder_bytes(upload)) == sorted([
        "README.md", "ddpm_interpolation.py", "model_index.json", "sample_grid.png", "scheduler/scheduler_config.json",
        "training_config.yaml", "training_summary.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "unet_raw/config.json",
        "unet_raw/diffusion_pytorch_model.safetensors"])
    for name in ("unet/diffusion_pytorch_model.safetensors", "model_index.json", "training_config.yaml"):
        assert (upload / name).read_bytes() == (run_folder / name).read_bytes()
    assert (upload / "ddpm_interpolation.py").read_text() == (REPO_ROOT / "pipelines" / "ddpm_interpolation.py").read_text()
    assert digest(run_folder) == before  # the run folder is never changed


def test_nothing_uploaded_carries_a_local_path(run_folder, tmp_path):
    """The user's home folder and folder names stay local: paths inside the run folder become relative to it,
    others their last component; Hub ids stay as they are."""
    home = tmp_path / "home" / "alice"
    (home / "photos" / "bedrooms").mkdir(parents=True)
    config = yaml.safe_load((run_folder / "training_config.yaml").read_text())
    (run_folder / "training_config.yaml").write_text(yaml.safe_dump(config | {
        "dataset_name": "pcuenq/lsun-bedrooms", "train_data_dir": str(home / "photos" / "bedrooms"),
        "output_dir": str(run_folder), "cache_dir": str(run_folder / "hf-cache"), "logging_dir": "logs"}))
    (run_folder / "evaluation.json").write_text(json.dumps({
        "fid": 12.5, "kid": 0.007, "model": str(run_folder), "note": "measured",
        "reference": {"file": str(home / ".cache" / "lsun_ddpm" / "reference.npz"),
                      "data": {"train_data_dir": str(home / "photos" / "bedrooms"), "dataset_name": None}}}))
    before = digest(run_folder)

    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", figures=False)

    text = b"".join(folder_bytes(upload).values())
    assert str(tmp_path).encode() not in text and b"alice" not in text
    published = yaml.safe_load((upload / "training_config.yaml").read_text())
    assert (published["train_data_dir"], published["output_dir"], published["cache_dir"]) == ("bedrooms", ".",
                                                                                              "hf-cache")
    assert published["dataset_name"] == "pcuenq/lsun-bedrooms" and published["logging_dir"] == "logs"
    evaluation = json.loads((upload / "evaluation.json").read_text())
    assert evaluation["model"] == "." and evaluation["reference"]["file"] == "reference.npz"
    assert evaluation["reference"]["data"]["train_data_dir"] == "bedrooms" and evaluation["fid"] == 12.5
    assert "a local image folder" in (upload / "README.md").read_text()
    assert digest(run_folder) == before


def test_dry_run_makes_an_interpolation_strip_and_can_leave_out_raw_weights(run_folder, tmp_path):
    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", include_raw=False)
    assert (upload / "interpolation.png").is_file() and not (upload / "unet_raw").exists()
    assert "![Interpolations](interpolation.png)" in (upload / "README.md").read_text()


def test_dry_run_refuses_a_non_empty_folder_and_a_non_run(run_folder, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        prepare_upload(run_folder, tmp_path / "busy", "someone/m", figures=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        prepare_upload(tmp_path / "busy", tmp_path / "out", "someone/m")


def test_an_interrupted_dry_run_leaves_nothing_and_can_be_rerun(run_folder, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelCard, "save", interrupted)  # dies after the weights were copied, before the card
    with pytest.raises(KeyboardInterrupt):
        prepare_upload(run_folder, tmp_path / "out" / "dry", "someone/m", figures=False)
    assert list((tmp_path / "out").iterdir()) == []  # no DIR, no temporary sibling
    monkeypatch.undo()
    upload = prepare_upload(run_folder, tmp_path / "out" / "dry", "someone/m", figures=False)
    assert (upload / "README.md").is_file() and (upload / "unet_raw").is_dir()


@pytest.fixture()
def converted_folder(tmp_path):
    """A folder `convert-adm` wrote, from a tiny guided-diffusion checkpoint."""
    import torch

    from lsun_ddpm.model.adm_conversion import convert_adm

    checkpoint = tmp_path / "lsun_bedroom.pt"
    torch.save(random_adm_state_dict(Spec()), checkpoint)
    convert_adm(checkpoint, tmp_path / "converted", {"num_head_channels": 32, "image_size": 16})
    return tmp_path / "converted"


def test_a_converted_folder_is_published_with_its_own_card_and_record(converted_folder, tmp_path):
    upload = prepare_upload(converted_folder, tmp_path / "upload", "someone/adm", figures=False)
    local_card = (converted_folder / "README.md").read_text()
    assert 'DDPMPipeline.from_pretrained("path/to/this/folder")' in local_card
    # the same card, whose usage code now loads the repo
    assert (upload / "README.md").read_text() == local_card.replace("path/to/this/folder", "someone/adm")
    assert ModelCard.load(upload / "README.md").data.license == "mit"
    assert (upload / "adm_conversion.json").read_bytes() == (converted_folder / "adm_conversion.json").read_bytes()


def test_the_pipeline_files_usage_line_loads_a_published_folder(run_folder, tmp_path, monkeypatch):
    import re

    from diffusers import DiffusionPipeline

    from lsun_ddpm.pipelines import ddpm_interpolation

    documented = re.search(r'custom_pipeline="([^"]+)"', ddpm_interpolation.__doc__).group(1)
    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", figures=False)
    monkeypatch.chdir(tmp_path)  # as a user would run it: from anywhere but this repository
    pipe = DiffusionPipeline.from_pretrained(str(upload), custom_pipeline=documented, trust_remote_code=True,
                                             use_safetensors=True)
    assert type(pipe).__name__ == "DDPMInterpolationPipeline"


# ---------------------------------------------------------------- pushing to a (fake) Hub


def test_a_second_push_deletes_what_it_no_longer_uploads_and_keeps_the_users_files(run_folder, tmp_path,
                                                                                    fake_hub):
    from huggingface_hub import HfApi

    (run_folder / "evaluation.json").write_text(json.dumps({"fid": 12.5}))
    push_run(run_folder, "someone/m", TOKEN, figures=False)
    assert "unet_raw/config.json" in fake_hub.files("someone/m")
    users = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "notes.md": b"mine",
             "docs/README.md": b"mine too"}
    for path, data in users.items():
        HfApi(token=TOKEN).upload_file(path_or_fileobj=data, path_in_repo=path, repo_id="someone/m")
    (run_folder / "evaluation.json").unlink()
    push_run(run_folder, "someone/m", TOKEN, include_raw=False, figures=False)
    expected = folder_bytes(prepare_upload(run_folder, tmp_path / "dry", "someone/m", include_raw=False,
                                           figures=False))
    assert "unet_raw/config.json" not in expected and "evaluation.json" not in expected
    assert fake_hub.files("someone/m") == {**expected, **users}


def test_a_bare_repo_name_is_the_token_users_in_the_card_and_the_space(run_folder, tmp_path, fake_hub):
    from lsun_ddpm.cli import push_command

    push_command([str(run_folder), "--hub_model_id", "tiny", "--no_figures", "--dry_run", str(tmp_path / "dry")])
    assert 'DDPMPipeline.from_pretrained("tiny"' in (tmp_path / "dry" / "README.md").read_text()  # no request
    assert fake_hub.requests == []
    push_run(run_folder, "tiny", TOKEN, figures=False)
    push_space("bedrooms", "tiny", TOKEN)
    user = fake_hub.user
    assert set(fake_hub.repos) == {f"{user}/tiny", f"{user}/bedrooms"}
    card = fake_hub.files(f"{user}/tiny")["README.md"].decode()
    assert f'DDPMPipeline.from_pretrained("{user}/tiny"' in card and 'from_pretrained("tiny"' not in card
    assert fake_hub.space_variables[f"{user}/bedrooms"] == {"MODEL_ID": f"{user}/tiny"}
    (tmp_path / "SPACE.md").write_bytes(fake_hub.files(f"{user}/bedrooms")["README.md"])
    assert SpaceCard.load(tmp_path / "SPACE.md").data.models == [f"{user}/tiny"]


def cli(env, *args, cwd=None):
    return run_forked(["-m", "lsun_ddpm.cli", *args], env, cwd or Path.cwd())


@pytest.mark.slow
def test_push_uploads_the_dry_run_folder_byte_for_byte(run_folder, tmp_path):
    before = digest(run_folder)
    with FakeHub() as hub:
        env = hub.subprocess_env(offline_env(tmp_path), HF_TOKEN=TOKEN)
        result = cli(env, "push", str(run_folder), "--hub_model_id", "someone/ddpm-bedroom", "--no_figures",
                     "--private", "--commit_message", "first upload")
        assert result.returncode == 0, result.stderr[-3000:]
        dry = cli(env, "push", str(run_folder), "--hub_model_id", "someone/ddpm-bedroom", "--no_figures",
                  "--dry_run", str(tmp_path / "dry"))
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert hub.files("someone/ddpm-bedroom") == folder_bytes(tmp_path / "dry")
        assert hub.repos["someone/ddpm-bedroom"] == {"type": "model", "private": True}
        assert hub.commits[-1]["message"] == "first upload"
        assert all(header == f"Bearer {TOKEN}" for header in hub.authorization_headers)
        uploaded = b"".join(hub.files("someone/ddpm-bedroom").values())
    assert TOKEN not in result.stdout + result.stderr and TOKEN.encode() not in uploaded
    assert digest(run_folder) == before


@pytest.mark.slow
def test_push_with_hub_token_flag_and_revision(run_folder, tmp_path):
    with FakeHub() as hub:
        env = hub.subprocess_env(offline_env(tmp_path))
        result = cli(env, "push", str(run_folder), "--hub_model_id", "someone/m", "--no_figures",
                     "--hub_token", TOKEN, "--revision", "dev")
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.commits[-1]["revision"] == "dev" and "README.md" in hub.files("someone/m", revision="dev")
        assert f"Bearer {TOKEN}" in hub.authorization_headers
    assert TOKEN not in result.stdout + result.stderr


# Where huggingface_hub finds a token, in its order; a user's own must not interfere.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")


def env_with_token_from(source, hub, tmp_path):
    """A CLI environment whose only token is TOKEN, given by `source`; returns (env, extra CLI arguments)."""
    env = hub.subprocess_env(offline_env(tmp_path))
    for name in TOKEN_VARIABLES:
        env.pop(name, None)
    if source == "--hub_token":
        return env, ["--hub_token", TOKEN]
    if source == "HF_TOKEN":
        return {**env, "HF_TOKEN": TOKEN}, []
    token_file = tmp_path / "hf_home" / "token"  # where `hf auth login` stores it
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    return env, []


@pytest.mark.slow
@pytest.mark.parametrize("source, failing", [("--hub_token", "commit"), ("HF_TOKEN", "create"),
                                             ("login cache", "commit")])
def test_failed_push_is_clear_hides_the_token_and_changes_nothing(run_folder, tmp_path, source, failing):
    before = digest(run_folder)
    with FakeHub(fail_with=403, fail_on=failing) as hub:  # its error message repeats the Authorization header
        env, token_arguments = env_with_token_from(source, hub, tmp_path)
        result = cli(env, "push", str(run_folder), "--hub_model_id", "someone/m", "--no_figures", *token_arguments)
        assert hub.authorization_headers[-1] == f"Bearer {TOKEN}"  # the token was really sent, then echoed
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "could not upload" in result.stderr and "Nothing local was changed" in result.stderr
    assert "Authorization: Bearer ***" in result.stderr  # the echo arrived, masked
    assert TOKEN not in output and TOKEN[3:15] not in output and "Traceback" not in result.stderr
    assert digest(run_folder) == before


@pytest.mark.slow
def test_failed_space_variable_hides_the_token(tmp_path):
    with FakeHub(fail_with=403, fail_on="variables") as hub:
        env, _ = env_with_token_from("HF_TOKEN", hub, tmp_path)
        result = cli(env, "push-space", "--space_id", "someone/bedrooms", "--model_id", "someone/m")
    assert result.returncode != 0 and "set MODEL_ID=someone/m" in result.stderr
    assert "Authorization: Bearer ***" in result.stderr
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.slow
def test_push_space_uploads_the_app_and_sets_model_id(tmp_path):
    with FakeHub() as hub:
        env = hub.subprocess_env(offline_env(tmp_path), HF_TOKEN=TOKEN)
        result = cli(env, "push-space", "--space_id", "someone/bedrooms", "--model_id", "someone/ddpm-bedroom")
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.files("someone/bedrooms")
        assert hub.repos["someone/bedrooms"]["type"] == "space" and hub.repos["someone/bedrooms"]["sdk"] == "gradio"
        assert hub.space_variables["someone/bedrooms"] == {"MODEL_ID": "someone/ddpm-bedroom"}
    assert {"app.py", "requirements.txt", "README.md", "lsun_ddpm/publish/app.py",
            "lsun_ddpm/pipelines/ddpm_interpolation.py"} <= set(files)
    (tmp_path / "README.md").write_bytes(files["README.md"])
    card = SpaceCard.load(tmp_path / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.models == ["someone/ddpm-bedroom"] and card.data.sdk_version and card.data.short_description
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.slow
def test_push_to_hub_at_the_end_of_training(tmp_path, image_folder):
    with FakeHub() as hub:
        env_overrides = {k: v for k, v in hub.subprocess_env({}, HF_TOKEN=TOKEN).items()}
        output_dir = tmp_path / "out"
        run_training(tmp_path, output_dir, [
            "--train_data_dir", str(image_folder), "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
            "--checkpointing_steps", "100", "--save_images_steps", "100", "--save_model_steps", "100",
            "--logger", "none", "--push_to_hub", "--hub_model_id", "someone/trained"], extra_env=env_overrides)
        files = hub.files("someone/trained")
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors", "training_config.yaml",
            "interpolation.png", "ddpm_interpolation.py"} <= set(files)
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in files)
    assert files["training_summary.json"] == (output_dir / "training_summary.json").read_bytes()
    assert read_summary(output_dir)["optimizer_steps"] == 2


@pytest.mark.slow
def test_published_folder_alone_loads_the_interpolation_pipeline_without_this_package(run_folder, tmp_path):
    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", figures=False)
    script = f"""
import sys
sys.modules["lsun_ddpm"] = None  # a user with nothing but diffusers
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(upload)!r}, custom_pipeline="ddpm_interpolation",
                                         trust_remote_code=True, use_safetensors=True)
frames = pipe(seed_a=1, seed_b=2, t=50, num_frames=3, num_inference_steps=2).images
print(type(pipe).__name__, len(frames))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDPMInterpolationPipeline 3" in result.stdout


def test_nearest_neighbour_figure_is_published_and_shown_when_the_run_has_one(run_folder, tmp_path):
    Image.new("RGB", (48, 16), "blue").save(run_folder / "neighbours.png")
    (run_folder / "neighbours.json").write_text(json.dumps({"note": "searched all 3,033,042 training images"}))
    upload = prepare_upload(run_folder, tmp_path / "upload", "someone/m", figures=False)
    card = (upload / "README.md").read_text()
    assert (upload / "neighbours.png").read_bytes() == (run_folder / "neighbours.png").read_bytes()
    assert "![Nearest neighbours](neighbours.png)" in card and "searched all 3,033,042" in card
