"""Property tests for ``KafkaSerializer``: what it writes is plain JSON, and it reads it back.

The central property is ``deserialize(serialize(v), T) == v`` for values ``v`` of each supported
type ``T``; the rest pins down what it refuses and that every failure is a
``KafkaSerializationError`` with a message saying why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from decimal import Decimal
from enum import Enum, IntEnum, StrEnum
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from src.services.kafka.serializers import KafkaSerializationError, KafkaSerializer

# Building a TypeAdapter the first time can take longer than Hypothesis' default deadline on a
# busy machine; that is not what these tests are about.
relaxed = settings(deadline=None)

serializer = KafkaSerializer()


class Color(StrEnum):
    RED = "red"
    GREEN = "green"


class Priority(IntEnum):
    LOW = 1
    HIGH = 5


class LegacyRole(str, Enum):  # noqa: UP042 (the pre-3.11 spelling, still common)
    ADMIN = "admin"
    USER = "user"


class Level(Enum):  # neither str nor int subclass: only the value can stand for it
    DEBUG = 10
    INFO = 20


class Address(BaseModel):
    street: str
    postcode: str | None = None


class Account(BaseModel):
    id: UUID
    email: str
    created_at: dt.datetime
    birthday: dt.date | None
    balance: Decimal
    ratio: float
    color: Color
    priority: Priority
    tags: frozenset[str]
    address: Address
    history: list[Address]
    scores: dict[str, int]
    pair: tuple[int, str]


class Aliased(BaseModel):
    user_id: UUID = Field(alias="userId")
    display_name: str = Field(alias="displayName")


# --- strategies --------------------------------------------------------------------------------
# Any offset Python allows that ISO 8601 can write: whole minutes, strictly under a day.
offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)
naive_datetimes = st.datetimes()
aware_datetimes = st.datetimes(timezones=offsets)
finite_decimals = st.decimals(allow_nan=False, allow_infinity=False)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)

addresses = st.builds(Address, street=st.text(), postcode=st.none() | st.text(max_size=10))
accounts = st.builds(
    Account,
    id=st.uuids(),
    email=st.emails(),
    created_at=aware_datetimes,
    birthday=st.none() | st.dates(),
    balance=finite_decimals,
    ratio=finite_floats,
    color=st.sampled_from(Color),
    priority=st.sampled_from(Priority),
    tags=st.frozensets(st.text(max_size=8), max_size=5),
    address=addresses,
    history=st.lists(addresses, max_size=5),
    scores=st.dictionaries(st.text(max_size=8), st.integers(), max_size=5),
    pair=st.tuples(st.integers(), st.text()),
)
aliased = st.builds(Aliased, userId=st.uuids(), displayName=st.text())


@dataclasses.dataclass(frozen=True)
class Case:
    """A target type and a strategy for its values."""

    name: str
    target: Any
    values: st.SearchStrategy[Any]


ROUND_TRIP_CASES = [
    Case("uuid", UUID, st.uuids()),
    Case("naive datetime", dt.datetime, naive_datetimes),
    Case("aware datetime", dt.datetime, aware_datetimes),
    Case("date", dt.date, st.dates()),
    Case("time", dt.time, st.times(timezones=st.none() | offsets)),
    Case("decimal", Decimal, finite_decimals),
    Case("float", float, finite_floats),
    Case("int", int, st.integers()),
    Case("str", str, st.text()),
    Case("str enum", Color, st.sampled_from(Color)),
    Case("int enum", Priority, st.sampled_from(Priority)),
    Case("legacy str enum", LegacyRole, st.sampled_from(LegacyRole)),
    Case("plain enum", Level, st.sampled_from(Level)),
    Case("model", Account, accounts),
    Case("model with aliases", Aliased, aliased),
    Case("set of int", set[int], st.sets(st.integers())),
    Case("set of uuid", set[UUID], st.sets(st.uuids())),
    Case("frozenset of str", frozenset[str], st.frozensets(st.text())),
    Case("set of enum", set[Level], st.sets(st.sampled_from(Level))),
    Case("tuple", tuple[int, str, UUID], st.tuples(st.integers(), st.text(), st.uuids())),
    Case("variadic tuple", tuple[dt.date, ...], st.lists(st.dates()).map(tuple)),
    Case(
        "nested containers",
        dict[str, list[dict[str, int | None]]],
        st.dictionaries(
            st.text(),
            st.lists(st.dictionaries(st.text(), st.none() | st.integers()), max_size=5),
            max_size=5,
        ),
    ),
    Case(
        "mixed nesting",
        list[tuple[UUID, dt.datetime, dict[str, Decimal]]],
        st.lists(
            st.tuples(
                st.uuids(),
                aware_datetimes,
                st.dictionaries(st.text(), finite_decimals, max_size=5),
            ),
            max_size=5,
        ),
    ),
    Case("int-keyed dict", dict[int, set[str]], st.dictionaries(st.integers(), st.sets(st.text()))),
    Case("list of models", list[Account], st.lists(accounts, max_size=3)),
]


@pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=lambda case: case.name)
@relaxed
@given(data=st.data())
def test_round_trip(case: Case, data: st.DataObject) -> None:
    value = data.draw(case.values, label=case.name)
    restored = serializer.deserialize(serializer.serialize(value), case.target)
    assert restored == value
    assert type(restored) is type(value)


@relaxed
@given(value=aware_datetimes)
def test_datetime_keeps_its_offset(value: dt.datetime) -> None:
    restored = serializer.deserialize(serializer.serialize(value), dt.datetime)
    # Equality of aware datetimes compares instants only; the offset must survive as well.
    assert restored.utcoffset() == value.utcoffset()
    assert restored.replace(tzinfo=None) == value.replace(tzinfo=None)


@relaxed
@given(value=naive_datetimes)
def test_naive_datetime_stays_naive(value: dt.datetime) -> None:
    restored = serializer.deserialize(serializer.serialize(value), dt.datetime)
    assert restored.tzinfo is None
    assert restored == value


@relaxed
@given(
    value=st.datetimes(
        min_value=dt.datetime(1800, 1, 1),
        max_value=dt.datetime(9998, 1, 1),
        timezones=st.integers(min_value=-86399, max_value=86399).map(
            lambda seconds: dt.timezone(dt.timedelta(seconds=seconds))
        ),
    )
)
def test_datetime_with_subminute_offset_keeps_its_instant(value: dt.datetime) -> None:
    # Offsets with seconds (the local mean time of old zones) have no ISO 8601 form.
    restored = serializer.deserialize(serializer.serialize(value), dt.datetime)
    assert restored == value
    offset = value.utcoffset()
    assert offset is not None
    if offset % dt.timedelta(minutes=1):
        assert restored.utcoffset() == dt.timedelta(0)
    else:
        assert restored.utcoffset() == offset


def test_time_with_subminute_offset_is_refused() -> None:
    value = dt.time(12, 0, tzinfo=dt.timezone(dt.timedelta(seconds=1172)))
    with pytest.raises(KafkaSerializationError, match="offset"):
        serializer.serialize(value)


def test_model_with_aliases_is_written_by_alias() -> None:
    value = Aliased(userId=UUID(int=7), displayName="Ada")
    assert json.loads(serializer.serialize(value)) == {
        "userId": str(UUID(int=7)),
        "displayName": "Ada",
    }


def test_enums_are_written_as_their_value() -> None:
    payload = [Color.RED, Priority.HIGH, LegacyRole.ADMIN, Level.INFO]
    assert serializer.serialize(payload) == b'["red",5,"admin",20]'


def test_equal_sets_give_equal_bytes() -> None:
    values = list(range(50))
    assert serializer.serialize(set(values)) == serializer.serialize(set(reversed(values)))


def test_dataclasses_are_written_as_objects() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        at: dt.date

    assert json.loads(serializer.serialize(Point(1, dt.date(2024, 2, 29)))) == {
        "x": 1,
        "at": "2024-02-29",
    }


# --- the output is plain JSON ----------------------------------------------------------------
specials = (
    st.uuids()
    | naive_datetimes
    | aware_datetimes
    | st.dates()
    | finite_decimals
    | st.sampled_from([*Color, *Priority, *LegacyRole, *Level])
    | accounts
)
json_scalars = st.none() | st.booleans() | st.integers() | finite_floats | st.text()
anything = st.recursive(
    json_scalars | specials,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(), children, max_size=4)
        | st.frozensets(st.uuids() | st.integers() | st.text(), max_size=4)
    ),
    max_leaves=20,
)


def _refuse(token: str) -> Any:
    raise AssertionError(f"non-JSON constant {token} in output")


@relaxed
@given(value=anything)
def test_output_is_strict_utf8_json(value: Any) -> None:
    encoded = serializer.serialize(value)
    assert isinstance(encoded, bytes)
    text = encoded.decode("utf-8", errors="strict")
    json.loads(text, parse_constant=_refuse)
    # Deserialising without a target gives exactly what any JSON reader sees.
    assert serializer.deserialize(encoded) == json.loads(text)


plain_json = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@relaxed
@given(value=plain_json)
def test_plain_json_values_round_trip_without_a_target(value: Any) -> None:
    assert serializer.deserialize(serializer.serialize(value)) == value


# --- what it refuses -----------------------------------------------------------------------------
class Opaque:
    """An object the serializer has no rule for."""


def _somewhere_inside(bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``bad`` alone, or buried in a list or a dict."""
    return st.one_of(
        bad,
        st.tuples(st.lists(st.integers(), max_size=3), bad).map(lambda t: [*t[0], t[1]]),
        st.tuples(st.text(), bad).map(lambda t: {"outer": {t[0]: t[1]}}),
    )


