"""`.env.example` lists every setting, with its real default."""

from __future__ import annotations

from pathlib import Path

from jobgate.config import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def _example() -> dict[str, str]:
    pairs = {}
    for line in EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name] = value
    return pairs


def test_every_setting_is_listed_once() -> None:
    listed = _example()
    expected = {f"JOBGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(listed) == expected


def test_listed_defaults_are_the_defaults() -> None:
    defaults = Settings.model_construct()
    for name, value in _example().items():
        field = name.removeprefix("JOBGATE_").lower()
        default = getattr(defaults, field)
        if value == "":
            continue  # derived from data_dir, or off
        assert str(default) == value or float(default) == float(value), name
