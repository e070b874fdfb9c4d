"""The Settings dataclass and the SETTINGS table state the same settings with the same defaults."""
from __future__ import annotations

import dataclasses

from memento_edge.config import SETTINGS, Settings


def _dataclass_defaults() -> dict:
    out = {}
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_setting_has_a_field_with_the_table_default() -> None:
    defaults = _dataclass_defaults()
    assert {s.name: s.default for s in SETTINGS} == {s.name: defaults[s.name] for s in SETTINGS}


def test_every_field_but_the_resolved_config_file_is_a_setting() -> None:
    assert set(_dataclass_defaults()) - {s.name for s in SETTINGS} == {"config_file"}


def test_defaults_have_their_setting_type() -> None:
    for s in SETTINGS:
        if s.default is not None:
            assert s.type(s.default) == s.default, s.name