@relaxed
@given(value=_somewhere_inside(st.sampled_from([math.nan, math.inf, -math.inf])))
def test_non_finite_floats_are_refused(value: Any) -> None:
    with pytest.raises(KafkaSerializationError, match="cannot serialize value: Out of range float"):
        serializer.serialize(value)


@relaxed
@given(value=_somewhere_inside(st.binary()))
def test_bytes_are_refused(value: Any) -> None:
    with pytest.raises(KafkaSerializationError, match="cannot serialize bytes"):
        serializer.serialize(value)


@relaxed
@given(value=_somewhere_inside(st.builds(Opaque) | st.builds(object)))
def test_unknown_objects_are_refused_naming_their_type(value: Any) -> None:
    with pytest.raises(
        KafkaSerializationError, match=r"cannot serialize object of type (Opaque|object)"
    ):
        serializer.serialize(value)


@relaxed
@given(
    value=_somewhere_inside(
        st.sampled_from(["NaN", "-NaN", "sNaN", "Infinity", "-Infinity"]).map(Decimal)
    )
)
def test_non_finite_decimals_are_refused(value: Any) -> None:
    with pytest.raises(KafkaSerializationError, match="cannot serialize non-finite Decimal"):
        serializer.serialize(value)


def test_non_finite_float_inside_a_model_is_refused() -> None:
    class Reading(BaseModel):
        value: float

    with pytest.raises(KafkaSerializationError, match="Out of range float"):
        serializer.serialize(Reading(value=math.inf))


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(KafkaSerializationError, match="surrogates not allowed"):
        serializer.serialize({"name": "broken \ud800 text"})


