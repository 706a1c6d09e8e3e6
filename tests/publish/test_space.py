"""The Space: its functions with a tiny model, and the real page driven in headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, make_image, offline_env
from fake_hub import without_offline_variables
from forked_process import run_forked
from lsun_ddpm.publish import app
from lsun_ddpm.errors import InputError
from lsun_ddpm.publish.app import Limits, SpaceModel, build_demo, main, offline_theme

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without Chromium the browser test fails, so that it can never silently stop running; people without
# Chromium may set this to skip it, except in CI (`CI` set), where it always runs.
SKIP_BROWSER_VARIABLE = "LSUN_DDPM_SKIP_BROWSER_TEST"


@pytest.fixture(scope="module")
def model(tiny_pipeline_folder):
    return SpaceModel(str(tiny_pipeline_folder), bf16=False)


def photo(mode="RGB", size=(40, 30)):
    return make_image(np.random.default_rng(0), *size).convert(mode)


# ---------------------------------------------------------------- the functions


def test_generate_returns_the_requested_images(model):
    progress = []
    images = model.generate(3, "dpmsolver++", 4, 5, on_progress=lambda done, total: progress.append((done, total)))
    assert len(images) == 3 and all(image.size == (16, 16) for image in images)
    assert progress[-1] == (4, 4)  # one report per denoising step
    again = model.generate(3, "dpmsolver++", 4, 5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


@pytest.mark.parametrize("arguments, message", [
    ((17, "dpmsolver++", 25, 0), "Number of images"),
    ((0, "dpmsolver++", 25, 0), "Number of images"),
    ((2, "dpmsolver++", 1001, 0), "Steps"),
    ((2, "dpmsolver++", 2.5, 0), "Steps"),
    ((2, "euler-but-wrong", 25, 0), "Sampler"),
    ((2, "ddpm", 25, -1), "Seed"),
])
def test_generate_rejects_out_of_bounds_requests_clearly(model, arguments, message):
    with pytest.raises(InputError, match=message):
        model.generate(*arguments)


def test_interpolate_between_seeds(model):
    result, strip = model.interpolate(1, 2, None, None, 300, False, 4, "slerp")
    assert len(result.frames) == 4 and result.noise_level == 300
    assert strip.size == ((4 + 2) * 16 + 8, 16)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_interpolate_accepts_photos_of_any_mode_and_size(model, mode):
    result, _ = model.interpolate(None, None, photo(mode, (50, 30)), photo(mode, (20, 64)), 0, True, 3, "ddim")
    assert 100 <= result.noise_level <= 900 and len(result.frames) == 3


def test_interpolate_rejects_bad_requests_clearly(model):
    with pytest.raises(InputError, match="photo B is missing"):
        model.interpolate(None, None, photo(), None, 300, False, 4, "slerp")
    with pytest.raises(InputError, match="Frames"):
        model.interpolate(1, 2, None, None, 300, False, 17, "slerp")
    with pytest.raises(InputError, match="Noise level"):
        model.interpolate(1, 2, None, None, 1000, False, 4, "slerp")
    with pytest.raises(InputError, match="Method"):
        model.interpolate(1, 2, None, None, 300, False, 4, "cubic")
    small = SpaceModel.__new__(SpaceModel)
    small.__dict__.update(model.__dict__, limits=Limits(max_upload_pixels=100))
    with pytest.raises(InputError, match="megapixels"):
        small.interpolate(None, None, photo(), photo(), 300, False, 4, "slerp")


def test_the_noise_level_range_is_the_models(tiny_pipeline_folder, tmp_path):
    import json

    import gradio as gr

    folder = tmp_path / "short-schedule"
    shutil.copytree(tiny_pipeline_folder, folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "num_train_timesteps": 100}))
    short = SpaceModel(str(folder), bf16=False)
    result, _ = short.interpolate(1, 2, None, None, 99, False, 2, "slerp")  # t = T-1, the noisiest step
    assert result.noise_level == 99
    demo = build_demo(short)
    slider = next(block for block in demo.blocks.values()
                  if getattr(block, "label", None) == "Noise level t (when not automatic)")
    assert (slider.minimum, slider.maximum) == (1, 99) and 1 <= slider.value <= 99
    with pytest.raises(gr.Error) as error:
        handler(demo, "run_interpolate")("two seeds", 1, 2, None, None, 150, False, 2, "slerp")
    assert "Noise level t must be a whole number from 1 to 99, got 150" in error.value.message


# What README.md ("Publish: model repo and Space") promises of the Space.
PROMISED = dict(queue_size=16, concurrency=1, sampler="dpmsolver++", steps=25, max_file_size="20mb",
                max_upload_side=4096)
# CSS generic families: always the browser's own fonts, never a download.
GENERIC_FONT_FAMILIES = {"serif", "sans-serif", "monospace", "system-ui", "ui-serif", "ui-sans-serif", "ui-monospace"}


def test_the_app_has_a_bounded_queue_and_no_remote_fonts(model):
    demo = build_demo(model)
    assert demo._queue.max_size == PROMISED["queue_size"]  # gradio has no public accessor for the queue size
    assert {fn.concurrency_limit for fn in demo.fns.values()} == {PROMISED["concurrency"]}
    theme = offline_theme().to_dict()["theme"]
    families = {family.strip() for key in ("font", "font_mono") for family in theme[key].split(",")}
    assert families <= GENERIC_FONT_FAMILIES


def test_the_space_defaults_to_dpm_solver_25_steps_and_bf16_where_supported(tiny_pipeline_folder, monkeypatch):
    values = {component["props"].get("label"): component["props"].get("value")
              for component in build_demo(SpaceModel(str(tiny_pipeline_folder))).get_config_file()["components"]}
    assert values["Sampler"] == PROMISED["sampler"] and values["Steps"] == PROMISED["steps"]

    from lsun_ddpm.sample import sampling

    for fast_hardware, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(sampling, "fast_precision_available", lambda device: fast_hardware)
        space = SpaceModel(str(tiny_pipeline_folder))  # the Space's own defaults
        seen = set()
        space.pipeline.unet.conv_out.register_forward_hook(lambda module, args, output: seen.add(args[0].dtype))
        space.generate(1, PROMISED["sampler"], 2, 0)
        assert seen == {dtype}


def test_the_space_limits_uploads_to_the_promised_size(model, tiny_pipeline_folder, monkeypatch):
    import gradio as gr

    side = PROMISED["max_upload_side"]
    result, _ = model.interpolate(None, None, Image.new("RGB", (side, side)), photo(), 300, False, 2, "slerp")
    assert len(result.frames) == 2
    with pytest.raises(InputError, match="megapixels"):
        model.interpolate(None, None, photo(), Image.new("RGB", (side + 1, side)), 300, False, 2, "slerp")

    launched, kept = {}, []
    monkeypatch.setattr(gr.Blocks, "launch", lambda demo, **options: launched.update(options))
    monkeypatch.setattr(app, "keep_freed_host_memory", kept.append)  # and not this test process's malloc
    monkeypatch.setenv("MODEL_ID", str(tiny_pipeline_folder))
    main()
    assert launched["max_file_size"] == PROMISED["max_file_size"]
    assert kept == [torch.device("cpu")]  # a CPU Space reuses its freed activations


def handler(demo, name: str):
    """The function an event of the page runs (as gradio calls it, minus the browser)."""
    return next(block_fn.fn for block_fn in demo.fns.values() if block_fn.name == name)


def test_a_non_image_upload_is_one_clear_sentence(model, tmp_path):
    import gradio as gr
    from gradio.data_classes import ImageData

    demo = build_demo(model)
    upload = next(block for block in demo.blocks.values() if getattr(block, "label", None) == "Photo A")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    with pytest.raises(gr.Error) as error:
        upload.preprocess(ImageData(path=str(notes), orig_name="notes.txt"))
    assert "Photo A: notes.txt is not an image this app can read" in error.value.message
    truncated = tmp_path / "cut.png"
    photo().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InputError, match="Photo A could not be decoded"):
        model.interpolate(None, None, Image.open(truncated), photo(), 300, False, 2, "slerp")


def test_generating_and_interpolating_share_one_queue_of_one(model):
    """The README promises one request running at a time: a limit of 1 per event would allow one of each."""
    fns = [fn for fn in build_demo(model).fns.values() if fn.name in ("run_generate", "run_interpolate")]
    assert len(fns) == 2
    assert len({fn.concurrency_id for fn in fns}) == 1 and {fn.concurrency_limit for fn in fns} == {1}


def test_an_upload_over_the_pixel_limit_is_refused_from_its_header(model, tmp_path, monkeypatch):
    import gradio as gr
    from gradio.data_classes import ImageData

    demo = build_demo(model)
    upload = next(block for block in demo.blocks.values() if getattr(block, "label", None) == "Photo A")
    side = PROMISED["max_upload_side"]
    Image.new("L", (side + 1, side)).save(tmp_path / "large.png")  # a few kB of PNG, 16.8 megapixels
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda image: decoded.append(image))
    with pytest.raises(gr.Error) as error:
        upload.preprocess(ImageData(path=str(tmp_path / "large.png"), orig_name="large.png"))
    assert f"Photo A: large.png is {side + 1}×{side}; the limit is 16.7772 megapixels" in error.value.message
    assert decoded == []  # refused before gradio decoded a pixel
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses what it takes for a decompression bomb
    photo(size=(100, 100)).save(tmp_path / "bomb.png")  # 10,000 pixels: over twice the 1,000 allowed
    with pytest.raises(gr.Error, match="bomb.png has far more than the limit"):
        upload.preprocess(ImageData(path=str(tmp_path / "bomb.png"), orig_name="bomb.png"))


@pytest.mark.parametrize("seed", [float("nan"), float("inf")])
def test_a_seed_that_is_no_number_is_one_clear_sentence(model, seed):
    import gradio as gr

    with pytest.raises(gr.Error) as error:
        handler(build_demo(model), "run_generate")(1, "dpmsolver++", 2, seed)
    assert f"Seed must be a whole number from 0 to {2**32 - 1}, got {seed}" in error.value.message


def test_two_photos_with_nothing_uploaded_is_an_error_not_seeds(model):
    import gradio as gr

    run_interpolate = handler(build_demo(model), "run_interpolate")
    with pytest.raises(gr.Error) as error:
        run_interpolate("two photos", 1, 2, None, None, 300, False, 2, "slerp")
    assert "Upload photo A and photo B first" in error.value.message


def test_requests_leave_no_file_of_their_own_and_gradio_deletes_the_rest(model, tmp_path, monkeypatch):
    import tempfile

    from gradio.route_utils import delete_files_created_by_app

    own, cache = tmp_path / "tmp", tmp_path / "gradio"
    own.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(own))
    monkeypatch.setenv("TMPDIR", str(own))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    demo = build_demo(model)
    _, grid = handler(demo, "run_generate")(2, "dpmsolver++", 2, 0)
    _, gif, _ = handler(demo, "run_interpolate")("two seeds", 1, 2, None, None, 300, False, 2, "slerp")
    assert list(own.rglob("*")) == []  # nothing left in the temp folder
    assert Image.open(grid).size == (32, 16) and Image.open(gif).format == "GIF"  # served from gradio's cache
    assert {Path(grid).parent.parent, Path(gif).parent.parent} == {cache}
    assert demo.delete_cache is not None  # gradio's sweep runs while the Space is up
    delete_files_created_by_app(demo, None)  # what the sweep (and a shutdown) does to old files
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_about_text_and_title_describe_the_actual_data_and_weights(no_ema_pipeline_folder):
    from lsun_ddpm.publish.app import about_markdown

    space = SpaceModel(str(no_ema_pipeline_folder), bf16=False)
    about = about_markdown(space)
    assert "trained on a local image folder at" in about and "LSUN" not in about
    assert "its raw training weights (it was trained without an EMA)" in about
    config = build_demo(space).get_config_file()
    assert config["title"] == "DDPM: images from a local image folder"
    assert not any("LSUN" in str(component["props"].get("value")) for component in config["components"])


def test_the_about_tab_names_a_card_only_where_there_is_one(tiny_pipeline_folder, tmp_path):
    from lsun_ddpm.publish.app import model_card_link

    assert "no model card yet" in model_card_link(str(tiny_pipeline_folder))  # a run folder before `push`
    assert "README.md" not in model_card_link(str(tiny_pipeline_folder))
    shutil.copytree(tiny_pipeline_folder, tmp_path / "pushed")
    (tmp_path / "pushed" / "README.md").write_text("---\nlicense: mit\n---\n")
    assert model_card_link(str(tmp_path / "pushed")) == "a local folder (`pushed`); its model card is its README.md"
    assert model_card_link("me/model") == "[me/model](https://huggingface.co/me/model)"


@pytest.mark.parametrize("model_id, words", [
    ("/path/that/does/not/exist", "/path/that/does/not/exist: no such folder; pass a pipeline folder"),
    ("CHECKPOINT", "is a training checkpoint (the state training resumes from), not a pipeline folder: pass its run "
                   "folder"),
])
@pytest.mark.slow
def test_a_model_id_that_is_no_pipeline_is_one_line_without_asking_the_hub(tmp_path, model_id, words):
    checkpoint = tmp_path / "run" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.bin").write_bytes(b"state")
    model_id = str(checkpoint) if model_id == "CHECKPOINT" else model_id
    # Online, with the Hub at a closed local port: a lookup would end in a connection error, not this line.
    env = without_offline_variables(offline_env(tmp_path, MODEL_ID=model_id)) | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_forked([str(REPO_ROOT / "space" / "app.py")], env, tmp_path, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"MODEL_ID={model_id}: ") and words in lines[0]


# ---------------------------------------------------------------- the page in a browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def running_space(tmp_path, tiny_pipeline_folder):
    port = free_port()
    env = offline_env(tmp_path, MODEL_ID=str(tiny_pipeline_folder), GRADIO_SERVER_NAME="127.0.0.1",
                      GRADIO_SERVER_PORT=str(port))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "space" / "app.py")], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise AssertionError(f"the app exited:\n{process.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the app did not start within 2 minutes")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture()
def chromium() -> str:
    """The browser's path; a missing browser fails the test unless the user opted out (never in CI)."""
    if CHROMIUM is not None:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser test: install Debian's chromium (.ci/run does)")
    if os.environ.get(SKIP_BROWSER_VARIABLE) == "1":
        pytest.skip(f"Debian's chromium is not installed and {SKIP_BROWSER_VARIABLE}=1")
    pytest.fail(f"Debian's chromium is not installed: `apt-get install chromium`, or set {SKIP_BROWSER_VARIABLE}=1 "
                "to skip the browser test")


