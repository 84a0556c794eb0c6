import numpy as np
from PIL import Image

from pipeline.image_checks import eight_bit, measure, near_duplicate_of
from pipeline.images import to_rgb

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
    assert np.asarray(eight_bit(sixteen)).tolist() == [[0, 128, 129, 255]]
    assert np.asarray(eight_bit(wide)).tolist() == [[0, 128, 255]]
    for image in (sixteen, wide):
        assert np.array_equal(np.asarray(eight_bit(image).convert("RGB")), np.asarray(to_rgb(image)))


def test_a_header_above_the_limit_is_not_decoded(tmp_path):
    properties = measure(saved(tmp_path, Image.new("RGB", (300, 200), (1, 2, 3))), 300 * 200 - 1, HASH_FROM)
    assert (properties.decodable, properties.pixels, properties.problem) == (None, 60000, "not decoded")
    assert properties.brightness is None


def test_near_duplicates_name_the_first_of_their_group():
    hashes = [0b1111, None, 0b1110, 0xFFFF_0000_0000_0000]
    assert near_duplicate_of(hashes, ["a", "b", "c", "d"], max_distance=1) == [None, None, "a (1 bits apart)", None]
    assert near_duplicate_of(hashes, ["a", "b", "c", "d"], max_distance=0) == [None] * 4
