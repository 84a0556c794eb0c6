"""The reference pages, generated from the code each time the site is built (an MkDocs hook, mkdocs.yml `hooks:`).

- reference/params.md: every params.yaml key from the typed sections of pipeline/core/config.py (type, default,
  allowed values, description) and the stages that re-run when it changes (dvc.yaml's params lists, then every
  stage downstream of them);
- reference/cli.md: every `sdpipe` command and option, from pipeline/cli.py's argparse parser;
- reference/stages.md: dvc.yaml's stages with the command, code, params and files each reads and writes.

Nothing generated is committed: a changed description, option or stage changes the page with no hand edit.
`tests/test_docs.py` checks these pages against the code.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[2]
PAGES = ("reference/params.md", "reference/cli.md", "reference/stages.md")


# --- dvc.yaml: which stage reads what, and what follows from it --------------------------------------------------

def _paths(entries: list) -> list[str]:
    """dvc.yaml's deps/outs/metrics/plots entries: plain paths or {path: options}."""
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries or []]


def stage_table(root: Path = REPO) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _writes(stage: dict) -> list[str]:
    return _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))


def downstream(stages: dict[str, dict]) -> dict[str, list[str]]:
    """Each stage and every stage after it that reads, directly or not, what it writes (dvc.yaml's order)."""
    def reads_output_of(reader: dict, writer: dict) -> bool:
        return any(dep == out or dep.startswith(out.rstrip("/") + "/")
                   for dep in _paths(reader.get("deps")) for out in _writes(writer))

    order = list(stages)
    after: dict[str, list[str]] = {}
    for name in reversed(order):
        followers = {name}
        for later in order[order.index(name) + 1:]:
            if reads_output_of(stages[later], stages[name]):
                followers.update(after[later])
        after[name] = [stage for stage in order if stage in followers]
    return after


def stages_reading(key: str, stages: dict[str, dict]) -> list[str]:
    """The stages whose dvc.yaml params list names this key or a section above it."""
    return [name for name, stage in stages.items()
            if any(key == param or key.startswith(f"{param}.") for param in stage.get("params") or [])]


def stages_reading_section(section: str, stages: dict[str, dict]) -> list[str]:
    """The stages whose dvc.yaml params list names this section, a key in it or a section above it."""
    return [name for name, stage in stages.items()
            if any(section == param or param.startswith(f"{section}.") or section.startswith(f"{param}.")
                   for param in stage.get("params") or [])]


# --- params: the typed sections of pipeline/core/config.py -------------------------------------------------------

def _section_of(annotation) -> type[BaseModel] | None:
    """The section class of a field typed as a section, or as a section or None."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return sections[0] if sections else None


def _named_sections_of(annotation) -> type[BaseModel] | None:
    """The section class of a field typed as a mapping of names to sections (ingest.subsets), or None."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if typing.get_origin(candidate) is dict:
            return _section_of(typing.get_args(candidate)[1])
    return None


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "choice"
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (tuple, list):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if typing.get_origin(annotation) is dict:
        key, value = typing.get_args(annotation)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    return getattr(annotation, "__name__", str(annotation))


def _choices(annotation) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [choice for arg in typing.get_args(annotation) for choice in _choices(arg)]


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least this many items:"}


def _allowed(field) -> str:
    choices = _choices(field.annotation)
    if choices:
        return ", ".join(f"`{_yaml(choice)}`" for choice in choices)
    limits = [f"{sign} {getattr(rule, name)}" for rule in field.metadata
              for name, sign in BOUNDS.items() if hasattr(rule, name)]
    return ", ".join(limits)


