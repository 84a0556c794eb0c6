import io
import re

from PIL import Image

from pipeline.data.shapes import COLOURS, SHAPES, render_samples
from pipeline.evaluation.shape_adherence import Reading, read_image


def test_rendering_is_deterministic():
    first = [s.png for s in render_samples(count=20, resolution=32, seed=3)]
    again = [s.png for s in render_samples(count=20, resolution=32, seed=3)]
    other = [s.png for s in render_samples(count=20, resolution=32, seed=4)]
    assert first == again
    assert first != other


def test_captions_name_colour_and_shape_and_cover_every_pair():
    samples = list(render_samples(count=400, resolution=32, seed=0))
    for sample in samples:
        assert re.search(rf"\ba {sample.colour} {sample.shape}\b", sample.caption)
    assert {(s.colour, s.shape) for s in samples} == {(c, s) for c in COLOURS for s in SHAPES}


def test_images_have_the_requested_size_and_a_light_background():
    for sample in render_samples(count=10, resolution=48, seed=1):
        image = Image.open(io.BytesIO(sample.png)).convert("RGB")
        assert image.size == (48, 48)
        assert min(image.getpixel((0, 0))) >= 200 or min(image.getpixel((47, 47))) >= 200


def test_adherence_reader_agrees_with_ground_truth():
    samples = list(render_samples(count=600, resolution=32, seed=11))
    readings = [read_image(Image.open(io.BytesIO(s.png))) for s in samples]
    colour_hits = sum(r.colour == s.colour for r, s in zip(readings, samples))
    shape_hits = sum(r.shape == s.shape for r, s in zip(readings, samples))
    assert colour_hits / len(samples) >= 0.99
    assert shape_hits / len(samples) >= 0.97


def test_blank_image_reads_as_nothing():
    assert read_image(Image.new("RGB", (32, 32), (240, 240, 240))) == Reading(None, None)


def test_wrong_colour_is_not_read_as_prompted():
    red_square = Image.new("RGB", (32, 32), (240, 240, 240))
    red_square.paste((220, 30, 30), (8, 8, 24, 24))
    assert read_image(red_square) == Reading("red", "square")
