"""values.yaml against app/settings.py, values.schema.json and its own documentation.

The chart's settings block, its schema and chart/README.md are generated (chart/hack/generate.py): a
settings change without a regeneration fails here, the way kube-prometheus-stack's CI fails on drift.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import Settings

from .conftest import CHART

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_generate", CHART / "hack" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GENERATE = _generator()


def test_generated_files_are_up_to_date() -> None:
    assert GENERATE.main(["--check"]) == 0, "run: python chart/hack/generate.py"


def test_every_setting_is_a_value_with_the_apps_default() -> None:
    env, secret_keys = VALUES["gateway"]["env"], VALUES["gateway"]["secretKeys"]
    secrets = set(GENERATE.secret_fields())
    assert {"api_keys", "upstream_api_key", "redis_url"} <= secrets
    for name, field in Settings.model_fields.items():
        key = name.upper()
        if name in GENERATE.CHART_OWNED_FIELDS:  # the Deployment sets it from a value of its own
            assert key not in env and GENERATE.CHART_OWNED_FIELDS[name] in VALUES, key
            continue
        if name in secrets:
            assert key in secret_keys and key not in env, key
            assert field.default is None, f"{key}: a secret setting has no default"
            continue
        assert key in env, f"{key} is missing from gateway.env"
        value = env[key]
        assert value == field.default and type(value) is type(field.default), (key, value, field.default)
    owned = {name.upper() for name in GENERATE.CHART_OWNED_FIELDS}
    assert set(env) | set(secret_keys) | owned == {name.upper() for name in Settings.model_fields}


def test_the_default_values_make_valid_settings() -> None:
    env = {
        key: str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in VALUES["gateway"]["env"].items()
        if value is not None
    }
    Settings.model_validate({key.lower(): value for key, value in env.items()})


def test_values_validate_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        jsonschema.Draft7Validator(SCHEMA).validate(_merge(VALUES, yaml.safe_load(path.read_text())))


def test_the_schema_refuses_what_the_app_refuses() -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    for env in (
        {"PORT": 70000},
        {"LOG_LEVEL": "verbose"},
        {"DEADLINE_CHECK_INTERVAL_SECONDS": 0},
        {"NO_SUCH_SETTING": 1},
        {"MAX_CONNECTIONS": "many"},
    ):
        assert not validator.is_valid(_merge(VALUES, {"gateway": {"env": env}})), env
    assert not validator.is_valid(_merge(VALUES, {"ingress": {"proxyTimeout": 300}}))  # typo: unknown key


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        target: Any = SCHEMA
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return dict(target)
    return node


def test_values_and_schema_have_the_same_keys() -> None:
    """Every key in values.yaml is in the schema, and every property the schema owns is in values.yaml."""
    problems: list[str] = []

    def walk(value: Any, schema: dict[str, Any], path: str) -> None:
        schema = _resolve(schema)
        properties = schema.get("properties")
        if properties is not None:
            for key in properties:
                if not isinstance(value, dict) or key not in value:
                    problems.append(f"{path}{key}: in the schema, not in values.yaml")
        if not isinstance(value, dict):
            return
        for key, child in value.items():
            if properties is not None and key in properties:
                walk(child, properties[key], f"{path}{key}.")
            elif isinstance(schema.get("additionalProperties"), dict):
                walk(child, schema["additionalProperties"], f"{path}{key}.")
            elif schema.get("additionalProperties") is False or properties is not None:
                problems.append(f"{path}{key}: in values.yaml, not in the schema")

    walk(VALUES, SCHEMA, "")
    assert not problems, "\n".join(problems)


def test_objects_the_chart_owns_refuse_unknown_keys() -> None:
    loose: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                loose.append(path or "<root>")
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(SCHEMA, "")
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert not loose, loose


def test_every_value_is_documented() -> None:
    assert GENERATE.undocumented_keys(VALUES_TEXT) == []


def test_readme_documents_every_setting() -> None:
    readme = (CHART / "README.md").read_text()
    for name in Settings.model_fields:
        if name in GENERATE.CHART_OWNED_FIELDS:
            assert f"| {GENERATE.CHART_OWNED_FIELDS[name]} |" in readme and name.upper() in readme, name
        elif name in GENERATE.secret_fields():
            assert f"gateway.secretKeys.{name.upper()} |" in readme, name
        else:
            assert f"| gateway.env.{name.upper()} |" in readme, name


def test_doc_parser_follows_helm_docs_conventions() -> None:
    text = """\
# -- first
a: 1
b:
  # -- nested
  # continued
  c: x
  # -- described
  # @default -- computed
  d: ""
  list:
    - name: e
      # -- not a value: inside a list item
      f: 1
  # -- after the list
  g: true
"""
    docs = GENERATE.parse_doc_comments(text)
    assert docs == {
        "a": ("first", None),
        "b.c": ("nested continued", None),
        "b.d": ("described", "computed"),
        "b.g": ("after the list", None),
    }
    assert GENERATE.undocumented_keys(text) == ["b.list"]


@pytest.mark.parametrize("path", sorted((CHART / "ci").glob("*-values.yaml")), ids=lambda p: p.name)
def test_ci_values_use_only_known_settings(path: Path) -> None:
    env = (yaml.safe_load(path.read_text()) or {}).get("gateway", {}).get("env", {})
    assert set(env) <= set(VALUES["gateway"]["env"]), set(env) - set(VALUES["gateway"]["env"])
