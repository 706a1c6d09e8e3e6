"""The demo's overview figure: captions measured with their font, never cut and never on a figure."""

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
