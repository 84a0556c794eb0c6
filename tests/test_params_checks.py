"""params.yaml is the typed defaults, every key is described, and values that would fail late are refused when
the file is read, naming the key and what it may be."""

import pytest
from pydantic import BaseModel

from pipeline.core.config import TRAINING_TIMESTEPS, ConfigError, Params
from pipeline.core.cron import cron_problem
from pipeline.core.params_file import load_params, parse_params
from pipeline.core.section import Section

from .conftest import REPO, merge, tiny_params_dict


def _sections(section: type[Section]) -> list[type[Section]]:
    found = [section]
    for field in section.model_fields.values():
        for kind in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += _sections(kind)
    return found


def test_the_typed_defaults_are_params_yaml_key_for_key():
    assert Params().model_dump() == load_params(REPO / "params.yaml").model_dump()


def test_every_key_is_described_and_every_section_too():
    """The descriptions are the docs' parameter reference: a key is described by its description, a section by
    its docstring."""
    undescribed = [f"{section.__name__}.{name}" for section in _sections(Params)
                   for name, field in section.model_fields.items()
                   if not (field.description or "").strip() and not _is_a_section(field.annotation)]
    assert undescribed == []
    assert [section.__name__ for section in _sections(Params) if not section.__doc__] == []


def _is_a_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


@pytest.mark.parametrize(("family", "mode", "resolution", "ok"), [
    ("flux", "finetune", 40, False), ("sd3", "finetune", 24, False), ("flux", "finetune", 48, True),
    ("sd", "finetune", 40, True), ("flux", "scratch", 40, True)])
def test_the_resolution_fits_the_families_latent_patches(family, mode, resolution, ok):
    raw = merge(tiny_params_dict(), {"model": {"family": family, "mode": mode, "pretrained": "models/base"},
                                     "preprocess": {"resolution": resolution}})
    if ok:
        parse_params(raw)
        return
    with pytest.raises(ConfigError, match=rf"preprocess\.resolution: must be a multiple of 16: the pretrained VAE "
                                          rf"downsamples by 8 and model.family {family} takes 2x2 latent patches "
                                          rf"\(got {resolution}\)"):
        parse_params(raw)


def test_a_scratch_vae_with_more_levels_needs_a_larger_multiple():
    with pytest.raises(ConfigError, match=r"preprocess\.resolution: must be a multiple of 16: vae.block_out_channels' "
                                          r"4 levels downsample by 8 and model.family flux"):
        parse_params({"model": {"family": "flux"}, "vae": {"block_out_channels": [16, 32, 32, 32]},
                      "preprocess": {"resolution": 40}})
    with pytest.raises(ConfigError, match=r"preprocess\.bucket_step: must be a multiple of 16"):
        parse_params({"model": {"family": "flux", "mode": "finetune", "pretrained": "models/base"},
                      "preprocess": {"resolution": 64, "bucketing": True, "bucket_step": 8}})


@pytest.mark.parametrize("key", ["train.validation_timesteps", "evaluate.timesteps"])
@pytest.mark.parametrize("timesteps", [[1000], [-5], []])
def test_timesteps_are_training_timesteps(key, timesteps):
    from pipeline.diffusion.schedule import TRAIN_TIMESTEPS

    assert TRAINING_TIMESTEPS == TRAIN_TIMESTEPS
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}: .*must list timesteps from 0 to 999"):
        parse_params({section: {name: timesteps}})
    parse_params({section: {name: [0, 999]}})


def test_the_retrain_schedule_is_a_cron_expression():
    with pytest.raises(ConfigError, match=r"monitor\.retrain_cron: .*has 1 field: a cron expression has 5 fields, "
                                          r"minute hour day-of-month month day-of-week.*@daily.* \(got 'daily'\)"):
        parse_params({"monitor": {"retrain_cron": "daily"}})
    with pytest.raises(ConfigError, match=r"monitor\.retrain_cron: .*the hour field '24' is not 0-23"):
        parse_params({"monitor": {"retrain_cron": "0 24 * * *"}})