def _yaml(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def params_rows(section: type[BaseModel], prefix: str = "") -> list[dict]:
    """One row per params.yaml key under this section, depth first, in the code's order."""
    rows = []
    for name, field in section.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        inner = _section_of(field.annotation)
        if inner is not None:
            optional = field.default is None
            rows.append({"key": key, "section": inner, "optional": optional,
                         "description": field.description or (inner.__doc__ or "").strip()})
            rows.extend(params_rows(inner, f"{key}."))
            continue
        required = field.default is PydanticUndefined
        rows.append({"key": key, "type": _type_name(field.annotation), "allowed": _allowed(field),
                     "default": "required" if required else f"`{_yaml(field.default)}`",
                     "description": field.description or ""})
        named = _named_sections_of(field.annotation)
        if named is not None:  # each entry's keys, under a placeholder for its name
            rows.extend(params_rows(named, f"{key}.<name>."))
    return rows


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def params_page(root: Path = REPO) -> str:
    from pipeline.core.config import Params

    stages = stage_table(root)
    after = downstream(stages)
    lines = [
        "# Parameters",
        "",
        "Every key of `params.yaml`, generated from the typed sections in `pipeline/core/config.py` and",
        "`pipeline/core/source_params.py` when the site is built. An unknown key, a wrong type or a value",
        "outside the allowed ones fails before any work starts, naming the key. **Re-runs** lists the stages",
        "`dvc repro` runs again when the key changes: the stages whose `params` in dvc.yaml name it, and every",
        "stage that reads their outputs. A key no stage lists changes no output.",
        "",
    ]
    for row in params_rows(Params):
        if "section" in row:
            depth = row["key"].count(".") + 2
            lines += ["", f"{'#' * min(depth, 4)} `{row['key']}`", ""]
            if row["description"]:
                lines += [_cell(row["description"]), ""]
            if row["optional"]:
                lines += ["Optional: absent (null) unless you set it.", ""]
            if depth == 2:
                lines += [f"Read by: {', '.join(stages_reading_section(row['key'], stages)) or 'no stage'}.", ""]
            lines += ["| key | type | default | allowed | re-runs | description |",
                      "| --- | --- | --- | --- | --- | --- |"]
            continue
        readers = stages_reading(row["key"], stages)
        reruns = [stage for stage in stages if any(stage in after[reader] for reader in readers)]
        shown = "every stage" if reruns == list(stages) else ", ".join(reruns) or "none"
        lines.append(f"| `{row['key']}` | {row['type']} | {_cell(row['default'])} | {_cell(row['allowed'])} | "
                     f"{shown} | {_cell(row['description'])} |")
    return "\n".join(lines) + "\n"


# --- the sdpipe command ------------------------------------------------------------------------------------------

def _option_row(action: argparse.Action) -> str:
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.dest}`"
    if action.nargs in ("+", "*"):
        names += " ..."
    default = "" if action.default in (None, argparse.SUPPRESS) or action.required else f"`{action.default}`"
    required = "yes" if action.required or not action.option_strings else ""
    choices = ", ".join(f"`{choice}`" for choice in action.choices or [])
    return f"| {names} | {required} | {default} | {choices} | {_cell(action.help or '')} |"


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    actions = [action for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]
    if not actions:
        return ["No options."]
    return ["| option | required | default | choices | what it does |", "| --- | --- | --- | --- | --- |",
            *(_option_row(action) for action in actions)]


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    return ["```text", parser.format_usage().strip().removeprefix("usage: "), "```", ""]


def cli_page() -> str:
    from pipeline.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["# The `sdpipe` command", "",
             "Generated from the argparse parser in `pipeline/cli.py` when the site is built.", "",
             *_usage(parser),
             "## Options before the command", "", *_options_table(parser), "",
             "## Commands", "", "| command | what it does |", "| --- | --- |",
             *(f"| [`{name}`](#{name}) | {_cell(helps.get(name) or '')} |" for name in commands.choices)]
    for name, sub in commands.choices.items():
        lines += ["", f"### {name}", "", _cell(helps.get(name) or ""), "",
                  *_usage(sub), *_options_table(sub)]
    return "\n".join(lines) + "\n"


# --- the stages --------------------------------------------------------------------------------------------------

def _code_list(items: list[str]) -> str:
    return ", ".join(f"`{item}`" for item in items) or "-"


def stages_page(root: Path = REPO) -> str:
    stages = stage_table(root)
    after = downstream(stages)
    lines = ["# The stages", "",
             "Generated from `dvc.yaml` when the site is built: each stage's command, the code and data it reads,",
             "the params it lists, and what it writes. The file names and their readers live in",
             "`pipeline/contracts/`; `tests/test_dependencies.py` checks that dvc.yaml lists exactly what each",
             "stage imports and reads.", "",
             "| stage | command | reads (data) | params | writes |", "| --- | --- | --- | --- | --- |"]
    for name, stage in stages.items():
        data = [dep for dep in _paths(stage.get("deps")) if not dep.startswith("pipeline/")]
        lines.append(f"| [{name}](#{name}) | `{stage['cmd']}` | {_code_list(data)} | "
                     f"{_code_list(stage.get('params') or [])} | {_code_list(_writes(stage))} |")
    for name, stage in stages.items():
        deps = _paths(stage.get("deps"))
        lines += ["", f"## {name}", "", f"`{stage['cmd']}`", "",
                  f"- **code**: {_code_list([dep for dep in deps if dep.startswith('pipeline/')])}",
                  f"- **data**: {_code_list([dep for dep in deps if not dep.startswith('pipeline/')])}",
                  f"- **params**: {_code_list(stage.get('params') or [])}",
                  f"- **outputs**: {_code_list(_paths(stage.get('outs')))}",
                  f"- **metrics and plots**: {_code_list(_paths(stage.get('metrics')) + _paths(stage.get('plots')))}",
                  f"- **a change re-runs**: {', '.join(after[name])}"]
    return "\n".join(lines) + "\n"


GENERATORS = {"reference/params.md": params_page, "reference/cli.md": cli_page, "reference/stages.md": stages_page}


def on_files(files, config):
    """MkDocs hook: add the generated pages to the site's files (they exist only in the build)."""
    from mkdocs.structure.files import File

    for page, generate in GENERATORS.items():
        files.append(File.generated(config, page, content=generate()))
    return files
