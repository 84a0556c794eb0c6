import math

import pytest

from pipeline.data.buckets import beyond_widest, bucket_sizes, nearest_bucket


@pytest.mark.parametrize(("resolution", "step", "max_ratio"),
                         [(32, 8, 2.0), (64, 8, 2.0), (512, 64, 2.0), (1024, 64, 4.0)])
def test_buckets_are_step_multiples_within_the_area_and_ratio(resolution, step, max_ratio):
    buckets = bucket_sizes(resolution, step, max_ratio)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution**2
        assert 1 / max_ratio <= width / height <= max_ratio
        assert (height, width) in buckets
    ratios = [width / height for width, height in buckets]
    assert ratios == sorted(set(ratios)), "one bucket per aspect ratio, tallest first"


def test_the_stable_diffusion_buckets_at_512():
    assert bucket_sizes(512, 64, 2.0) == ((320, 640), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384),
                                          (640, 320))


def test_a_square_limit_gives_only_the_square():
    assert bucket_sizes(64, 8, 1.0) == ((64, 64),)


def test_a_two_to_one_image_goes_to_a_two_to_one_bucket():
    buckets = bucket_sizes(64, 8, 2.0)
    width, height = nearest_bucket((600, 300), buckets)
    assert (width, height) == (80, 40) and width * height <= 64 * 64
    assert nearest_bucket((300, 600), buckets) == (40, 80)
    assert nearest_bucket((500, 500), buckets) == (64, 64)


def test_the_nearest_bucket_is_nearest_in_log_ratio():
    buckets = bucket_sizes(64, 8, 2.0)
    for size in [(640, 480), (300, 500), (1000, 999), (1920, 1080)]:
        chosen = nearest_bucket(size, buckets)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(size[0] / size[1]))
        assert all(distance <= abs(math.log(w / h) - math.log(size[0] / size[1])) for w, h in buckets)


def test_a_ten_to_one_image_goes_to_the_most_elongated_bucket_and_is_beyond_it():
    buckets = bucket_sizes(64, 8, 2.0)
    assert nearest_bucket((1000, 100), buckets) == (80, 40) and beyond_widest((1000, 100), buckets)
    assert nearest_bucket((100, 1000), buckets) == (40, 80) and beyond_widest((100, 1000), buckets)
    assert not beyond_widest((200, 100), buckets) and not beyond_widest((100, 100), buckets)


def test_a_bucketed_set_encodes_per_size_and_trains_without_mixing_sizes(tmp_path):
    from pipeline.contracts.latents import load_latents
    from pipeline.stages.encode import encode
    from pipeline.stages.preprocess import preprocess
    from pipeline.stages.train import train
    from pipeline.stages.vae import vae_stage

    from .conftest import folder_project

    params, paths = folder_project(tmp_path, [(24, 20), (40, 20), (20, 40), (32, 32), (48, 24)] * 6,
                                   val_fraction=0.2, bucketing=True)
    params = params.model_copy(update={
        "vae": params.vae.model_copy(update={"steps": 4, "batch_size": 4}),
        "encode": params.encode.model_copy(update={"mirrored": True}),
        "train": params.train.model_copy(update={"steps": 6, "batch_size": 4, "validate_every": 6, "sample_every": 0,
                                                 "checkpoint_every": 6, "log_every": 3, "random_flip": True}),
    })
    preprocess(params.preprocess, paths)
    vae_stage(paths, vae=params.vae, model=params.model, preprocess=params.preprocess)
    encode(paths, encode=params.encode, model=params.model)
    cache = load_latents(paths.latents, "train")
    assert len(cache.groups) > 1 and sum(len(group) for group in cache.groups) == len(cache)
    for group in cache.groups:
        assert group.mean.shape == group.flip_mean.shape and group.mean.shape[0] == len(group)
    assert len({group.mean.shape[2:] for group in cache.groups}) == len(cache.groups)
    assert load_latents(paths.latents, "val").single_size().mean.shape[2:] == (8, 8)
    metrics = train(params, paths)
    assert math.isfinite(metrics["final_loss"]) and metrics["steps"] == 6