EXPRESSIONS = ["0 3 * * *", "@daily", "@hourly", "*/15 * * * *", "0 0 1 jan *", "0 0 * * mon-fri", "0 0 * * 7",
               "1-5/2 * * * *", "0,30 8-18 * * *", "0 0 * JAN-MAR sun", "0 0 1,15 * 1-5", "5/10 * * * *",
               "daily", "@reboot", "0 3 * *", "60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 32 * *", "0 0 * 13 *",
               "0 0 * * 8", "*/0 * * * *", "H * * * *", "1- * * * *", ",1 * * * *", "0 0 * * fri-mon2"]


def test_cron_expressions_accepted_here_are_accepted_by_prefect():
    """The check is standard cron, a subset of what Prefect's deployment takes: anything accepted here deploys."""
    from prefect._internal.schemas.validators import validate_cron_string

    for expression in EXPRESSIONS:
        try:
            validate_cron_string(expression)
            prefect_accepts = True
        except ValueError:
            prefect_accepts = False
        assert cron_problem(expression) is None if prefect_accepts else cron_problem(expression), expression


@pytest.mark.parametrize("channels", [[], [0, 8], [12, 24]])
def test_the_vae_has_levels_it_can_build(channels):
    with pytest.raises(ConfigError, match=r"vae\.block_out_channels: .*(at least 1 item|positive channel counts)"):
        parse_params({"vae": {"block_out_channels": channels}})


@pytest.mark.parametrize(("section", "low", "high", "values"), [
    ("validate", "min_width", "max_width", (100, 50)), ("validate", "min_height", "max_height", (100, 50)),
    ("validate", "min_aspect_ratio", "max_aspect_ratio", (2.0, 1.5)),
    ("validate", "min_brightness", "max_brightness", (200.0, 100.0)),
    ("validate", "min_caption_length", "max_caption_length", (20, 10)),
    ("ingest.synthetic", "min_size", "max_size", (0.9, 0.5))])
def test_a_reversed_min_max_pair_is_refused(section, low, high, values):
    raw = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node.update({low: values[0], high: values[1]})
    with pytest.raises(ConfigError, match=rf"{section}\.{low}: must be at most {section}\.{high} \({values[1]}\) "
                                          rf"\(got {values[0]}\)"):
        parse_params(raw)


def test_a_t5_longer_than_the_pipelines_take_is_refused():
    with pytest.raises(ConfigError, match=r"model\.max_sequence_length: .*less than or equal to 512"):
        parse_params({"model": {"max_sequence_length": 1024}})


@pytest.mark.parametrize(("model", "train", "message"), [
    ({"family": "flux", "lora": {"export": ["diffusers", "kohya"]}}, {},
     r"model\.lora\.export: kohya has no key layout for model\.family flux"),
    ({"lora": {"export": ["diffusers", "kohya"], "use_dora": True}}, {},
     r"model\.lora\.export: kohya with model\.lora\.use_dora"),
    ({"lora": {"export": ["kohya"]}}, {}, r"model\.lora\.export: .*must include diffusers"),
    ({"lora": {"export": ["comfy"]}}, {}, r"model\.lora\.export\.0: .*'diffusers' or 'kohya'"),
    ({}, {"optimizer": "prodigy"}, r"train\.learning_rate: 0\.001 with train\.optimizer prodigy.*set 1\.0"),
    ({}, {"optimizer": "prodigy", "learning_rate": 50.0}, r"train\.learning_rate: 50\.0 with train\.optimizer prodigy"),
])
def test_lora_exports_and_the_optimizer_are_refused_where_they_cannot_work(model, train, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(merge(tiny_params_dict(), {"model": model, "train": train}))


def test_kohya_export_dora_and_prodigy_are_accepted_where_they_work():
    for family in ("sd", "sdxl"):
        params = parse_params(merge(tiny_params_dict(), {"model": {"family": family, "lora": {
            "export": ["diffusers", "kohya", "kohya"]}}}))
        assert params.model.lora.export == ("diffusers", "kohya")
    params = parse_params(merge(tiny_params_dict(), {"model": {"family": "flux", "lora": {"use_dora": True}},
                                                      "train": {"optimizer": "prodigy", "learning_rate": 1.0}}))
    assert params.model.lora.use_dora and params.train.optimizer == "prodigy"