def test_dict_keys_json_cannot_hold_are_refused() -> None:
    with pytest.raises(KafkaSerializationError, match="keys must be"):
        serializer.serialize({UUID(int=1): "x"})


def test_cycles_are_refused() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(KafkaSerializationError, match="Circular reference"):
        serializer.serialize(cycle)


def test_nesting_deeper_than_the_recursion_limit_is_refused() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(KafkaSerializationError, match="recursion"):
        serializer.serialize(deep)


# --- invalid input on the way back ---------------------------------------------------------------
INVALID_JSON = [
    b"",
    b"{",
    b"not json",
    b'{"a": }',
    b"[1, 2,]",
    b"NaN",
    b"[Infinity]",
    b"\xff\xfe1\x00",  # UTF-16 that json.loads would otherwise guess
    b'"\xc3\x28"',  # invalid UTF-8
    b"[" * 100_000,
]


@pytest.mark.parametrize("data", INVALID_JSON, ids=lambda data: repr(data[:12]))
@pytest.mark.parametrize("target", [None, list[int]], ids=["untyped", "typed"])
def test_invalid_json_is_refused(data: bytes, target: Any) -> None:
    with pytest.raises(KafkaSerializationError, match="cannot deserialize message"):
        serializer.deserialize(data, target)


@relaxed
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    try:
        expected = json.loads(data.decode("utf-8"), parse_constant=_refuse)
    except (ValueError, AssertionError):
        with pytest.raises(KafkaSerializationError):
            serializer.deserialize(data)
    else:
        assert serializer.deserialize(data) == expected


def test_wrong_shape_is_refused_without_echoing_the_input() -> None:
    secret = "one-time-token-3f9a"
    with pytest.raises(
        KafkaSerializationError, match="postcode: Input should be a valid string"
    ) as info:
        serializer.deserialize(json.dumps({"street": 1, "postcode": [secret]}), Address)
    assert secret not in str(info.value)


# --- keys --------------------------------------------------------------------------------------
@relaxed
@given(key=st.text())
def test_str_keys_round_trip(key: str) -> None:
    assert serializer.deserialize_key(serializer.serialize_key(key)) == key


@relaxed
@given(key=st.uuids())
def test_uuid_keys_round_trip_as_their_text(key: UUID) -> None:
    restored = serializer.deserialize_key(serializer.serialize_key(key))
    assert restored == str(key)
    assert UUID(restored) == key


@relaxed
@given(key=st.integers())
def test_int_keys_round_trip_as_their_text(key: int) -> None:
    restored = serializer.deserialize_key(serializer.serialize_key(key))
    assert restored is not None
    assert int(restored) == key


def test_enum_keys_are_their_value() -> None:
    # str() of these would be "LegacyRole.ADMIN" and "Level.INFO"-like forms.
    assert serializer.serialize_key(LegacyRole.ADMIN) == b"admin"
    assert serializer.serialize_key(Color.GREEN) == b"green"
    assert serializer.serialize_key(Priority.HIGH) == b"5"


def test_none_key_stays_none() -> None:
    assert serializer.serialize_key(None) is None
    assert serializer.deserialize_key(None) is None


@pytest.mark.parametrize("key", [True, False, 1.5, 0.0, b"raw", dt.date(2024, 1, 1)])
def test_other_keys_are_refused(key: Any) -> None:
    with pytest.raises(KafkaSerializationError, match="as a message key"):
        serializer.serialize_key(key)


def test_key_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(KafkaSerializationError, match="not UTF-8"):
        serializer.deserialize_key(b"\xff\xfe")
    with pytest.raises(KafkaSerializationError, match="surrogates not allowed"):
        serializer.serialize_key("\udc80")
