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


def test_an_error_names_where_the_bad_key_or_value_was_given(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\nname: x\n")
    with pytest.raises(ValueError, match=r"^--set: unknown key\(s\) \['bogus'\]"):
        load_config(Example, config, ["bogus=1"])
    with pytest.raises(ValueError, match=r"^--set: steps: expected int, got 'many'"):
        load_config(Example, config, ["steps=many"])
    config.write_text("steps: many\n")
    with pytest.raises(ValueError, match=rf"^{config}: steps: expected int, got 'many'"):
        load_config(Example, config, ["steps=4"])  # the file's value is bad, even though --set replaces it
    assert load_config(Example, None, ["steps=4"]).steps == 4


def test_the_shipped_paper_configs_load_with_the_papers_settings():
    from pathlib import Path

    import mdland
    from mdland.detector.train import DetectorTrainConfig
    from mdland.diffusion.train import ControlNetTrainConfig
    from mdland.generation.plan import GenerateConfig

    root = Path(mdland.__file__).parent
    stage1 = load_config(ControlNetTrainConfig, root / "diffusion/configs/stage1.yaml")
    stage2 = load_config(ControlNetTrainConfig, root / "diffusion/configs/stage2.yaml")
    assert (stage1.stage, stage1.resolution, stage1.batch_size, stage1.learning_rate, stage1.max_steps) == (
        "stage1", 256, 4, 1e-5, 200_000)
    assert (stage2.stage, stage2.batch_size, stage2.learning_rate, stage2.max_steps) == ("stage2", 4, 1e-5, 100_000)
    assert stage2.controlnet and len(stage2.data) == 3  # starts from stage 1's export, on the three domains
    detector = load_config(DetectorTrainConfig, root / "detector/configs/finetune.yaml")
    assert (detector.batch_size, detector.learning_rate) == (32, 1e-4) and detector.init.endswith(".pkl")
    generate = load_config(GenerateConfig, root / "generation/configs/generate.yaml")
    assert generate.total == 25 * 400 == 10_000
    assert (generate.resolution, generate.num_inference_steps, generate.guidance_scale) == (256, 50, 7.5)
    for tiny in ("tiny-stage1", "tiny-stage2"):
        assert load_config(ControlNetTrainConfig, root / f"diffusion/configs/{tiny}.yaml").model == "tiny"
    assert load_config(DetectorTrainConfig, root / "detector/configs/tiny.yaml").data
