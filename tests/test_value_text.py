"""value_text: what of a request value an error message shows (issue 19.7)."""
from __future__ import annotations

import orjson

from minserve.value_text import MAX_VALUE_TEXT, value_text


def test_value_text_is_type_and_bounded_prefix_at_any_depth():
    deep_list = orjson.loads("[" * 1000 + "]" * 1000)
    deep_dict = orjson.loads('{"a":' * 1000 + "1" + "}" * 1000)
    assert value_text(deep_list) == "array " + "[" * MAX_VALUE_TEXT + "…"
    assert value_text(deep_dict).startswith("object {'a': {'a': {")
    assert value_text("x" * 10**6) == "string '" + "x" * (MAX_VALUE_TEXT - 1) + "…"
    assert value_text(list(range(10**6))).endswith("…")
    assert value_text({"a": 1, "b": [2, None]}) == "object {'a': 1, 'b': [2, None]}"
    assert value_text(5) == "integer 5" and value_text(True) == "boolean True"
    assert value_text(None) == "null" and value_text([]) == "array []"
    assert value_text(10**5000) == "integer <16610-bit int>"
    assert value_text(object()) == "object <object>"
