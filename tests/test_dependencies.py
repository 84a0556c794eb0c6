"""The package's layout is its architecture, and dvc.yaml's deps and params follow from the code.

Layering (docs/explanation/architecture.md): a module imports only modules of the layers below its own; folders on
one layer do not import each other; no stage imports a stage, and nothing but cli.py imports one; flows/
import only core, contracts and tracking. pipeline/stages/ holds exactly dvc.yaml's stages, which are the
CLI's stage commands.

For each dvc.yaml stage, `sdpipe X` leads to the CLI handler `_X` (pipeline/cli.py) and the stage function
it imports. From the source (`ast`, function-level imports included) the test derives:

- the project modules the stage module imports, transitively (importing `pipeline.a.b` also runs
  `pipeline/a/__init__.py`). Each must be a dep of the stage, as a file or inside a listed folder; only
  a package `__init__.py` that holds nothing but a docstring, and the modules in NOT_DEPENDENCIES, are
  exempt, each for the reason given there. The converse holds too: every pipeline/ file a stage lists is
  one it imports, and a folder is listed only when the stage imports every module in it, so no edit
  re-runs a stage that does not run the edited code.
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

from pipeline.contracts import inputs as inputs_contract
from pipeline.contracts import records
from pipeline.contracts.paths import Paths
from pipeline.core.config import Params

REPO = Path(__file__).parents[1]
NOT_DEPENDENCIES = {
    "pipeline/__init__.py": "the package's docstring and version",
    "pipeline/cli.py": "argument parsing and dispatch; each stage's own code is what it runs",
    "pipeline/core/config.py": "the params' types; their values are deps through `params`",
    "pipeline/core/family_declarations.py": "reads the families' declared facts for config (as config's own "
                                            "constants were); a stage building a model lists the families",
    "pipeline/core/source_params.py": "the ingest section's types; their values are deps through `params`",
    "pipeline/core/section.py": "the base type of every params section",
    "pipeline/core/prior_params.py": "the train.prior section's types; their values are deps through `params`",
    "pipeline/core/validate_params.py": "the validate section's types; their values are deps through `params`",
    "pipeline/core/cron.py": "checks monitor.retrain_cron when params are read; changes no value",
    "pipeline/core/params_file.py": "reads params.yaml; the values it reads are deps through `params`",
    "pipeline/core/atomic.py": "writes files atomically; cannot change what a file holds",
    "pipeline/core/project.py": "names the project DVC runs a stage for; the inputs read there are fingerprinted",
    "pipeline/core/errors.py": "the exception types a stage raises on bad input; a failed stage writes no output",
}
OUTPUT_NEUTRAL = {
    "ray.address": "where the data stages' Ray tasks run; the outputs are the same on any cluster (test_ray_cluster.py)",
    "ray.num_cpus": "how many Ray workers run them; the outputs are the same for any number (test_preprocess.py)",
    "ray.min_tasks": "whether a few tasks skip Ray; the outputs are the same bytes (test_pipeline_e2e.py)",
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


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_a_stage_that_reads_an_input_outside_the_pipeline_lists_its_fingerprint(name):
    """params.yaml's image source, model.pretrained, evaluate.prompts and evaluate.clip_model name files DVC cannot
    list; a stage reading one depends on the fingerprint the inputs stage writes (pipeline/contracts/inputs.py)."""
    if name == "inputs":
        return
    stage = dvc_stages()[name]
    reads = params_read(*stage_function(stage["cmd"]))
    fingerprints = (Paths(REPO).inputs.relative_to(REPO) / fingerprint for fingerprint in inputs_contract.WATCHED_KEYS)
    missing = [f"{path.as_posix()} (it reads {key})" for path, keys in zip(fingerprints, inputs_contract.WATCHED_KEYS.values())
               for key in keys if key_read(reads, key) and path.as_posix() not in dep_paths(stage)]
    assert not missing, f"dvc.yaml: stage {name!r} does not list {', '.join(missing)}"


def key_read(reads: dict[str, set[str] | None], key: str) -> bool:
    section, _, field = key.partition(".")
    return section in reads and (reads[section] is ALL or field in reads[section])


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


# The layers, bottom (0) to top: each unit is a folder of pipeline/ or one of its top-level modules.
LAYERS = {
    "core": 0, "contracts": 1, "runtime": 2, "tracking": 2, "data": 3, "diffusion": 3, "quality": 4,
    "training": 5, "evaluation": 5, "stages": 6, "generate": 6, "monitor": 6, "services": 6,
    "cli": 7,
}
FLOWS_MAY_IMPORT = ("core", "contracts", "tracking")


def unit_of(path: Path) -> str:
    """`pipeline/data/sources/hf.py` -> "data"; `pipeline/cli.py` -> "cli"."""
    parts = path.relative_to(REPO / "pipeline").with_suffix("").parts
    return parts[0]


def package_modules(folder: str) -> list[Path]:
    return sorted(path for path in (REPO / folder).rglob("*.py") if "__pycache__" not in path.parts)


def wrong_way_imports() -> list[str]:
    """Every import in pipeline/ and flows/ that breaks the layering, as a sentence naming it."""
    problems = []
    for path in package_modules("pipeline"):
        if path.parent == REPO / "pipeline" and path.name == "__init__.py":
            continue
        unit = unit_of(path)
        assert unit in LAYERS, f"{path.relative_to(REPO)}: {unit!r} is in no layer of LAYERS (tests/test_dependencies.py)"
        for imported in imported_modules(path):
            if imported == REPO / "pipeline" / "__init__.py":
                continue
            other, where = unit_of(imported), f"{path.relative_to(REPO)} imports {imported.relative_to(REPO)}"
            if other == unit == "stages" and imported != path and imported.name != "__init__.py":
                problems.append(f"{where}: a stage imports another stage; stages talk only through files")
            elif other != unit and LAYERS[other] == LAYERS[unit]:
                problems.append(f"{where}: {unit}/ and {other}/ are siblings on one layer and may not import each other")
            elif other != unit and LAYERS[other] > LAYERS[unit]:
                problems.append(f"{where}: {other} is above {unit}; imports point down the layers")
    for path in package_modules("flows"):
        for imported in imported_modules(path):
            if imported != REPO / "pipeline" / "__init__.py" and unit_of(imported) not in FLOWS_MAY_IMPORT:
                problems.append(f"{path.relative_to(REPO)} imports {imported.relative_to(REPO)}: flows import only "
                                f"pipeline's {', '.join(FLOWS_MAY_IMPORT)} (they orchestrate; no ML code or torch)")
    return problems


def test_every_import_points_down_the_layers():
    problems = wrong_way_imports()
    assert not problems, "\n".join(problems)


def test_the_layering_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check sees an upward import, a sibling import and a stage importing a stage."""
    module = REPO / "pipeline" / "data" / "upward_probe.py"
    stage = REPO / "pipeline" / "stages" / "stage_probe.py"
    sources = {module: "from pipeline.quality.drift import drift_report\nimport pipeline.diffusion.schedule\n",
               stage: "def run():\n    from pipeline.stages.train import train\n"}
    original = tree.__wrapped__
    monkeypatch.setattr(
        "tests.test_dependencies.tree", lambda path: ast.parse(sources[path]) if path in sources else original(path))
    monkeypatch.setattr("tests.test_dependencies.package_modules",
                        lambda folder: [module, stage] if folder == "pipeline" else [])
    problems = wrong_way_imports()
    assert any("upward_probe.py imports pipeline/quality/drift.py: quality is above data" in p for p in problems)
    assert any("upward_probe.py imports pipeline/diffusion/schedule.py: data/ and diffusion/ are siblings" in p
               for p in problems)
    assert any("stage_probe.py imports pipeline/stages/train.py: a stage imports another stage" in p for p in problems)


