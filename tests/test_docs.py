"""The documentation is checked like the code: the site builds strictly, the reference pages come from the code,
the README's links resolve, and the tutorials' commands run.

How a page's fenced blocks are treated (docs/**/*.md and README.md):

- A `bash` or `python` block of a page in RUNS is run, top to bottom, in a fresh committed copy of this repository
  (tests/test_pipeline_e2e.py's copy_repository) on tiny params, in the project folder, with the virtualenv's
  commands first on PATH and `.venv` linked to it. A bash block runs under `set -euo pipefail`; a failing
  command fails the test with the block and its output. A block the same as one already run in the project
  on the same params (the README repeats the first run's) is not run again.
- `<!-- not run: REASON -->` on the line right before a block: the block is not run. The reason says why (it needs
  a GPU, the network, long-running servers, minutes at full size) and, where one exists, which test runs the same.
- `<!-- params.yaml -->` right before a `yaml` block: the block is merged into the project's params.yaml (nested
  keys over the current ones), then TINY's sizes are applied again and the result must be valid parameters. So
  every setting a tutorial tells you to write is checked, even in a page whose commands are not run.
- Any other block (`yaml` without the marker, `text`, output) is an illustration and is not run.

What a reader brings (their own pictures, a downloaded base model) is written by STAND_INS before the page runs.
Every bash and python block of a page in RUNS is run or says why not; every tutorial and getting-started page, and
the README, is in RUNS.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.params_file import parse_params, read_params_file

from .conftest import REPO, TEAM_OVERRIDES, merge, save_random_base_model, tiny_params_dict, write_pattern
from .test_pipeline_e2e import copy_repository

DOCS = REPO / "docs"
RUNNABLE = ("bash", "python")
# The sizes every run of a page is cut down to, applied again after each params.yaml block of the page.
TINY = merge(TEAM_OVERRIDES, {
    "preprocess": {"resolution": 32},
    "train": {"warmup_steps": 2, "batch_size": 16, "prior": {"num_class_images": 16, "num_inference_steps": 2}},
    "evaluate": {"samples_per_prompt": 1, "stability_repeats": 2, "timesteps": [100, 900]},
})
# The pages run in one project, in this order; each tuple gets its own fresh copy of the repository.
RUNS = (
    ("tutorials/shapes-from-scratch.md", "getting-started/first-run.md", "README.md"),
    ("tutorials/finetune-your-images.md",),
    ("tutorials/labelled-digits.md",),
    ("tutorials/retraining-loop.md",),
    ("tutorials/team-stack.md",),
    ("getting-started/install.md",),
)


def _page_path(page: str) -> Path:
    return REPO / page if page == "README.md" else DOCS / page


def fenced_blocks(page: str) -> list[dict]:
    """Each fenced block of a page: its language, its text and the HTML comment right before it, if any."""
    lines = _page_path(page).read_text(encoding="utf-8").split("\n")
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"\s*```(\w*)", lines[index])
        if not opening:
            index += 1
            continue
        indent = len(lines[index]) - len(lines[index].lstrip())
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        before = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = re.fullmatch(r"<!--\s*(.*?)\s*-->", before)
        blocks.append({"language": opening.group(1), "text": "\n".join(line[indent:] for line in lines[index + 1:end]),
                       "marker": marker.group(1) if marker else "", "line": index + 1})
        index = end + 1
    return blocks


def _not_run_reason(block: dict) -> str | None:
    match = re.fullmatch(r"not run:\s*(.*)", block["marker"])
    return match.group(1) if match else None


# --- stand-ins for what a reader brings -------------------------------------------------------------------------

def _your_pictures_and_a_base_model(project: Path) -> None:
    """20 JPEGs of the product (no captions: the tutorial's instance prompt captions them) and a tiny random SD
    pipeline where the reader's go."""
    for seed in range(20):
        write_pattern(project / "data" / "my-product" / f"{seed:02d}.jpg", seed, (48, 40), fmt="JPEG")
    save_random_base_model(project / "data" / "base-model")


STAND_INS = {"tutorials/finetune-your-images.md": _your_pictures_and_a_base_model}


# --- running a page ---------------------------------------------------------------------------------------------

def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _merge_params(project: Path, block: dict, page: str) -> None:
    settings = merge(merge(read_params_file(project / "params.yaml"), yaml.safe_load(block["text"])), TINY)
    parse_params(settings, f"{page} line {block['line']}")
    (project / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))


