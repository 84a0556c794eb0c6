import pytest

from pipeline.core.config import ConfigError, EvaluateParams
from pipeline.evaluation.prompts import SHAPE_PROMPTS, evaluation_prompts, prompts_from_captions


def test_the_synthetic_source_keeps_its_colour_and_shape_prompts(tmp_path):
    prompts = evaluation_prompts(EvaluateParams(), "synthetic", ["a picture of a red circle"], tmp_path)
    assert prompts == list(SHAPE_PROMPTS) and len(prompts) == 12 and prompts[0] == "a red circle"


def test_validation_captions_give_the_most_frequent_in_alphabetical_order_then_the_empty_prompt(tmp_path):
    captions = ["a cat"] * 3 + ["a dog"] * 5 + ["a bird"] * 4 + ["a fish"] + [""] * 6
    params = EvaluateParams(max_prompts=3)
    assert evaluation_prompts(params, "folder", captions, tmp_path) == ["a bird", "a cat", "a dog", ""]


def test_ties_are_broken_by_caption_hash_not_by_order_or_what_else_is_there():
    unique = [f"caption {i}" for i in range(40)]
    chosen = prompts_from_captions(unique, 5)
    assert chosen == prompts_from_captions(list(reversed(unique)), 5)  # the order captions come in is irrelevant
    assert len(chosen) == 6 and chosen[-1] == ""
    assert set(chosen) <= set(prompts_from_captions(unique, 10))  # a larger budget only adds prompts
    assert chosen[:-1] != sorted(unique)[:5]  # not simply the first names alphabetically


def test_a_prompts_file_wins_for_any_source(tmp_path):
    (tmp_path / "prompts.txt").write_text("a handwritten digit seven\n\n  a red circle  \n")
    params = EvaluateParams(prompts="prompts.txt")
    for source in ("synthetic", "folder"):
        assert evaluation_prompts(params, source, ["x"], tmp_path) == ["a handwritten digit seven", "a red circle"]


@pytest.mark.parametrize(("content", "message"), [(None, "does not exist"), ("\n \n", "holds no prompt")])
def test_a_missing_or_empty_prompts_file_is_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / "prompts.txt").write_text(content)
    with pytest.raises(ConfigError, match=f"evaluate.prompts: .*prompts.txt {message}"):
        evaluation_prompts(EvaluateParams(prompts="prompts.txt"), "folder", [], tmp_path)
