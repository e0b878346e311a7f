"""The JSON Schema is valid, current, and accepts every example protocol (checked by jsonschema, not pydantic)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from ruamel.yaml import YAML

from conftest import PROTOCOLS, REPO

EXAMPLES = sorted(PROTOCOLS.glob("*.yaml"))


@pytest.fixture(scope="module")
def schema(cli_module):
    code, output = cli_module("schema")
    assert code == 0
    return json.loads(output)


@pytest.fixture(scope="module")
def cli_module():
    from typer.testing import CliRunner

    from clemflow.cli.app import _register, app

    _register()

    def invoke(*args):
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, result.output

    return invoke


def test_schema_is_valid_json_schema(schema):
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_committed_schema_is_current(schema):
    committed = json.loads((REPO / "docs" / "protocol.schema.json").read_text(encoding="utf-8"))
    assert committed == schema, "docs/protocol.schema.json is stale: run `clemflow schema > docs/protocol.schema.json`"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_against_schema(schema, path):
    data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_carries_schema_comment(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/protocol.schema.json"


def test_schema_rejects_what_the_loader_rejects(schema):
    """A unitless quantity and a misspelled field fail in an independent validator too."""
    data = YAML(typ="safe").load((PROTOCOLS / "fibsem_slice_and_view.yaml").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    data["fibsem"]["slice_thickness"] = 15
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    assert error is not None and "slice_thickness" in list(error.absolute_path)
    data["fibsem"]["slice_thickness"] = "15 nm"
    data["fibsem"]["slice_thicknes"] = "15 nm"
    assert list(validator.iter_errors(data))


def test_validate_examples_exit_0(cli_module):
    code, output = cli_module("validate", *map(str, EXAMPLES))
    assert code == 0, output
