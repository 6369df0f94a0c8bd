"""params.yaml as a file: its bytes read with one-line errors, and its JSON Schema.

`parse_params` refuses what PyYAML lets pass but DVC or a reader would not (a repeated key, bytes that are not
UTF-8). `params_schema` is the JSON Schema of params.yaml (`mpad schema` writes it, with the descriptions of
params.yaml's comments, to params.schema.json for YAML editors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from mpad.config import SECTIONS, ConfigError


def parse_params(data: bytes) -> Any:
    """The values of params.yaml's bytes (YAML's safe subset); ConfigError with one line for bytes that are not
    UTF-8 (naming the byte offset and line) and for a key repeated in one mapping (naming it and both lines:
    PyYAML keeps the last silently, DVC refuses the file), with the line and column for other YAML errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start : err.start + 1]
        raise ConfigError(f"byte {err.start} (line {line}) is {byte!r}, not UTF-8: save the file as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, "")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _refuse_duplicates(node: yaml.Node, prefix: str) -> None:
    """ConfigError naming the dotted key and its lines when a mapping under `node` holds a key twice."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"line {line}: key '{key}' appears twice (also on line {seen[key]}): keep one (DVC refuses such a file)"
            )
        seen[key] = line
        _refuse_duplicates(value_node, f"{key}.")


def params_schema(descriptions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of params.yaml: one object per section, its keys, types, bounds and
    defaults; `descriptions` ({"section.key": text}, e.g. params.yaml's comments) become their descriptions.
    Extra top-level keys are allowed (DVC and the user may keep others); extra keys in a section are not."""
    descriptions = descriptions or {}
    properties = {}
    for name, cls in SECTIONS.items():
        schema = cls.model_json_schema(by_alias=True, mode="validation")
        for key in list(schema.get("properties", {})):
            prop = schema["properties"][key]
            if key in cls.NOT_PARAMS:
                del schema["properties"][key]
                continue
            prop.pop("title", None)
            prop.pop("allowed", None)
            prop.pop("entry", None)
            if f"{name}.{key}" in descriptions:
                prop["description"] = descriptions[f"{name}.{key}"]
        schema.pop("title", None)
        schema["description"] = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        properties[name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mpad params.yaml",
        "type": "object",
        "required": list(SECTIONS),
        "properties": properties,
    }
