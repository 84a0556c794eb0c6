import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import InputError, NotFoundError
from pipeline.generate import generate


def test_generate_from_a_local_folder(trained_project, tmp_path):
    params, paths = trained_project
    written = generate(params, paths, model=str(paths.sd_model), prompt="a red circle", count=2, seed=5,
                       out=tmp_path, steps=2)
    assert [p.name for p in written] == ["000_seed5.png", "001_seed6.png"]
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 * 4, 32 * 4)


def test_generate_from_the_registry_champion(trained_project, tmp_path):
    params, paths = trained_project
    written = generate(params, paths, model="models:/sdpipe@champion", prompt="a blue square", count=1,
                       out=tmp_path, steps=2)
    assert Image.open(written[0]).size == (32, 32)


def test_missing_model_folder_is_named(trained_project, tmp_path):
    params, paths = trained_project
    with pytest.raises(InputError, match="not a diffusers folder"):
        generate(params, paths, model=str(tmp_path / "nowhere"), prompt="a red circle", out=tmp_path)


def test_unknown_registry_alias_is_explained(trained_project, tmp_path):
    params, paths = trained_project
    with pytest.raises(NotFoundError, match="models:/sdpipe@nobody"):
        generate(params, paths, model="models:/sdpipe@nobody", prompt="a red circle", out=tmp_path)


def test_batches_schedulers_and_negative_prompt_keep_seeds_reproducible(trained_project, tmp_path):
    params, paths = trained_project
    common = dict(model=str(paths.sd_model), prompt="a red circle", count=3, seed=1, steps=2)
    one_batch = generate(params, paths, **common, out=tmp_path / "a", batch_size=8)
    small_batches = generate(params, paths, **common, out=tmp_path / "b", batch_size=2)
    for together, apart in zip(one_batch, small_batches, strict=True):  # batch size may shift float rounding
        difference = np.abs(np.asarray(Image.open(together), dtype=int) - np.asarray(Image.open(apart), dtype=int))
        assert difference.max() <= 2, together.name
    other = generate(params, paths, **common, out=tmp_path / "c", scheduler="euler", negative_prompt="a blue square")
    assert len(other) == 3
    with pytest.raises(InputError, match="--scheduler 'plms'"):
        generate(params, paths, **common, out=tmp_path / "d", scheduler="plms")


def test_guidance_zero_is_used_not_replaced_by_the_default(trained_project, tmp_path):
    params, paths = trained_project
    common = dict(model=str(paths.sd_model), prompt="a red circle", count=1, seed=2, steps=2)
    unguided = generate(params, paths, **common, out=tmp_path / "zero", guidance=0.0)
    default = generate(params, paths, **common, out=tmp_path / "default")
    assert not np.array_equal(np.asarray(Image.open(unguided[0])), np.asarray(Image.open(default[0])))


def test_a_registry_model_is_downloaded_once_into_the_cache(trained_project, tmp_path, monkeypatch):
    from pipeline.tracking.model_source import CACHE_ENV, resolve_model

    params, paths = trained_project
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = resolve_model("models:/sdpipe@champion", params.register_, paths)
    (first / "model_index.json").touch()  # a second download would replace the folder and its files
    marker = (first / "model_index.json").stat().st_mtime_ns
    again = resolve_model("models:/sdpipe/1", params.register_, paths)
    assert again == first and first.is_relative_to(tmp_path / "cache")
    assert (again / "model_index.json").stat().st_mtime_ns == marker
    assert len(list((tmp_path / "cache" / "models" / "sdpipe").iterdir())) == 1
