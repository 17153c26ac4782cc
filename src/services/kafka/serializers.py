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


def _encode_special(value: Any) -> Any:
    """``json.dumps`` hook for the types JSON has no word for."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
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
        except (TypeError, ValueError) as exc:
            # e.g. NaN/Infinity (not JSON), dict keys that are not str/int/float/bool/None, cycles.
            raise KafkaSerializationError(f"cannot serialize value: {exc}") from exc
        return text.encode(self.encoding)

    @overload
    def deserialize(self, data: bytes | str, target: None = None) -> Any: ...
    @overload
    def deserialize(self, data: bytes | str, target: type[T]) -> T: ...
    def deserialize(self, data: bytes | str, target: Any = None) -> Any:
        """Decode JSON; with ``target`` (a type or typing form), rebuild that type from it."""
        try:
            if target is None:
                return json.loads(data)
            return _adapter(target).validate_json(data)
        except (ValueError, ValidationError) as exc:
            raise KafkaSerializationError(f"cannot deserialize message: {exc}") from exc

    def serialize_key(self, key: str | UUID | int | None) -> bytes | None:
        """Keys are plain UTF-8 text (a user id), so partitioning is the same in every client."""
        if key is None:
            return None
        if isinstance(key, str | UUID | int) and not isinstance(key, bool):
            return str(key).encode(self.encoding)
        raise KafkaSerializationError(f"cannot use {type(key).__name__} as a message key")

    def deserialize_key(self, data: bytes | None) -> str | None:
        return None if data is None else data.decode(self.encoding)