def test_stages_folder_is_dvc_yaml_is_the_cli():
    """pipeline/stages/ holds exactly dvc.yaml's stages; each runs as `sdpipe <stage>` from its own module."""
    from pipeline.cli import STAGES

    modules = {path.stem for path in (REPO / "pipeline" / "stages").glob("*.py") if path.stem != "__init__"}
    assert modules == set(dvc_stages()), f"pipeline/stages/ has {sorted(modules)}; dvc.yaml has {list(dvc_stages())}"
    assert list(STAGES) == list(dvc_stages()), "pipeline/cli.py's STAGES are not dvc.yaml's stages in its order"
    for name, stage in dvc_stages().items():
        assert stage["cmd"] == f"sdpipe {name}", f"dvc.yaml: stage {name!r} runs {stage['cmd']!r}"
        path, _ = stage_function(stage["cmd"])
        assert path == REPO / "pipeline" / "stages" / f"{name}.py", f"`sdpipe {name}` runs {path.relative_to(REPO)}"


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_a_stage_lists_only_code_it_runs(name):
    """A listed file is imported; a listed folder is imported whole (otherwise an edit there would re-run
    a stage whose code did not change)."""
    stage = dvc_stages()[name]
    path, _ = stage_function(stage["cmd"])
    imported = closure(path)
    unused = []
    for dep in dep_paths(stage):
        listed = REPO / dep
        if not dep.startswith("pipeline/"):
            continue
        assert listed.exists(), f"dvc.yaml: stage {name!r} lists {dep}, which does not exist"
        files = package_modules(dep) if listed.is_dir() else [listed]
        unused += [f"{dep} ({module.relative_to(REPO)})" if listed.is_dir() else dep
                   for module in files if module not in imported and not only_a_docstring(module)]
    assert not unused, f"dvc.yaml: stage {name!r} lists {', '.join(unused)} but does not import it"


