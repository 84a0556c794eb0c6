"""dvc.yaml's deps and params follow from the code, so they cannot drift from it.

For each dvc.yaml stage, `sdpipe X` leads to the CLI handler `_X` (pipeline/cli.py) and the stage function
it imports. From the source (`ast`, function-level imports included) the test derives:

- the project modules the stage module imports, transitively (importing `pipeline.a.b` also runs
  `pipeline/a/__init__.py`). Each must be a dep of the stage, as a file or inside a listed folder; only
  a package `__init__.py` that holds nothing but a docstring, and the modules in NOT_DEPENDENCIES, are
  exempt, each for the reason given there.
- the params the stage reads: every section in the stage function's signature (a `Params` argument reads
  the sections it is accessed at, `params.<section>`; dumping all of it for the run's lineage record, as
  pipeline.tracking.runs does, reads none), and, per section, which keys. A key is read where the
  code writes `<section value>.<key>`. When the section value goes on whole to a project function, that
  function's reads of its parameter count (followed through calls); when it goes anywhere else (assigned,
  passed to a library, dumped), every key counts as read.
  dvc.yaml may list a section whole or some of its keys; listing keys, it must name every key read except
  those in OUTPUT_NEUTRAL (read, but unable to change any output). So a key that the code starts reading
  and dvc.yaml does not list fails here, naming the stage and the key.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import Params

REPO = Path(__file__).parents[1]
STAGE_MODULES = ("stages/ingest", "stages/validate", "stages/preprocess", "stages/vae", "stages/encode",
                 "stages/train", "stages/evaluate", "stages/register", "generate", "monitor")
NOT_DEPENDENCIES = {
    "pipeline/__init__.py": "the package's docstring and version",
    "pipeline/cli.py": "argument parsing and dispatch; each stage's own code is what it runs",
    "pipeline/core/config.py": "the params' types; their values are deps through `params`",
    "pipeline/core/params_file.py": "reads params.yaml; the values it reads are deps through `params`",
    "pipeline/core/atomic.py": "writes files atomically; cannot change what a file holds",
}
OUTPUT_NEUTRAL = {
    "ray.address": "where the data stages' Ray tasks run; the outputs are the same on any cluster (test_ray_cluster.py)",
    "ray.num_cpus": "how many Ray workers run them; the outputs are the same for any number (test_preprocess.py)",
}
SECTION_OF_CLASS = {field.annotation.__name__: field.alias or name for name, field in Params.model_fields.items()}
SECTION_OF_ATTRIBUTE = {name: field.alias or name for name, field in Params.model_fields.items()}
ALL = None  # every key of a section


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_modules(path: Path) -> set[Path]:
    """Project modules `path` imports anywhere in it, with the packages they sit in."""
    names = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != "pipeline":
            continue
        files |= {found for depth in range(1, len(parts) + 1) if (found := module_file(".".join(parts[:depth])))}
    return files


def only_a_docstring(path: Path) -> bool:
    body = tree(path).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def closure(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imported_modules(current)
    return seen


def stage_function(command: str) -> tuple[Path, ast.FunctionDef]:
    """`sdpipe X` -> the CLI handler `_X` -> the stage function it imports and its module."""
    assert command.startswith("sdpipe "), f"dvc.yaml: {command!r} is not an sdpipe command"
    handler_name = "_" + command.split()[1].replace("-", "_")
    handler = next(node for node in tree(REPO / "pipeline/cli.py").body
                   if isinstance(node, ast.FunctionDef) and node.name == handler_name)
    imported = next(node for node in ast.walk(handler) if isinstance(node, ast.ImportFrom))
    path, name = module_file(imported.module), imported.names[0].name
    function = next(node for node in tree(path).body if isinstance(node, ast.FunctionDef) and node.name == name)
    return path, function


def project_functions(files: set[Path]) -> dict[str, ast.FunctionDef]:
    return {node.name: node for path in files for node in ast.walk(tree(path)) if isinstance(node, ast.FunctionDef)}


def argument_names(function: ast.FunctionDef) -> list[ast.arg]:
    return [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]


class ParamReads:
    """Which keys of which sections a function reads, following section values into project functions."""

    def __init__(self, functions: dict[str, ast.FunctionDef]):
        self.functions, self.reads, self.visited = functions, {}, set()

    def add(self, section: str, key: str | None) -> None:
        if key is None or self.reads.get(section, set()) is ALL:
            self.reads[section] = ALL
        else:
            self.reads.setdefault(section, set()).add(key)

    def section_value(self, function: ast.FunctionDef, name: str, section: str) -> None:
        """The function's variable `name` holds the section: record what it reads of it."""
        if (function.name, name, section) in self.visited:
            return
        self.visited.add((function.name, name, section))
        parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load):
                self.use(function, node, parents, section)

    def use(self, function, node: ast.expr, parents: dict, section: str) -> None:
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute):
            self.add(section, parent.attr)
        elif isinstance(parent, (ast.Call, ast.keyword)) and self.follow(parent, node, parents, section):
            return
        else:
            self.add(section, None)

    def follow(self, parent, node, parents, section: str) -> bool:
        """A section passed on to a project function: what that function reads of its parameter."""
        call = parents[parent] if isinstance(parent, ast.keyword) else parent
        if not isinstance(call, ast.Call) or node is call.func or not isinstance(call.func, ast.Name):
            return False
        callee = self.functions.get(call.func.id)
        if callee is None:
            return False
        arguments = argument_names(callee)
        if isinstance(parent, ast.keyword):
            target = parent.arg
        else:
            position = call.args.index(node)
            if position >= len(callee.args.posonlyargs) + len(callee.args.args):
                return False
            target = arguments[position].arg
        self.section_value(callee, target, section)
        return True

    def whole_params(self, function: ast.FunctionDef, name: str) -> None:
        """`name` holds all of Params: `name.<section>` reads that section, passing it on reads what the
        callee reads of it."""
        if (function.name, name, "*") in self.visited:
            return
        self.visited.add((function.name, name, "*"))
        parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(function):
            if not (isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)):
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.attr in SECTION_OF_ATTRIBUTE:
                self.use(function, parent, parents, SECTION_OF_ATTRIBUTE[parent.attr])
            elif isinstance(parent, (ast.Call, ast.keyword)):
                call = parents[parent] if isinstance(parent, ast.keyword) else parent
                callee = self.functions.get(call.func.id) if isinstance(call.func, ast.Name) else None
                if callee is not None:
                    position = None if isinstance(parent, ast.keyword) else call.args.index(node)
                    target = parent.arg if position is None else argument_names(callee)[position].arg
                    self.whole_params(callee, target)


