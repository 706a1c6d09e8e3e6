"""The demo's overview figure: captions measured with their font, never cut and never on a figure."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsun_ddpm.demo import overview
from conftest import dark_pixels, rendered_ink


@pytest.mark.parametrize("size", [16, 64])
def test_overview_captions_are_whole_and_above_their_figures(size):
    colours = ((255, 0, 0), (0, 0, 255))
    captions = ("Fig. 2a: training images | samples from the EMA weights", "Fig. 1: raw | EMA")
    figure = overview([(caption, Image.new("RGB", (size, size), colour)) for caption, colour in zip(captions, colours)])
    pixels = np.asarray(figure)
    rows = [np.flatnonzero((pixels == colour).all(axis=2).any(axis=1)) for colour in colours]
    bands = [(0, int(rows[0][0])), (int(rows[0][-1]) + 1, int(rows[1][0]))]
    for caption, (top, bottom) in zip(captions, bands):
        # all of the caption's ink lies between the figure above and its own figure, inside the canvas
        assert dark_pixels(figure.crop((0, top, figure.width, bottom))) == rendered_ink(caption), caption


def test_figures_of_a_run_without_ema_claim_no_ema(no_ema_pipeline_folder, tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from conftest import make_image
    from lsun_ddpm import demo
    from lsun_ddpm.sample import figures

    run = tmp_path / "run"
    shutil.copytree(no_ema_pipeline_folder, run)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        make_image(rng, 16, 16).save(photos / f"{index}.png")
    monkeypatch.setattr(demo, "demo_neighbours", lambda run_dir, config, samples: Image.new("RGB", (16, 16)))
    config = SimpleNamespace(resolution=16, ddpm_num_inference_steps=2, eval_batch_size=4, seed=0,
                             train_data_dir=str(photos), use_ema=False)
    labels = []  # the labels drawn inside the figures
    side_by_side = figures.labelled_side_by_side
    monkeypatch.setattr(figures, "labelled_side_by_side",
                        lambda panels: labels.extend(label for label, _ in panels) or side_by_side(panels))
    captions = [caption for caption, _ in demo.paper_figures(run, config)]
    assert captions[0] == "Fig. 2a: training images | samples from the raw weights"
    assert labels == ["training images", "samples (raw weights, no EMA)"]
    assert not any("EMA" in caption for caption in captions)
    assert not (run / "raw_vs_ema.png").exists()


def test_the_demo_on_the_users_own_photos_writes_nothing_into_their_folder(tmp_path, monkeypatch):
    """`lsun-ddpm demo --train_data_dir MINE` trains on MINE as it is: the demo's photos (one of them named
    like the user's file here) go only into a folder of the demo's own."""
    from lsun_ddpm import cli, demo

    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (32, 32), "red").save(mine / "astronaut_0.png")
    before = {path.name: path.read_bytes() for path in mine.iterdir()}
    trained_on = []

    def train(config):
        trained_on.append(config.train_data_dir)
        return tmp_path / "out"

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "paper_figures", lambda output, config: [])
    monkeypatch.setattr(demo, "overview", lambda figures: Image.new("RGB", (8, 8)))
    cli.demo_command(["--output_dir", str(tmp_path / "out"), "--train_data_dir", str(mine)])
    assert trained_on == [str(mine)]
    assert {path.name: path.read_bytes() for path in mine.iterdir()} == before


def test_the_demo_takes_the_dashed_output_flag_as_training_does(tmp_path, monkeypatch):
    """`--output-dir` (argparse's other spelling, which the training parser takes) puts the demo's photos
    in that run's folder too, not in the default demo-run/."""
    from lsun_ddpm import cli, demo

    trained = []
    monkeypatch.setattr(demo, "train", lambda config: trained.append(config) or Path(config.output_dir))
    monkeypatch.setattr(demo, "paper_figures", lambda output, config: [])
    monkeypatch.setattr(demo, "overview", lambda figures: Image.new("RGB", (8, 8)))
    monkeypatch.chdir(tmp_path)
    cli.demo_command(["--output-dir", "mine"])
    assert trained[0].output_dir == "mine" and Path(trained[0].train_data_dir) == Path("mine") / "data"
    assert list(Path("mine/data").glob("*.png")) and not Path("demo-run").exists()
