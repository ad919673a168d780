"""Device classes: what a kind of home device can carry and what a model must stay within.

Declared in YAML (``deploy/device-classes/*.yaml``; later also as a Kubernetes custom
resource) and validated here before anything uses them: a malformed file is refused
with the field named and the expected form, never half-applied.

Numbers are read strictly, because a value the operator did not mean is worse than a
refusal: a boolean is never a number, a duplicate key is refused rather than silently
overriding, a unit belongs in the key's name (``p95_latency_ms: 20``, not ``20ms``), and
a fraction above 0.5 for ``max_accuracy_drop`` is taken for percent points and refused.
PyYAML reads ``5e6`` as text (YAML 1.1), so numeric text is accepted as the number it
spells.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from artifact.names import check_name

MERGE_TAG = "tag:yaml.org,2002:merge"
# A plain decimal number, possibly in scientific notation; no inf/nan, no hex.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER_AND_UNIT = re.compile(rf"({_NUMBER.pattern})\s*([^\d\s.+-][^\s]*)")
# A whole number written with more digits than this is refused before it is expanded.
_MAX_DIGITS = 30
# Above this a max_accuracy_drop is almost surely percent points written as a fraction.
MAX_ACCURACY_DROP = 0.5


class DeviceClassError(ValueError):
    """A device-class file that cannot be read or does not match the schema."""


def _plain(number: Decimal) -> str:
    """``number`` as an operator would type it: 50000000, 0.05 (never 5E+7)."""
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _spelled(value: object) -> str:
    """The value as the YAML file most likely spelled it."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (YAML reads true/false, yes/no and on/off as booleans)"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