NOT_OUTS = {
    "mlflow.db": "the MLflow store: runs and the registry are MLflow's to keep, not DVC's",
    "mlartifacts": "the MLflow store's artifacts",
    "models/checkpoints": "training state for resume; outside train's outs so that DVC, which deletes outs "
                          "before it runs a stage, cannot delete it (checkpoints are keyed by their fingerprint)",
}


def declared_outputs(stage: dict) -> list[str]:
    return [next(iter(out)) if isinstance(out, dict) else out
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]


def contract_paths(paths: Paths) -> set[Path]:
    """Every path pipeline.contracts names: the Paths locations and the record files inside them."""
    locations = {getattr(paths, name) for name, value in vars(Paths).items() if isinstance(value, property)}
    names = [value for name, value in vars(records).items() if name.isupper() and isinstance(value, str)]
    return locations | {location / name for location in locations for name in names}


def test_every_dvc_out_is_a_contract_path():
    paths = Paths(REPO)
    strays = [f"{name}: {out}" for name, stage in dvc_stages().items() for out in declared_outputs(stage)
              if REPO / out not in contract_paths(paths)]
    assert not strays, f"dvc.yaml outs that pipeline/contracts does not name: {', '.join(strays)}"


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_a_stage_writes_exactly_its_dvc_outs(name, trained_project_writes):
    """What the stage really wrote (run through the CLI's handler on a tiny project) is what dvc.yaml
    declares: nothing written outside its outs, and every out written."""
    _, _, written = trained_project_writes
    declared = declared_outputs(dvc_stages()[name])

    def inside(path: str, out: str) -> bool:
        return path == out or path.startswith(out.rstrip("/") + "/")

    undeclared = sorted(path for path in written[name] if not any(inside(path, out) for out in [*declared, *NOT_OUTS]))
    unwritten = [out for out in declared if not any(inside(path, out) for path in written[name])]
    assert not undeclared, f"stage {name!r} wrote {', '.join(undeclared)}, which dvc.yaml does not declare as its outs"
    assert not unwritten, f"dvc.yaml declares {', '.join(unwritten)} as stage {name!r}'s outs, but it wrote nothing there"


def expand_braces(text: str) -> list[str]:
    """`a/{b,c}` -> [`a/b`, `a/c`] (one level, as the README's table writes paths)."""
    head, brace, rest = text.partition("{")
    if not brace:
        return [text]
    inside, _, tail = rest.partition("}")
    return [expanded for option in inside.split(",") for expanded in expand_braces(head + option + tail)]


def test_the_readme_stage_table_is_dvc_yaml():
    """The architecture page's stage table (docs/explanation/architecture.md) lists dvc.yaml's stages in order,
    each with its module and every out it writes."""
    rows = [line.split("|")[1:-1] for line in (REPO / "docs" / "explanation" / "architecture.md").read_text(
            encoding="utf-8").splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in dvc_stages()]
    assert [row[0].strip() for row in rows] == list(dvc_stages()), \
        "the architecture page's stage table is not dvc.yaml's stages"
    for name, module, _, writes in rows:
        assert module.strip() == f"`pipeline/stages/{name.strip()}.py`", \
            f"architecture page: stage {name.strip()} is {module}"
        written = [path for quoted in writes.split("`")[1::2] for path in expand_braces(quoted)]
        for out in declared_outputs(dvc_stages()[name.strip()]):
            assert any(path.rstrip("/") == out or path.startswith(out + "/") for path in written), \
                f"the architecture page's table: {name.strip()} writes {out} (dvc.yaml), but its row does not say so"
