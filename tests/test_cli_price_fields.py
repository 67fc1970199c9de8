"""`prices import` names the field of a price entry that is not a number, and says so in
words: text where a number belongs ("abc") was refused with Python's internal
``[<class 'decimal.ConversionSyntax'>]``, and a negative "per N tokens" was blamed on
"price" without saying which field. One ``error:`` line, exit 2, nothing imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import test_cli as base
from tests.test_cli import cli
from tests.test_cli_bounds import PRICE, refused, snapshot

_template = base._template
db = base.db
clean_environment = base.clean_environment


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ({"input_cost_credits": "abc"}, ("input_cost_credits", "'abc'")),
        ({"output_cost_credits": "1,5"}, ("output_cost_credits", "'1,5'")),
        ({"cached_cost_credits": "lots"}, ("cached_cost_credits", "'lots'")),
        ({"per_input_tokens": "a thousand"}, ("per_input_tokens", "'a thousand'")),
        ({"per_output_tokens": -5}, ("per_output_tokens", "-5")),
        ({"input_cost_credits": -1}, ("input_cost_credits", "-1")),
    ],
)
def test_prices_import_names_the_field_that_is_not_a_number(
    db: Path, tmp_path: Path, entry: dict[str, object], needles: tuple[str, ...]
) -> None:
    before = snapshot(db)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps([{**PRICE, **entry}]))
    line = refused(cli(db, "prices", "import", str(path)), 2, *needles)
    assert "class" not in line and "ConversionSyntax" not in line
    assert snapshot(db) == before