@dataclass(frozen=True)
class _Quantity:
    """What a numeric field holds, so a refusal can say how to write it."""

    expected: str  # e.g. "a number in milliseconds (the unit is in the key's name)"
    whole: bool = False
    # lower-case unit an operator might append -> factor into the field's own unit
    units: Mapping[str, Decimal] = field(default_factory=dict)

    def refuse(self, value: object, hint: str = "") -> PydanticCustomError:
        return PydanticCustomError(
            "device_class_number",
            "expected {expected}, got {got}{hint}",
            {"expected": self.expected, "got": _spelled(value), "hint": hint},
        )

    def read(self, value: object) -> object:
        """The number ``value`` stands for; anything else is refused with the expected form."""
        if isinstance(value, bool):
            raise self.refuse(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if not math.isfinite(value) or (self.whole and not value.is_integer()):
                raise self.refuse(value)
            return int(value) if self.whole else value
        if isinstance(value, str):
            return self._read_text(value)
        raise self.refuse(value)

    def _read_text(self, text: str) -> int | float:
        stripped = text.strip()
        if _NUMBER.fullmatch(stripped):
            number = Decimal(stripped)
            if self.whole:
                # adjusted() is the decimal exponent: '1e999999999' must not become an int
                if number != number.to_integral_value() or number.adjusted() > _MAX_DIGITS:
                    raise self.refuse(text)
                return int(number)
            as_float = float(number)
            if not math.isfinite(as_float):
                raise self.refuse(text)
            return as_float
        raise self.refuse(text, self._unit_hint(stripped))

    def _unit_hint(self, text: str) -> str:
        """': write 50000000' for '50MB' when the unit is one this field's unit converts from."""
        match = _NUMBER_AND_UNIT.fullmatch(text)
        if match is None:
            return ""
        factor = self.units.get(match.group(2).lower())
        if factor is None:
            return ""
        try:
            converted = Decimal(match.group(1)) * factor
        except InvalidOperation:  # pragma: no cover - the pattern only admits decimals
            return ""
        if self.whole and converted != converted.to_integral_value():
            return ""
        return f": write {_plain(converted)}"


_IN_KEY = "(the unit is in the key's name)"
_BYTES = _Quantity(
    f"a whole number of bytes {_IN_KEY}",
    whole=True,
    units={
        "b": Decimal(1),
        "byte": Decimal(1),
        "bytes": Decimal(1),
        "kb": Decimal(10**3),
        "mb": Decimal(10**6),
        "gb": Decimal(10**9),
        "kib": Decimal(2**10),
        "mib": Decimal(2**20),
        "gib": Decimal(2**30),
    },
)
_MILLISECONDS = _Quantity(
    f"a number in milliseconds {_IN_KEY}",
    units={"ms": Decimal(1), "s": Decimal(1000), "us": Decimal("0.001"), "µs": Decimal("0.001")},
)
_MILLIJOULES = _Quantity(
    "a number in millijoules (the unit, mJ, is in the key's name)",
    units={"mj": Decimal(1), "j": Decimal(1000)},
)
_WATTS = _Quantity(
    f"a number in watts {_IN_KEY}",
    units={"w": Decimal(1), "watts": Decimal(1), "mw": Decimal("0.001")},
)
_CORES = _Quantity("a whole number of CPU cores", whole=True)
_SPEED = _Quantity("a number (per-core speed relative to the measuring machine, 1.0 = same)")
_DROP = _Quantity("a fraction (0.01 = one point of accuracy)", units={"%": Decimal("0.01")})
_FIDELITY = _Quantity("a fraction in (0, 1] (0.98 = 98 %)", units={"%": Decimal("0.01")})

# Strict after the readers: bool never passes as a number, an int still passes as a float.
Bytes = Annotated[int, BeforeValidator(_BYTES.read), Strict()]
Cores = Annotated[int, BeforeValidator(_CORES.read), Strict()]
Milliseconds = Annotated[float, BeforeValidator(_MILLISECONDS.read), Strict()]
Millijoules = Annotated[float, BeforeValidator(_MILLIJOULES.read), Strict()]
Watts = Annotated[float, BeforeValidator(_WATTS.read), Strict()]
Speed = Annotated[float, BeforeValidator(_SPEED.read), Strict()]
AccuracyDrop = Annotated[float, BeforeValidator(_DROP.read), Strict()]
Fidelity = Annotated[float, BeforeValidator(_FIDELITY.read), Strict()]


class PowerModel(BaseModel):
    """Watts drawn idle and with every core busy; energy is estimated between the two."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    idle_watts: Watts = Field(ge=0)
    active_watts: Watts = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PowerModel:
        if self.active_watts < self.idle_watts:
            raise ValueError("active_watts must be >= idle_watts")
        return self

    def joules(self, seconds: float, busy_cores: float, cores: int) -> float:
        """Energy over ``seconds`` with ``busy_cores`` of ``cores`` working."""
        share = min(max(busy_cores / cores, 0.0), 1.0)
        return seconds * (self.idle_watts + (self.active_watts - self.idle_watts) * share)


class Budgets(BaseModel):
    """What an artifact for this class must meet; None = no budget on that quantity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_artifact_bytes: Bytes | None = Field(default=None, gt=0)
    p95_latency_ms: Milliseconds | None = Field(default=None, gt=0)
    energy_per_inference_mj: Millijoules | None = Field(default=None, gt=0)
    max_accuracy_drop: AccuracyDrop | None = Field(default=None, ge=0)
    min_fidelity: Fidelity | None = Field(default=None, gt=0)

    @field_validator("max_accuracy_drop")
    @classmethod
    def _drop_is_a_fraction(cls, value: float | None) -> float | None:
        if value is not None and value > MAX_ACCURACY_DROP:
            points = "point" if value == 1 else "points"
            write = f": for {value:g} {points} write {value / 100:g}" if value <= 100 else ""
            raise PydanticCustomError(
                "accuracy_drop_percent",
                "{value} would allow an accuracy drop of {drop} points: it is a fraction "
                "(0.01 = one point), and above {limit} is refused as meant in percent{write}",
                {
                    "value": f"{value:g}",
                    "drop": f"{value * 100:g}",
                    "limit": MAX_ACCURACY_DROP,
                    "write": write,
                },
            )
        return value

    @field_validator("min_fidelity")
    @classmethod
    def _fidelity_is_a_fraction(cls, value: float | None) -> float | None:
        if value is not None and value > 1:
            write = f": for {value:g} % write {value / 100:g}" if value <= 100 else ""
            raise PydanticCustomError(
                "fidelity_percent",
                "{value} is above 1: the value is a fraction (0.98 = 98 %){write}",
                {"value": f"{value:g}", "write": write},
            )
        return value


class DeviceClass(BaseModel):
    """One kind of device: its hardware, its power model and its budgets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cores: Cores = Field(ge=1, le=256)
    relative_speed: Speed = Field(
        gt=0, le=100, description="per-core speed relative to the machine measuring (1.0 = same)"
    )
    memory_bytes: Bytes = Field(gt=0)
    model_storage_bytes: Bytes = Field(gt=0)
    power: PowerModel
    budgets: Budgets

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, field="device class name")

    @model_validator(mode="after")
    def _storage(self) -> DeviceClass:
        limit = self.budgets.max_artifact_bytes
        if limit is not None and limit > self.model_storage_bytes:
            raise ValueError(
                f"budgets.max_artifact_bytes ({limit}) exceeds model_storage_bytes "
                f"({self.model_storage_bytes}): the artifact could never be stored"
            )
        return self

    def loosened_by(self, **overrides: float | int | None) -> list[str]:
        """The overrides that would loosen a budget of this class ('p95_latency_ms 30 >
        the class's 20'), for a note: a flag may loosen a class for one run, knowingly."""
        budgets = self.budgets
        looser = []
        for name, value in overrides.items():
            current = getattr(budgets, name)
            if value is None or current is None:
                continue
            lower_is_tighter = name != "min_fidelity"
            if (value > current) if lower_is_tighter else (value < current):
                relation = ">" if lower_is_tighter else "<"
                looser.append(f"{name} {value:g} {relation} the class's {current:g}")
        return looser

    def with_budgets(self, **overrides: float | int | None) -> DeviceClass:
        """A copy whose budgets are replaced for one run (CLI flags); None keeps a budget.

        The copy is validated as a whole class, so an override that contradicts it (an
        artifact larger than the device can store) is refused like the same value in YAML.
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        data = self.model_dump()
        data["budgets"] = {**data["budgets"], **changes}
        return type(self).model_validate(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping instead of keeping the last."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # '<<: *defaults' may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader itself refuses an unhashable key below
            if key in first:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first[key]}): give each key once",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> object:
    """``yaml.safe_load`` that refuses a duplicate key (a ``yaml.YAMLError`` naming both lines)."""
    loaded: object = yaml.load(text, Loader=_UniqueKeyLoader)
    return loaded


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its '<unicode string>' source name: line, column, problem."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return str(problem)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def validation_problems(exc: ValidationError) -> str:
    """One 'field.path: problem' per error, joined on one line with '; '."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
        for err in exc.errors()
    )


def load_device_class(path: Path) -> DeviceClass:
    """Read and validate one YAML file; the error names the file and every bad field."""
    try:
        raw = read_yaml(path.read_text())
    except OSError as exc:
        raise DeviceClassError(f"cannot read device class file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DeviceClassError(f"{path} is not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise DeviceClassError(f"{path} must hold a mapping with name, arch, cores, ... budgets")
    try:
        return DeviceClass.model_validate(raw)
    except ValidationError as exc:
        raise DeviceClassError(
            f"{path} is not a valid device class: {validation_problems(exc)}"
        ) from exc
