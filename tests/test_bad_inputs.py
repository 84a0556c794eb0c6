"""A corpus of the inputs real folders contain, built here, run through ingest → validate → preprocess.

Each item ends either converted into data/processed as 8-bit RGB or quarantined with a reason that names
what is wrong with it; no stage crashes and the source files are never touched.

Invalid UTF-8 in a caption file: the image is rejected with the reason (decoding with replacement
characters would train the text encoder on garbage tokens).
"""

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.contracts.paths import Paths
from pipeline.contracts.records import QUARANTINE
from pipeline.contracts.shards import image_bytes
from pipeline.core.params_file import parse_params
from pipeline.stages.ingest import ingest
from pipeline.stages.preprocess import preprocess
from pipeline.stages.validate import validate

from .conftest import tree_hashes

SIDE = 64  # large enough for the near-duplicate hash (validate.near_duplicate_min_side)
RED, BLUE = (220, 30, 30), (30, 30, 220)


def pattern(seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """Random colour blocks: never blank, and unlike any other seed's pattern."""
    blocks = np.random.default_rng(seed).integers(20, 236, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def noise(seed: int) -> Image.Image:
    """Incompressible pixels: cutting the file short is sure to cut the pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (with a correct CRC) declares another size: a decompression bomb."""
    data = bytearray(encoded(pattern(90, (8, 8)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def sixteen_bit() -> Image.Image:
    """A 16-bit grey ramp, 0 at the left to 65535 at the right: 8-bit RGB must keep the ramp."""
    ramp = np.tile(np.linspace(0, 65535, SIDE), (SIDE, 1)).astype(np.uint16)
    return Image.fromarray(ramp)


def exif_rotated() -> bytes:
    """Stored 64×32, red left half, blue right; orientation 6 shows it 32×64 with red on top."""
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = pattern(7).quantize(colors=8)
    return encoded(image, "PNG", transparency=0)


def rgba() -> bytes:
    image = pattern(8).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((SIDE, SIDE)))
    return encoded(image, "PNG")


CORPUS = {  # file name -> bytes; captions come from sidecar .txt files below
    "zero.png": b"",
    "truncated.png": encoded(noise(1), "PNG")[:4000],
    "truncated.jpg": encoded(noise(2), "JPEG", quality=95)[:4000],
    "text.jpg": b"this is a text file, not a JPEG\n",
    "deep16.png": encoded(sixteen_bit(), "PNG"),
    "cmyk.jpg": encoded(pattern(16).convert("CMYK"), "JPEG", quality=95),
    "palette.png": palette_with_transparency(),
    "rgba.png": rgba(),
    "grey.png": encoded(pattern(3).convert("L"), "PNG"),
    "exif.jpg": exif_rotated(),
    "tiny.png": encoded(pattern(4, (1, 1)), "PNG"),
    "float.tif": encoded(pattern(17).convert("F"), "TIFF"),
    "bomb.png": png_claiming(40000, 40000),
    "same a.png": encoded(pattern(5), "PNG"),
    "same b.png": encoded(pattern(5), "PNG"),
    "near.png": encoded(pattern(6, (128, 128)), "PNG"),
    "near.jpg": encoded(pattern(6, (128, 128)), "JPEG", quality=90),
    "bad caption.png": encoded(pattern(10), "PNG"),
    "empty caption.png": encoded(pattern(11), "PNG"),
    "long caption.png": encoded(pattern(12), "PNG"),
    "été à Zürich.png": encoded(pattern(13), "PNG"),
    "plain 1.png": encoded(pattern(14), "PNG"),
    "plain 2.png": encoded(pattern(15), "PNG"),
}
CAPTIONS = {"bad caption.txt": b"caf\xe9 \xff", "empty caption.txt": b"", "long caption.txt": b"a" * 5000}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for name, data in CORPUS.items() | CAPTIONS.items():
        (images / name).write_bytes(data)
    for name in CORPUS:
        if name not in ("bad caption.png", "empty caption.png", "long caption.png"):
            (images / name).with_suffix(".txt").write_text(f"a photo named {name}", encoding="utf-8")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(encoded(pattern(20), "PNG"))
    (images / "link.png").symlink_to(outside / "secret.png")
    before = tree_hashes(images)
    params = parse_params({
        "ingest": {"source": "folder", "folder": {"path": str(images)}},
        # Bad on purpose: half of the corpus is quarantined, and one image is an unconditional sample.
        "validate": {"max_bad_fraction": 1.0, "min_rows": 1, "max_empty_caption_share": {"folder": 0.2}},
        "preprocess": {"val_fraction": 0.5},
    })
    paths = Paths(root / "project")
    ingested = ingest(params.ingest, paths)
    validate(params.validate_, paths)
    preprocess(params.preprocess, paths)
    return paths, ingested, before, images


def fate(paths: Paths, origin: str) -> str | np.ndarray:
    """The quarantine reason of a source file, or its processed pixels."""
    quarantine = pd.read_csv(paths.validation_reports / QUARANTINE, keep_default_na=False)
    reasons = quarantine.loc[quarantine["origin"] == origin, "reason"]
    if len(reasons):
        return "; ".join(reasons)
    sample = pd.read_parquet(paths.raw / "manifest.parquet").set_index("origin").loc[origin, "id"]
    for split in ("train", "val"):
        rows = pd.read_parquet(paths.processed / split / "manifest.parquet")
        if sample in set(rows["id"]):
            with Image.open(io.BytesIO(image_bytes(paths.processed, rows[rows["id"] == sample])[0])) as image:
                assert image.mode == "RGB"
                return np.asarray(image)
    raise AssertionError(f"{origin} is neither processed nor quarantined")


@pytest.mark.parametrize(("origin", "reason"), [
    ("zero.png", "empty file (0 bytes)"),
    ("text.jpg", "not an image Pillow can open (UnidentifiedImageError)"),
    ("truncated.png", "image cannot be decoded: "),
    ("truncated.jpg", "image cannot be decoded: OSError: image file is truncated"),
    ("tiny.png", "width outside validate.min/max_width 16-8192 px: 1; height outside validate.min/max_height"),
    ("float.tif", "colour mode not in validate.allowed_modes: F"),
    ("bomb.png", "header declares more pixels than validate.max_pixels 50000000; not decoded: 1600000000"),
    ("near.png", "near-duplicate of an earlier image (dHash within validate.max_near_duplicate_distance 4 bits, "
                 "colours within validate.max_near_duplicate_colour_difference 15): near.jpg ("),
    ("bad caption.png", "caption file bad caption.txt is not UTF-8 text (invalid continuation byte at byte 3)"),
    ("long caption.png", "caption length outside validate.min/max_caption_length 1-1000 characters: 5000"),
    ("link.png", "a link that leads outside the data folder, to "),
])
def test_bad_inputs_are_quarantined_with_a_specific_reason(corpus_run, origin, reason):
    paths, *_ = corpus_run
    found = fate(paths, origin)
    assert isinstance(found, str), f"{origin} was processed, not quarantined"
    assert found.startswith(reason)


@pytest.mark.parametrize("origin", ["cmyk.jpg", "palette.png", "rgba.png", "grey.png", "exif.jpg", "deep16.png",
                                    "same a.png", "near.jpg", "empty caption.png", "été à Zürich.png"])
def test_odd_but_good_inputs_are_converted_to_8_bit_rgb(corpus_run, origin):
    paths, *_ = corpus_run
    pixels = fate(paths, origin)
    assert not isinstance(pixels, str), f"{origin} was quarantined: {pixels}"
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)


def test_conversions_keep_what_the_image_shows(corpus_run):
    paths, *_ = corpus_run
    blocks = np.asarray(pattern(16, (4, 4)), dtype=int)
    cmyk = fate(paths, "cmyk.jpg").astype(int)[4::8, 4::8]  # the centre of each of the 4×4 blocks
    assert np.abs(cmyk - blocks).max() < 25, "CMYK keeps the colours of the RGB it was made from"
    assert fate(paths, "rgba.png")[0].min() > 235, "the transparent top (alpha 0) is composited onto white"
    assert (fate(paths, "palette.png") == 255).all(axis=-1).any(), "the transparent palette entry becomes white"
    grey = fate(paths, "grey.png")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    rotated = fate(paths, "exif.jpg").astype(int)
    assert np.abs(rotated[0].mean(axis=0) - RED).max() < 30, "EXIF orientation 6 puts the red half on top"
    assert np.abs(rotated[-1].mean(axis=0) - BLUE).max() < 30


def test_a_16_bit_ramp_stays_a_ramp(corpus_run):
    paths, *_ = corpus_run
    ramp = fate(paths, "deep16.png")[..., 0].astype(int).mean(axis=0)
    assert ramp[0] < 30 and ramp[-1] > 225 and (np.diff(ramp) >= 0).all()


def test_duplicates_are_stored_once_and_reported(corpus_run):
    _, ingested, *_ = corpus_run
    assert ("same b.png", "same a.png") in ingested.duplicates


def test_rows_of_a_manifest_outside_the_root_or_missing_are_quarantined(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.png").write_bytes(encoded(pattern(30), "PNG"))
    (tmp_path / "data" / "good.png").write_bytes(encoded(pattern(31), "PNG"))
    (tmp_path / "data" / "list.csv").write_text("path,text\ngood.png,a pattern\n../secret.png,x\ngone.png,y\n")
    params = parse_params({"ingest": {"source": "manifest", "manifest": {"path": str(tmp_path / "data" / "list.csv")}},
                           "validate": {"max_bad_fraction": 1.0, "min_rows": 1}})
    paths = Paths(tmp_path / "project")
    ingest(params.ingest, paths)
    validate(params.validate_, paths)
    assert fate(paths, "../secret.png").startswith("list.csv row 2: path '../secret.png' leads outside the manifest")
    assert fate(paths, "gone.png").startswith("list.csv row 3: file not found")
    assert len(pd.read_parquet(paths.validated / "manifest.parquet")) == 1


def test_no_source_file_was_touched(corpus_run):
    paths, _, before, images = corpus_run
    assert tree_hashes(images) == before
