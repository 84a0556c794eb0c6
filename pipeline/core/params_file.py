"""Reading params.yaml: YAML 1.2, validated into `Params`, every bad key named; dotted overrides for flows.

params.yaml is read as YAML 1.2, the version DVC writes: `dvc exp run -S` rewrites the file without the
quotes of `mixed_precision: "no"`, which a YAML 1.1 reader (PyYAML) would turn into False.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from pipeline.core.config import ConfigError, Params

PARAMS_FILE = "params.yaml"


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required"
    if error["type"] in ("missing_setting", "renamed_key", "conflicting_setting"):
        return error["msg"]
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict | None, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        problems = "\n  ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"{source}: invalid parameters:\n  {problems}") from None


def read_params_file(path: str | Path) -> object:
    """The parsed content of a parameter file, read as YAML 1.2 (plain dicts and lists)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found (run from the project root or pass --params)")
    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    raw = read_params_file(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, str(path))


def with_overrides(path: str | Path, overrides: dict[str, object]) -> Params:
    """The parameter file's params with dotted keys (`train.steps: 500`) changed; the file is not written.

    Flows check overrides with this before they start a DVC experiment, so a bad key or value fails
    before any stage runs and names the key.
    """
    data = read_params_file(path)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise ConfigError(f"override {dotted!r}: {section!r} is not a section of {path}")
            node = node[section]
        node[key] = value
    return parse_params(data, f"{path} with overrides {overrides}")
