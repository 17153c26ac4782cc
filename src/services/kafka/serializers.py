"""JSON (de)serialisation of Kafka message values and keys.

Values are plain JSON so that any consumer, in any language, can read them: UUIDs and Decimals
become strings, datetimes and dates ISO 8601 (offset kept), Enums their value, sets and tuples
lists, Pydantic models their JSON form. Plain JSON loses the Python types, so deserialisation
takes an optional target type and lets Pydantic rebuild them: ``deserialize(serialize(v), T) == v``
for every value ``v`` of a supported type ``T``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from typing import Any, TypeVar, overload
from uuid import UUID

from pydantic import BaseModel, TypeAdapter, ValidationError

T = TypeVar("T")


class KafkaSerializationError(ValueError):
    """A value could not be encoded or decoded; the message says which and why."""


@lru_cache(maxsize=256)
def _adapter(target: Any) -> TypeAdapter[Any]:
    return TypeAdapter(target)


def _has_subminute_offset(offset: dt.timedelta | None) -> bool:
    return offset is not None and offset % dt.timedelta(minutes=1) != dt.timedelta(0)


def _encode_datetime(value: dt.datetime) -> str:
    # ISO 8601 (and Pydantic) offsets are whole minutes; Python's may carry seconds, as in the
    # local mean time of pre-1900 zones. Such a value is sent in UTC: the instant is kept.
    if _has_subminute_offset(value.utcoffset()):
        try:
            value = value.astimezone(dt.UTC)
        except OverflowError as exc:
            raise KafkaSerializationError(f"cannot serialize datetime {value!r}") from exc
    return value.isoformat()


def _describe(exc: Exception) -> str:
    """Why decoding failed, without the input: a message may carry a one-time token."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
    return str(exc)


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and which serialize() refuses.
    raise ValueError(f"{name} is not valid JSON")


def _encode_special(value: Any) -> Any:
    """``json.dumps`` hook for the types JSON has no word for."""
    if isinstance(value, BaseModel):
        # By alias, because that is what validation expects back (``populate_by_name`` is off).
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return _encode_datetime(value)
    if isinstance(value, dt.time) and _has_subminute_offset(value.utcoffset()):
        # Without a date there is no UTC equivalent to fall back on.
        raise KafkaSerializationError(f"cannot serialize time with offset {value.utcoffset()}")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise KafkaSerializationError(f"cannot serialize non-finite Decimal {value}")
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        # Sorted where possible, so equal sets always give equal bytes.
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, bytes):
        raise KafkaSerializationError("cannot serialize bytes: encode them (e.g. base64) first")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise KafkaSerializationError(f"cannot serialize object of type {type(value).__name__}")


class KafkaSerializer:
    """Turns message values and keys into bytes and back."""

    encoding = "utf-8"

    def serialize(self, value: Any) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON, or raise ``KafkaSerializationError``."""
        try:
            text = json.dumps(
                value,
                default=_encode_special,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            )
        except KafkaSerializationError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            # e.g. NaN/Infinity (not JSON), dict keys that are not str/int/float/bool/None, cycles,
            # nesting deeper than the interpreter's recursion limit.
            raise KafkaSerializationError(f"cannot serialize value: {exc}") from exc
        try:
            return text.encode(self.encoding)
        except UnicodeEncodeError as exc:
            # A lone surrogate in a str: it has no UTF-8 form, so no consumer could read it.
            raise KafkaSerializationError(f"cannot serialize value: {exc.reason}") from exc

    @overload
    def deserialize(self, data: bytes | str, target: None = None) -> Any: ...
    @overload
    def deserialize(self, data: bytes | str, target: type[T]) -> T: ...
    def deserialize(self, data: bytes | str, target: Any = None) -> Any:
        """Decode JSON; with ``target`` (a type or typing form), rebuild that type from it."""
        try:
            # Strictly UTF-8: ``json.loads`` would also guess UTF-16/32 from the bytes.
            text = data.decode(self.encoding) if isinstance(data, bytes) else data
            if target is None:
                return json.loads(text, parse_constant=_refuse_constant)
            return _adapter(target).validate_json(text)
        except (ValueError, ValidationError, RecursionError) as exc:
            raise KafkaSerializationError(f"cannot deserialize message: {_describe(exc)}") from exc

    def serialize_key(self, key: str | UUID | int | None) -> bytes | None:
        """Keys are plain UTF-8 text (a user id), so partitioning is the same in every client."""
        if key is None:
            return None
        if isinstance(key, bool) or not isinstance(key, str | UUID | int):
            raise KafkaSerializationError(f"cannot use {type(key).__name__} as a message key")
        # The plain str/int form, also for subclasses: ``str()`` of a ``(str, Enum)`` member
        # would give "Color.RED" where the value serializer gives "red".
        if isinstance(key, str):
            text = str.__str__(key)
        elif isinstance(key, int):
            text = int.__repr__(key)
        else:
            text = str(key)
        try:
            return text.encode(self.encoding)
        except UnicodeEncodeError as exc:
            raise KafkaSerializationError(f"cannot use key: {exc.reason}") from exc

    def deserialize_key(self, data: bytes | None) -> str | None:
        if data is None:
            return None
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise KafkaSerializationError(f"message key is not UTF-8: {exc.reason}") from exc
