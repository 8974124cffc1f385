"""Regenerate the chart's derived files; `--check` fails (exit 1) when any of them is stale.

- `values.yaml`, the blocks between the `BEGIN generated` / `END generated` markers under `gateway.env`
  and `gateway.secretKeys`: one key per gateway setting (app/settings.py), with its default (or its
  Secret key) and its description as a helm-docs `# --` comment. Secret settings are never plain values.
- `values.schema.json`, `properties.gateway.properties.env` and `.secretKeys`: the settings' types,
  ranges and choices (from pydantic's JSON schema), so `helm install` refuses what the app would refuse.
- `README.md`, from `README.md.gotmpl`: `{{ template "chart.valuesTable" . }}` becomes the table of every
  documented value (helm-docs conventions: `# -- text` above a key, `# @default -- text` to describe the
  default; a documented key's children need no comment of their own), and `<!-- include PATH -->` the
  file at PATH, e.g. the prometheus-adapter rule.

Run from anywhere: `python chart/hack/generate.py [--check]`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CHART = Path(__file__).resolve().parent.parent
ROOT = CHART.parent
sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402  (needs ROOT on sys.path)

BEGIN = "# BEGIN generated {block} from app/settings.py by chart/hack/generate.py: do not edit by hand"
END = "# END generated"
VALUES_TABLE = '{{ template "chart.valuesTable" . }}'
# Settings that may carry credentials: read from a Secret, never from a plain value. REDIS_URL is a
# plain str in Settings, but a redis:// URL carries the password.
EXTRA_SECRET_FIELDS = frozenset({"redis_url"})
# Settings the chart derives from its own values (the Deployment sets them), never a `gateway.env` key:
# setting -> the value it comes from.
CHART_OWNED_FIELDS = {"drain_metrics_linger_seconds": "drainMetricsLingerSeconds"}
# pydantic schema keys that mean nothing to Helm's validator (or would leak Python names)
DROPPED_SCHEMA_KEYS = frozenset({"title", "format", "writeOnly"})


def secret_fields() -> list[str]:
    """Settings read from `gateway.existingSecret` (SecretStr fields, plus URLs that embed passwords)."""
    names = []
    for name, field in Settings.model_fields.items():
        if "SecretStr" in repr(field.annotation) or name in EXTRA_SECRET_FIELDS:
            names.append(name)
    return names


def env_fields() -> list[str]:
    secrets = set(secret_fields())
    return [name for name in Settings.model_fields if name not in secrets and name not in CHART_OWNED_FIELDS]


def describe(name: str) -> str:
    field = Settings.model_fields[name]
    text = (field.description or "").strip()
    if get_origin(field.annotation) is Literal:
        text += " One of: " + ", ".join(f"`{choice}`" for choice in get_args(field.annotation)) + "."
    return text


def secret_key(name: str) -> str:
    return name.replace("_", "-")


def generated_entries(block: str) -> list[tuple[str, str, Any]]:
    """(description, KEY, value) of one generated block: `env` (defaults) or `secretKeys` (Secret keys)."""
    if block == "env":
        return [(describe(name), name.upper(), Settings.model_fields[name].default) for name in env_fields()]
    return [
        (f"Secret key of `{name.upper()}`: {describe(name)}", name.upper(), secret_key(name))
        for name in secret_fields()
    ]


def render_block(text: str, block: str) -> str:
    begin = BEGIN.format(block=block)
    start = text.index(begin)
    line_start = text.rindex("\n", 0, start) + 1
    indent = text[line_start:start]
    end = text.index(END, start) + len(END)
    end = text.index("\n", end) + 1
    lines = [f"{indent}{begin}"]
    for description, key, value in generated_entries(block):
        lines.append(f"{indent}# -- {description}")
        lines.append(indent + yaml.safe_dump({key: value}, default_flow_style=False, width=1000).rstrip("\n"))
    lines.append(f"{indent}{END}")
    return text[:line_start] + "\n".join(lines) + "\n" + text[end:]


def render_values(text: str) -> str:
    return render_block(render_block(text, "env"), "secretKeys")


def _clean(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _clean(value) for key, value in schema.items() if key not in DROPPED_SCHEMA_KEYS}
    if isinstance(schema, list):
        return [_clean(item) for item in schema]
    return schema


def env_schema() -> dict[str, Any]:
    properties = Settings.model_json_schema()["properties"]
    return {
        "type": "object",
        "description": "Gateway settings (app/settings.py), one environment variable each.",
        "additionalProperties": False,
        "properties": {name.upper(): _clean(properties[name]) for name in env_fields()},
    }


def secret_keys_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Key in `gateway.existingSecret` of each secret setting.",
        "additionalProperties": False,
        "properties": {
            name.upper(): {"type": "string", "minLength": 1, "description": describe(name)} for name in secret_fields()
        },
    }


def render_schema(text: str) -> str:
    schema = json.loads(text)
    gateway = schema["properties"]["gateway"]["properties"]
    gateway["env"] = env_schema()
    gateway["secretKeys"] = secret_keys_schema()
    return json.dumps(schema, indent=2) + "\n"


# --- values documentation (helm-docs conventions) -------------------------------------------------


@dataclass
class ValueDoc:
    key: str
    type: str
    default: str
    description: str


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/\"']+):(?:\s|$)")
_LIST_LINE = re.compile(r"^(?P<indent> *)- ")


def parse_doc_comments(text: str) -> dict[str, tuple[str, str | None]]:
    """Map each documented key path to (description, @default text) from `# --` comments.

    Keys inside list items are never documented on their own (helm-docs documents the list).
    """
    docs: dict[str, tuple[str, str | None]] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mapping keys
    list_indent: int | None = None  # set while inside a list item at this indent
    pending: list[str] = []
    pending_default: str | None = None
    collecting = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending, pending_default, collecting = [stripped[4:].strip()], None, True
            continue
        if stripped.startswith("# @default --"):
            pending_default = stripped[len("# @default --") :].strip()
            continue
        if stripped.startswith("#"):
            if collecting and not stripped.startswith(("# BEGIN", "# END")):
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None and indent > list_indent:
            continue  # inside a list item
        list_indent = None
        if _LIST_LINE.match(line):
            list_indent = indent
            collecting = False
            continue
        match = _KEY_LINE.match(line)
        if not match:
            collecting = False
            continue
        key = match.group("key").strip("\"'")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if collecting:
            docs[path] = (" ".join(part for part in pending if part), pending_default)
        collecting, pending, pending_default = False, [], None
    return docs


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def _lookup(values: Any, path: str) -> Any:
    node = values
    for part in path.split("."):
        node = node[part]
    return node


def value_docs(values_text: str) -> list[ValueDoc]:
    values = yaml.safe_load(values_text)
    rows = []
    for path, (description, default_text) in parse_doc_comments(values_text).items():
        value = _lookup(values, path)
        default = default_text if default_text is not None else f"`{json.dumps(value, separators=(',', ':'))}`"
        rows.append(ValueDoc(path, _type_name(value), default, description))
    return rows


def undocumented_keys(values_text: str) -> list[str]:
    """Mapping keys with no `# --` comment on themselves or on an ancestor (helm-docs would miss them)."""
    values = yaml.safe_load(values_text)
    documented = set(parse_doc_comments(values_text))
    missing: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, child in node.items():
            path = f"{prefix}{key}"
            if path in documented:
                continue
            if isinstance(child, dict) and child:
                walk(child, path + ".")
            else:
                missing.append(path)

    walk(values, "")
    return missing


def values_table(values_text: str) -> str:
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for doc in value_docs(values_text):
        description = doc.description.replace("|", "\\|")
        default = doc.default.replace("|", "\\|")
        rows.append(f"| {doc.key} | {doc.type} | {default} | {description} |")
    return "\n".join(rows)


_INCLUDE = re.compile(r"^<!-- include (?P<path>[\w./-]+) -->$", re.MULTILINE)


def render_readme(template: str, values_text: str) -> str:
    """The values table, and `<!-- include PATH -->` lines (PATH from the repository root) as YAML blocks."""

    def include(match: re.Match[str]) -> str:
        return "```yaml\n" + (ROOT / match.group("path")).read_text().rstrip("\n") + "\n```"

    return _INCLUDE.sub(include, template.replace(VALUES_TABLE, values_table(values_text)))


# --- main ------------------------------------------------------------------------------------------


def expected_files() -> dict[Path, str]:
    values_path = CHART / "values.yaml"
    values = render_values(values_path.read_text())
    return {
        values_path: values,
        CHART / "values.schema.json": render_schema((CHART / "values.schema.json").read_text()),
        CHART / "README.md": render_readme((CHART / "README.md.gotmpl").read_text(), values),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("stale: " + ", ".join(map(str, stale)) + " (run: python chart/hack/generate.py)", file=sys.stderr)
        return 1
    for path in stale:
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
