"""The one table printer every command uses."""

from edgeprune.tables import format_table


def test_columns_are_the_union_of_the_rows_in_first_seen_order_and_floats_have_four_digits():
    text = format_table("T", [{"a": 1.23456, "b": None}, {"c": float("nan"), "a": 2}])
    assert text.splitlines() == ["T", "    a  b    c", "-----  -  ---", "1.235        ", "    2     nan"]


def test_no_rows_says_so():
    assert format_table("T", []) == "T\n(no rows)\n"
