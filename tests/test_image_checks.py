import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.data.images import to_rgb
from pipeline.quality.image_checks import measure
from pipeline.quality.near_duplicates import near_duplicate_of, near_duplicate_pairs

from .conftest import REPO

LIMIT, HASH_FROM = 50_000_000, 64


def saved(tmp_path, image: Image.Image, name: str = "image.png"):
    image.save(tmp_path / name)
    return tmp_path / name


def test_colour_on_a_grey_of_the_same_brightness_is_not_blank_but_a_plain_image_is(tmp_path):
    blue_on_grey = Image.new("RGB", (32, 32), (52, 52, 52))
    blue_on_grey.paste((30, 30, 220), (8, 8, 24, 24))  # the grey level of this blue is 52 too
    assert measure(saved(tmp_path, blue_on_grey), LIMIT, HASH_FROM).contrast > 30
    assert measure(saved(tmp_path, Image.new("RGB", (32, 32), (90, 90, 90)), "plain.png"), LIMIT, HASH_FROM).contrast == 0


def test_a_16_bit_image_is_measured_on_its_full_range(tmp_path):
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16))
    properties = measure(saved(tmp_path, ramp), LIMIT, HASH_FROM)
    assert properties.mode == "I;16" and 120 < properties.brightness < 135


def test_validate_measures_integer_images_as_preprocess_converts_them():
    sixteen = Image.fromarray(np.array([[0, 33024, 33025, 65535]], dtype=np.uint16))  # 257 x 128.498, 128.502
    wide = Image.fromarray(np.array([[-100_000, 0, 100_000]], dtype=np.int32))  # mode I beyond 16 bits: stretched
    assert np.asarray(to_rgb(sixteen))[..., 0].tolist() == [[0, 128, 129, 255]]
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == [[0, 128, 255]]


def test_a_cut_out_is_measured_on_white_as_preprocess_trains_it(tmp_path):
    """Transparent pixels are often black underneath: measured as they are stored, a red cut-out on a large
    transparent background would look dark; trained on, its background is white."""
    pixels = np.zeros((32, 32, 4), np.uint8)
    pixels[8:24, 8:24] = (220, 30, 30, 255)
    properties = measure(saved(tmp_path, Image.fromarray(pixels, "RGBA")), LIMIT, HASH_FROM)
    trained = np.asarray(to_rgb(Image.fromarray(pixels, "RGBA")).convert("L"), dtype=np.float64)
    assert properties.brightness == pytest.approx(trained.mean()) and properties.brightness > 180


def test_a_header_above_the_limit_is_not_decoded(tmp_path):
    properties = measure(saved(tmp_path, Image.new("RGB", (300, 200), (1, 2, 3))), 300 * 200 - 1, HASH_FROM)
    assert (properties.decodable, properties.pixels, properties.problem) == (None, 60000, "not decoded")
    assert properties.brightness is None


def shapes(colour: tuple[int, int, int]) -> Image.Image:
    """A grey ground with a circle of `colour` and two fixed shapes: the layout of a look-alike set."""
    image = Image.new("RGB", (96, 96), (160, 160, 160))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 50, 40, 88), fill=(240, 200, 40))
    draw.polygon([(60, 90), (76, 60), (92, 90)], fill=(30, 30, 30))
    draw.ellipse((30, 10, 70, 50), fill=colour)
    return image


def test_a_re_encoded_copy_is_a_near_duplicate_but_a_colour_look_alike_is_not(tmp_path):
    red, green = (200, 40, 40), (40, 122, 40)  # the same grey level (ITU-R 601 luma 88)
    shapes(red).save(tmp_path / "red.png")
    shapes(red).save(tmp_path / "red.jpg", quality=60)
    shapes(green).save(tmp_path / "green.png")
    paths = [tmp_path / name for name in ("red.png", "red.jpg", "green.png")]
    hashes = [measure(path, LIMIT, HASH_FROM).dhash for path in paths]
    assert all(bin(hashes[0] ^ other).count("1") <= 4 for other in hashes[1:]), "the grey hash cannot tell them apart"
    found = near_duplicate_of(hashes, paths.__getitem__, ["red.png", "red.jpg", "green.png"], max_distance=4,
                              max_colour_difference=15, max_pixels=LIMIT)
    assert found[0] is None and found[2] is None
    assert found[1].startswith("red.png (") and "colour difference" in found[1]


def test_near_duplicates_name_the_first_of_their_group(tmp_path):
    for name in "abcd":
        shapes((200, 40, 40)).save(tmp_path / f"{name}.png")
    paths = [tmp_path / f"{name}.png" for name in "abcd"]
    hashes = [0b1111, None, 0b1110, 0xFFFF_0000_0000_0000]
    found = near_duplicate_of(hashes, paths.__getitem__, list("abcd"), max_distance=1, max_colour_difference=15, max_pixels=LIMIT)
    assert found == [None, None, "a (1 bits apart, colour difference 0.0)", None]
    assert near_duplicate_of(hashes, paths.__getitem__, list("abcd"), 0, 15, LIMIT) == [None] * 4


@pytest.mark.parametrize("max_distance", [0, 1, 4, 7, 12])
def test_the_index_finds_exactly_the_pairs_an_all_pairs_scan_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**64, 1500, dtype=np.uint64)
    # near copies with 0 to 14 bits flipped, and exact repeats, so every distance occurs
    flips = [sum(1 << int(bit) for bit in rng.choice(64, rng.integers(0, 15), replace=False)) for _ in range(500)]
    copies = hashes[rng.integers(0, 1500, 500)] ^ np.array(flips, dtype=np.uint64)
    hashes = np.concatenate([hashes, copies, hashes[:20]])
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    first, second = np.nonzero(np.triu(distances <= max_distance, k=1))  # all pairs, row by row
    expected = sorted(zip(first.tolist(), second.tolist(), strict=True))
    assert len(expected) >= 20
    assert sorted(map(tuple, near_duplicate_pairs(hashes, max_distance).tolist())) == expected


def test_near_duplicate_bench_runs_and_validate_beats_the_grey_hash_on_its_labelled_set():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "near_duplicates.py"), "--groups", "10", "--sizes", "1000"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    scores = [tuple(map(float, found)) for found in re.findall(r"precision ([\d.]+) .*?recall ([\d.]+)", done.stdout)]
    (precision, recall), (grey_precision, _) = scores
    assert precision >= 0.95 and recall >= 0.9, done.stdout
    assert precision > grey_precision + 0.2, "the colour-aware confirmation must reject look-alikes the grey hash flags"
