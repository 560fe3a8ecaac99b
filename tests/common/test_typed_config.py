import dataclasses
import enum
from pathlib import Path

import pytest

from common.config import Config, load_config, parse_overrides
from common.errors import ConfigError


class Color(enum.StrEnum):
    red = "red"
    blue = "blue"


@dataclasses.dataclass
class Inner(Config):
    color: Color = Color.red
    size: int = 3
    rate: float = 1e-3
    tags: list[str] = dataclasses.field(default_factory=list)
    path: Path | None = None


@dataclasses.dataclass
class Outer(Config):
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False

    def validate(self, where: str) -> None:
        if self.flag and self.inner.size > 10:
            raise ConfigError("flag: cannot be set with inner.size > 10")


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  color: blue\n  rate: 3e-4\n")
    cfg = load_config(Outer, path, ["inner.size=7", "flag=true", "inner.tags=[a, b]", "inner.path=/x"])
    assert cfg.inner.color is Color.blue
    assert cfg.inner.rate == pytest.approx(3e-4)
    assert cfg.inner.size == 7 and cfg.flag is True
    assert cfg.inner.tags == ["a", "b"] and cfg.inner.path == Path("/x")
    assert Outer.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.colour=red"], "unknown config key 'inner.colour'; valid keys here: color, path, rate, size, tags"),
        (["inner.color=green"], "inner.color: 'green' is not one of red, blue"),
        (["inner.size=big"], "inner.size: expected an integer, got 'big'"),
        (["flag=1"], "flag: expected true or false, got 1"),
        (["inner=3"], "inner: expected a mapping of Inner keys, got 3"),
        (["nosuch"], "bad override 'nosuch'; write section.key=value"),
        (["flag=true", "inner.size=11"], "flag: cannot be set with inner.size > 10"),
    ],
)
def test_bad_values_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, overrides)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}
