"""The event filter language: which domain events a subscription receives."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stepline.consumers.patterns import PatternError, compile_name, compile_where, match_name
from stepline.errors import SteplineError


def matches(where: Any, data: dict[str, Any]) -> bool:
    return compile_where(where)(data)


# --- exact values and alternatives -----------------------------------------


def test_an_exact_value_matches_only_that_value() -> None:
    assert matches({"plan": "pro"}, {"plan": "pro"})
    assert not matches({"plan": "pro"}, {"plan": "Pro"})
    assert matches({"n": 3}, {"n": 3.0})
    assert matches({"ok": None}, {"ok": None})
    assert not matches({"ok": None}, {"ok": False})


def test_booleans_and_numbers_never_equal_each_other() -> None:
    assert matches({"flag": True}, {"flag": True})
    assert not matches({"flag": True}, {"flag": 1})
    assert not matches({"n": 1}, {"n": True})
    assert not matches({"n": 0}, {"n": False})


def test_a_list_of_alternatives_matches_any_of_them() -> None:
    where = {"plan": ["pro", "team"]}
    assert matches(where, {"plan": "team"})
    assert not matches(where, {"plan": "free"})


def test_alternatives_may_mix_values_and_operators() -> None:
    where = {"plan": ["pro", {"prefix": "team-"}, {"numeric": [">", 5]}]}
    assert matches(where, {"plan": "pro"})
    assert matches(where, {"plan": "team-eu"})
    assert matches(where, {"plan": 6})
    assert not matches(where, {"plan": "free"})


def test_every_key_of_a_pattern_must_match() -> None:
    where = {"plan": "pro", "country": "DE"}
    assert matches(where, {"plan": "pro", "country": "DE", "extra": 1})
    assert not matches(where, {"plan": "pro", "country": "FR"})


# --- nested fields and list-valued fields ----------------------------------


def test_nested_objects_match_nested_fields() -> None:
    where = {"user": {"country": "DE", "address": {"zip": {"prefix": "10"}}}}
    assert matches(where, {"user": {"country": "DE", "address": {"zip": "10115"}}})
    assert not matches(where, {"user": {"country": "DE", "address": {"zip": "80331"}}})
    assert not matches(where, {"user": "DE"})
    assert not matches(where, {})


def test_a_list_valued_field_matches_when_any_element_matches() -> None:
    assert matches({"tags": "vip"}, {"tags": ["new", "vip"]})
    assert not matches({"tags": "vip"}, {"tags": ["new"]})
    assert matches({"scores": {"numeric": [">", 90]}}, {"scores": [10, [95]]})
    assert not matches({"tags": "vip"}, {"tags": []})


def test_a_nested_pattern_must_match_one_element_of_a_list_of_objects_whole() -> None:
    where = {"items": {"sku": "A", "qty": 2}}
    assert matches(where, {"items": [{"sku": "B", "qty": 1}, {"sku": "A", "qty": 2}]})
    assert not matches(where, {"items": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}]})


# --- one test per operator -------------------------------------------------


def test_prefix_matches_strings_starting_with_it() -> None:
    where = {"id": {"prefix": "ord-"}}
    assert matches(where, {"id": "ord-17"})
    assert not matches(where, {"id": "inv-17"})
    assert not matches(where, {"id": 17})


def test_suffix_matches_strings_ending_with_it() -> None:
    where = {"file": [{"suffix": ".pdf"}]}
    assert matches(where, {"file": "a.pdf"})
    assert not matches(where, {"file": "a.pdf.txt"})


def test_numeric_compares_numbers_but_not_strings_or_bools() -> None:
    where = {"amount": {"numeric": [">", 1000]}}
    assert matches(where, {"amount": 1000.5})
    assert not matches(where, {"amount": 1000})
    assert not matches(where, {"amount": "2000"})
    assert not matches({"n": {"numeric": ["=", 1]}}, {"n": True})
    assert matches({"n": {"numeric": ["<=", 0]}}, {"n": -3})


def test_a_numeric_range_includes_and_excludes_its_bounds_as_written() -> None:
    where = {"n": {"numeric": [">=", 10, "<", 20]}}
    assert matches(where, {"n": 10})
    assert matches(where, {"n": 19.99})
    assert not matches(where, {"n": 20})
    assert not matches(where, {"n": 9})
    assert matches({"n": {"numeric": ["<=", 5, ">=", 5]}}, {"n": 5})


def test_exists_tests_presence_even_of_null() -> None:
    assert matches({"email": {"exists": True}}, {"email": None})
    assert not matches({"email": {"exists": True}}, {})
    assert matches({"email": {"exists": False}}, {})
    assert not matches({"email": {"exists": False}}, {"email": "a@b"})


def test_anything_but_a_value_or_values() -> None:
    assert matches({"env": {"anything-but": "test"}}, {"env": "prod"})
    assert not matches({"env": {"anything-but": "test"}}, {"env": "test"})
    where = {"env": {"anything-but": ["test", "dev"]}}
    assert matches(where, {"env": "prod"})
    assert not matches(where, {"env": "dev"})
    assert matches({"n": {"anything-but": 1}}, {"n": True})


def test_anything_but_a_string_operator_negates_it() -> None:
    where = {"user": {"anything-but": {"prefix": "test-"}}}
    assert matches(where, {"user": "alice"})
    assert not matches(where, {"user": "test-alice"})
    assert not matches({"p": {"anything-but": {"equals-ignore-case": "pro"}}}, {"p": "PRO"})
    assert not matches({"f": {"anything-but": {"suffix": ".tmp"}}}, {"f": "x.tmp"})
    assert not matches({"u": {"anything-but": {"wildcard": "a*"}}}, {"u": "abc"})


def test_equals_ignore_case_matches_any_casing() -> None:
    where = {"plan": {"equals-ignore-case": "Pro"}}
    assert matches(where, {"plan": "PRO"})
    assert matches(where, {"plan": "pro"})
    assert not matches(where, {"plan": "prot"})


def test_wildcard_stars_match_any_run_of_characters() -> None:
    where = {"id": {"wildcard": "user-*-eu"}}
    assert matches(where, {"id": "user-42-eu"})
    assert matches(where, {"id": "user--eu"})
    assert not matches(where, {"id": "user-42-us"})
    assert not matches(where, {"id": "xuser-42-eu"})
    assert matches({"s": {"wildcard": r"a\*b"}}, {"s": "a*b"})
    assert not matches({"s": {"wildcard": r"a\*b"}}, {"s": "axb"})
    assert matches({"s": {"wildcard": "a.c"}}, {"s": "a.c"})
    assert not matches({"s": {"wildcard": "a.c"}}, {"s": "abc"})


# --- missing fields --------------------------------------------------------


@pytest.mark.parametrize(
    "field_pattern",
    [
        "x",
        None,
        ["x", "y"],
        {"prefix": ""},
        {"suffix": ""},
        {"numeric": [">", 0]},
        {"exists": True},
        {"anything-but": "x"},
        {"anything-but": ["x"]},
        {"anything-but": {"prefix": "x"}},
        {"equals-ignore-case": "x"},
        {"wildcard": "*"},
        {"nested": {"exists": True}},
    ],
)
def test_a_missing_field_matches_nothing_but_exists_false(field_pattern: Any) -> None:
    assert not matches({"f": field_pattern}, {"other": 1})


def test_a_missing_field_matches_exists_false_also_among_alternatives_and_nested() -> None:
    assert matches({"f": {"exists": False}}, {})
    assert matches({"f": ["x", {"exists": False}]}, {})
    assert matches({"user": {"email": {"exists": False}}}, {})
    assert matches({"user": {"email": {"exists": False}}}, {"user": "bob"})


# --- callables and None ----------------------------------------------------


def test_none_matches_every_event() -> None:
    assert matches(None, {})
    assert matches(None, {"anything": [1, 2]})


def test_a_callable_is_used_as_the_predicate_and_coerced_to_bool() -> None:
    match = compile_where(lambda data: data.get("n", 0) and "yes")
    assert match({"n": 1}) is True
    assert match({"n": 0}) is False


def test_a_callable_that_raises_propagates_its_error_to_the_consumer() -> None:
    def broken(data: Any) -> bool:
        raise KeyError("plan")

    match = compile_where(broken)
    with pytest.raises(KeyError):
        match({})


# --- invalid patterns fail at compile time, naming the path ----------------


@pytest.mark.parametrize(
    ("where", "path", "words"),
    [
        ({"f": [{"regex": "x"}]}, "where.f[0]", "unknown operator"),
        ({"f": [{"prefix": "a", "suffix": "b"}]}, "where.f[0]", "exactly one key"),
        ({"amount": [{"numeric": [">"]}]}, "where.amount[0]", "operator and a number"),
        ({"amount": {"numeric": ["=>", 3]}}, "where.amount", "numeric operators"),
        ({"amount": {"numeric": [">", True]}}, "where.amount", "needs a number"),
        ({"amount": {"numeric": [">", float("nan")]}}, "where.amount", "NaN"),
        ({"a": {"numeric": [">", 1, ">", 2]}}, "where.a", "range needs"),
        ({"a": {"numeric": [">", 5, "<", 5]}}, "where.a", "is empty"),
        ({"a": {"numeric": ["=", 1, "<", 5]}}, "where.a", "range needs"),
        ({"user": {"seen": {"exists": "yes"}}}, "where.user.seen", "true or false"),
        ({"plan": []}, "where.plan", "empty list"),
        ({"id": {"prefix": 7}}, "where.id", "prefix needs a string"),
        ({"id": {"suffix": None}}, "where.id", "suffix needs a string"),
        ({"id": {"wildcard": ["a*"]}}, "where.id", "wildcard needs a string"),
        ({"e": {"anything-but": {"numeric": [">", 1]}}}, 'where.e["anything-but"]', "anything-but takes"),
        ({"e": {"anything-but": []}}, 'where.e["anything-but"]', "at least one"),
        ({"e": {"anything-but": ["a", ["b"]]}}, 'where.e["anything-but"][1]', "plain values"),
        ({"f": ["a", ["b"]]}, "where.f[1]", "not lists"),
        ({"f": {}}, "where.f", "empty nested"),
        ({"f": (1, 2)}, "where.f", "unsupported"),
        ({"order-id": {"prefix": 1}}, 'where["order-id"]', "prefix needs"),
        ({3: "x"}, "where", "field names"),
        ("plan == pro", "where", "pattern object"),
    ],
)
def test_an_invalid_pattern_is_rejected_at_compile_time_naming_the_path(
    where: Any, path: str, words: str
) -> None:
    with pytest.raises(PatternError) as info:
        compile_where(where)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert words in info.value.detail


def test_pattern_errors_belong_to_the_error_tree_and_are_value_errors() -> None:
    with pytest.raises(PatternError) as info:
        compile_where({"amount": [{"numeric": [">"]}]})
    assert isinstance(info.value, SteplineError)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == 'where.amount[0]: numeric needs an operator and a number, got [">"]'


# --- event names -----------------------------------------------------------


def test_a_trailing_star_matches_one_segment_under_the_prefix() -> None:
    assert match_name("user.*", "user.created")
    assert match_name("user.*", "user.deleted")
    assert not match_name("user.*", "user")
    assert not match_name("user.*", "users.created")
    assert not match_name("user.*", "user.")
    assert not match_name("user.*", "user.created.v2")


def test_a_star_segment_may_stand_anywhere() -> None:
    assert match_name("*.created", "order.created")
    assert not match_name("*.created", "order.deleted")


def test_a_lone_star_matches_every_event_name() -> None:
    assert match_name("*", "user.created")
    assert match_name("*", "tick")


def test_a_plain_name_matches_exactly() -> None:
    assert match_name("user.created", "user.created")
    assert not match_name("user.created", "user.created.v2")
    assert not match_name("user.created", "user")


@pytest.mark.parametrize("pattern", ["", " ", "user created", "user..created", "user.", "user.cr*", 3])
def test_a_malformed_event_name_pattern_is_rejected(pattern: Any) -> None:
    with pytest.raises(PatternError) as info:
        compile_name(pattern)
    assert info.value.path == "event"


# --- properties ------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
numbers = st.integers() | st.floats(allow_nan=False)


@given(scalars)
def test_a_scalar_matches_itself_and_anything_but_itself_does_not(value: Any) -> None:
    assert matches({"f": value}, {"f": value})
    assert not matches({"f": {"anything-but": value}}, {"f": value})


@given(numbers, numbers)
def test_numeric_greater_than_agrees_with_python(bound: Any, value: Any) -> None:
    assert matches({"f": [{"numeric": [">", bound]}]}, {"f": value}) == (value > bound)


@given(st.lists(scalars, min_size=1), scalars)
def test_anything_but_a_list_negates_the_alternatives_for_present_scalars(
    values: list[Any], value: Any
) -> None:
    listed = matches({"f": values}, {"f": value})
    assert matches({"f": {"anything-but": values}}, {"f": value}) == (not listed)