def _run_block(project: Path, block: dict, page: str) -> None:
    command = (["bash", "-euo", "pipefail", "-c", block["text"]] if block["language"] == "bash"
               else [sys.executable, "-c", block["text"]])
    done = subprocess.run(command, cwd=project, env=_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"{page} line {block['line']}: the block failed ({done.returncode}):\n{block['text']}"
                                  f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def _steps(pages: tuple[str, ...]) -> list[tuple[str, dict]]:
    return [(page, block) for page in pages for block in fenced_blocks(page)
            if (block["language"] in RUNNABLE and _not_run_reason(block) is None) or block["marker"] == "params.yaml"]


def test_every_tutorial_and_getting_started_page_and_the_readme_is_run():
    pages = {str(path.relative_to(DOCS)) for folder in ("tutorials", "getting-started")
             for path in (DOCS / folder).glob("*.md")} | {"README.md"}
    assert pages == {page for run in RUNS for page in run}


@pytest.mark.parametrize("pages", RUNS, ids=[run[0] for run in RUNS])
def test_each_block_is_run_or_says_why_not(pages):
    for page in pages:
        for block in fenced_blocks(page):
            reason = _not_run_reason(block)
            assert reason != "", f"{page} line {block['line']}: `not run:` needs a reason"
            if block["marker"] == "params.yaml":
                assert block["language"] == "yaml", f"{page} line {block['line']}: params.yaml marks a yaml block"
            elif block["marker"] and reason is None:
                pytest.fail(f"{page} line {block['line']}: unknown marker {block['marker']!r}")


@pytest.mark.e2e
@pytest.mark.parametrize("pages", RUNS, ids=[run[0] for run in RUNS])
def test_the_pages_commands_run_on_tiny_params(pages, tmp_path):
    steps = _steps(pages)
    if not steps:
        pytest.skip(f"every block of {', '.join(pages)} says why it is not run")
    project = copy_repository(tmp_path, merge(tiny_params_dict(), TINY))
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the pages' `.venv/bin/...` commands
    for page in pages:
        if page in STAND_INS:
            STAND_INS[page](project)
    already_run = set()
    for page, block in steps:
        if block["marker"] == "params.yaml":
            _merge_params(project, block, page)
            already_run.clear()
        elif block["text"] not in already_run:
            _run_block(project, block, page)
            already_run.add(block["text"])


# --- the README --------------------------------------------------------------------------------------------------

def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    targets = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in target]
    assert targets, "the README links into docs/"
    assert [target for target in targets if not (REPO / target).is_file()] == []


def test_the_readme_shows_what_make_run_prints():
    printed = next(block["text"] for block in fenced_blocks("README.md") if block["text"].startswith("model:"))
    recipe = (REPO / "Makefile").read_text(encoding="utf-8").split("\nrun:", 1)[1].split("\n\n", 1)[0]
    for line in printed.splitlines():
        assert line.split(":")[0] + ":" in recipe, f"make run prints no {line.split(':')[0]!r} line"


# --- the reference pages, generated from the code ----------------------------------------------------------------

def _reference():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaf_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        if isinstance(value, dict) and not key.startswith("max_empty_caption_share"):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_the_params_page_lists_every_key_with_its_description():
    from pipeline.core.config import Params

    reference = _reference()
    page = reference.params_page()
    for key in _leaf_keys(read_params_file(REPO / "params.yaml")):
        assert f"| `{key}` |" in page, f"params.yaml's {key} is not on the page"
    for row in reference.params_rows(Params):
        if "section" not in row and row["description"]:
            line = next(line for line in page.splitlines() if line.startswith(f"| `{row['key']}` |"))
            assert line.rstrip(" |").endswith(reference._cell(row["description"])), line


def test_the_params_page_says_what_a_change_re_runs():
    page = _reference().params_page()
    row = {line.split("|")[1].strip(): line.split("|")[5].strip()
           for line in page.splitlines() if line.startswith("| `")}
    assert row["`train.learning_rate`"] == "train, evaluate, register"
    assert row["`preprocess.resolution`"] == "preprocess, vae, encode, train, evaluate, register"
    assert row["`ingest.source`"] == "every stage"
    assert row["`ray.num_cpus`"] == "none"


def test_the_command_page_lists_every_command_and_option():
    import argparse

    from pipeline.cli import build_parser

    page = _reference().cli_page()
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        section = page.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert (action.option_strings or [action.dest])[0] in section, f"sdpipe {name}: {action.dest}"


def test_the_stages_page_follows_dvc_yaml():
    page = _reference().stages_page()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert f"\n## {name}\n" in page and f"`{stage['cmd']}`" in page


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: `make docs` installs it and CI runs it")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env=_environment() | {"NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "params" / "index.html").is_file()