@pytest.mark.slow
def test_browser_generate_then_interpolate(chromium, running_space):
    from playwright.sync_api import sync_playwright

    outside = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.on("request", lambda request: outside.append(request.url)
                if urlparse(request.url).hostname not in ("127.0.0.1", "localhost", None)
                and not request.url.startswith(("data:", "blob:")) else None)
        page.goto(running_space)

        page.get_by_role("button", name="Generate").click()
        page.locator("#samples img").first.wait_for(state="visible", timeout=120_000)
        assert page.locator("#samples img").count() >= 1

        page.get_by_role("tab", name="Interpolate").click()
        page.get_by_role("button", name="Interpolate").click()
        page.locator("#strip img").first.wait_for(state="visible", timeout=120_000)
        page.locator("#animation img").first.wait_for(state="visible", timeout=60_000)
        browser.close()
    assert outside == [], f"requests to outside hosts: {outside}"


def test_weights_are_read_from_safetensors_only(tmp_path, tiny_pipeline_folder):
    """A repo that only has pickled weights is refused, so it cannot run code on the server."""
    from safetensors.torch import load_file

    from lsun_ddpm.errors import ModelUnavailableError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelUnavailableError):
        SpaceModel(str(pickled))


def test_the_app_contacts_no_outside_host_when_it_starts_and_serves(model, monkeypatch):
    """Every connection the server process opens, at start and while serving a page, is to this machine."""
    destinations = []
    original_connect = socket.socket.connect

    def recording_connect(sock, address):
        destinations.append(address)
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and "/" not in host:
            raise OSError(f"blocked outside connection to {address}")
        return original_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    demo = build_demo(model)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, theme=offline_theme(),
                ssr_mode=False, quiet=True)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "fonts.googleapis" not in page
    finally:
        demo.close()
    outside = [a for a in destinations if isinstance(a, tuple) and a[0] not in ("127.0.0.1", "localhost", "::1")]
    assert destinations and outside == []
