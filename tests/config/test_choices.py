"""`Table`, the one shape of every family of interchangeable parts."""

from __future__ import annotations

import pytest

from cpe_ray.config.choices import Table, UnknownName


def test_a_table_keeps_its_order_refuses_duplicates_and_names_the_known_ones() -> None:
    table: Table[int] = Table("colour")
    table.register("red", 1)
    table.register("blue", 2)
    assert list(table) == ["red", "blue"] and len(table) == 2 and "red" in table
    assert table["blue"] == 2 and "green" not in table
    with pytest.raises(ValueError, match="colour 'red' is registered already"):
        table.register("red", 3)
    assert table["red"] == 1
    with pytest.raises(UnknownName) as info:
        table["green"]
    # a KeyError to mappings, a ValueError to callers checking input, one plain line to users
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value) == "unknown colour 'green'; use one of red, blue"