def params_read(path: Path, function: ast.FunctionDef) -> dict[str, set[str] | None]:
    reads = ParamReads(project_functions(closure(path)))
    for argument in argument_names(function):
        annotation = ast.unparse(argument.annotation) if argument.annotation else ""
        if annotation == "Params":
            reads.whole_params(function, argument.arg)
        elif annotation in SECTION_OF_CLASS:
            reads.section_value(function, argument.arg, SECTION_OF_CLASS[annotation])
    return reads.reads


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(dep)) if isinstance(dep, dict) else dep for dep in stage.get("deps", [])]


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_a_stage_lists_every_module_it_imports(name):
    stage = dvc_stages()[name]
    path, _ = stage_function(stage["cmd"])
    deps = dep_paths(stage)
    missing = sorted(
        relative for module in closure(path)
        if (relative := module.relative_to(REPO).as_posix()) not in NOT_DEPENDENCIES and not only_a_docstring(module)
        and not any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps)
    )
    assert not missing, f"dvc.yaml: stage {name!r} imports {', '.join(missing)} but does not list them in deps"


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_a_stage_lists_every_param_it_reads(name):
    stage = dvc_stages()[name]
    listed = {entry for entry in stage.get("params", []) if isinstance(entry, str)}
    missing = []
    for section, keys in sorted(params_read(*stage_function(stage["cmd"])).items()):
        if section in listed:
            continue
        every = set(Params.model_fields[next(n for n, f in Params.model_fields.items()
                                              if (f.alias or n) == section)].annotation.model_fields)
        needed = every if keys is ALL else keys & every
        missing += [f"{section}.{key}" for key in sorted(needed)
                    if f"{section}.{key}" not in listed and f"{section}.{key}" not in OUTPUT_NEUTRAL]
    assert not missing, f"dvc.yaml: stage {name!r} reads {', '.join(missing)} but does not list it in params"


def test_the_rule_catches_an_omitted_key():
    """The derivation sees a key read through a section passed on to a helper, and a section passed whole."""
    source = ast.parse(
        "def stage(paths, *, train: TrainParams, model: ModelParams):\n"
        "    helper(train)\n"
        "    keep = model\n"
        "def helper(settings):\n"
        "    return settings.steps\n"
    )
    functions = {node.name: node for node in source.body}
    reads = ParamReads(functions)
    for argument in argument_names(functions["stage"]):
        if argument.annotation is not None:
            reads.section_value(functions["stage"], argument.arg, SECTION_OF_CLASS[ast.unparse(argument.annotation)])
    assert reads.reads == {"train": {"steps"}, "model": ALL}


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_no_stage_module_imports_another(module):
    """Stages talk through files (pipeline.contracts) and stand on shared modules, never on each other."""
    others = {REPO / "pipeline" / f"{other}.py" for other in STAGE_MODULES if other != module}
    imported = sorted(path.relative_to(REPO).as_posix() for path in imported_modules(REPO / "pipeline" / f"{module}.py")
                      if path in others)
    assert not imported, f"pipeline/{module}.py imports the stage module(s) {', '.join(imported)}"
