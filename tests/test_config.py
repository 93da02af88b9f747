from dataclasses import dataclass, field

import pytest

from mdland.config import from_dict, load_config


@dataclass
class Example:
    steps: int = 1
    rate: float = 0.1
    enabled: bool = False
    name: str = "x"
    data: list[str] = field(default_factory=list)
    limit: int | None = None


def test_values_are_coerced_to_the_field_types():
    cfg = from_dict(Example, {"steps": "3", "rate": 1, "enabled": "yes", "name": 7, "data": "one", "limit": None})
    assert (cfg.steps, cfg.rate, cfg.enabled, cfg.name, cfg.data, cfg.limit) == (3, 1.0, True, "7", ["one"], None)
    assert from_dict(Example, {"enabled": 0, "data": ["a", "b"], "limit": 4.0}).enabled is False
    assert load_config(Example, None, ["steps=5", "data=[a, b]", "enabled=true"]).data == ["a", "b"]
    # A text field takes the text as typed: YAML reads 0123 as the octal 83, yes as true, 1.10 as 1.1.
    for typed in ("0123", "yes", "1.10"):
        assert load_config(Example, None, [f"name={typed}"]).name == typed
    assert load_config(Example, None, ['name="quoted"']).name == "quoted"


@pytest.mark.parametrize("data,message", [
    ({"steps": True}, "steps: expected int, got True"),
    ({"rate": False}, "rate: expected float, got False"),
    ({"steps": 2.5}, "steps: expected int, got 2.5"),
    ({"enabled": 2}, "enabled: expected true/false, got 2"),
    ({"enabled": "maybe"}, "enabled: expected true/false, got 'maybe'"),
    ({"data": {"a": 1}}, r"data: expected a list, got \{'a': 1\}"),
    ({"data": ["ok", None]}, r"data\[1\]: expected text, got None"),
    ({"name": None}, "name: expected text, got None"),
    ({"stpes": 3}, r"unknown key\(s\) \['stpes'\]"),
    ({"steps": float("inf")}, "steps: expected int, got inf"),
    ({"rate": float("nan")}, "rate: expected a finite number, got nan"),
])
def test_ill_typed_values_fail_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(Example, data, "example.yaml")
