import numpy as np
import pytest
from PIL import Image

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
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        generate(params, paths, model=str(tmp_path / "nowhere"), prompt="a red circle", out=tmp_path)


def test_unknown_registry_alias_is_explained(trained_project, tmp_path):
    params, paths = trained_project
    with pytest.raises(LookupError, match="models:/sdpipe@nobody"):
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
    with pytest.raises(ValueError, match="--scheduler 'plms'"):
        generate(params, paths, **common, out=tmp_path / "d", scheduler="plms")
