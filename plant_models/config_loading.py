"""Load frozen pydantic configuration models from YAML with errors a user can act on.

Every configuration in this project is a pydantic model derived from
:class:`FrozenConfig`: frozen, unknown fields rejected, every float finite,
booleans only ``true`` or ``false``. :func:`load_yaml_model` reads one file,
validates it and, on failure, raises :class:`~plant_models.errors.ConfigError`
whose message names the file, the dotted path of each offending field, the
value, what was expected (with the field's unit where it has one) and, for a
misspelt field, the closest valid names.

The YAML is read with the YAML 1.2 core schema's booleans: only ``true`` and
``false`` (any case) are booleans, so ``mode: off`` is the string ``"off"``
and a ``yes`` where a boolean belongs is refused rather than guessed. A key
given twice in one mapping is an error, not "the last one wins".

A check across fields (a model validator) raises :class:`FieldError` naming
the field, its value and what was expected, and the error is rendered like
any other field's; a check across files (a runtime config against its batch)
raises :func:`config_error`, rendered the same way.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from plant_models.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class FieldError(ValueError):
    """A cross-field problem found by a model validator: which field (relative to that model), its value, what was expected."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(f"{field}: {expected}; got {value!r}")
        self.field = field
        self.value = value
        self.expected = expected


class FrozenConfig(BaseModel):
    """Base of every configuration model: immutable, unknown fields rejected, floats finite, booleans strict.

    ``.inf`` and ``.nan`` are refused for every float (a rate, a limit or a
    scale that is not a number is a typo, never a setting). A boolean field
    takes only ``true`` or ``false``, not ``"yes"``, ``"true"`` or ``1``; a
    number field does not take ``true`` or ``false``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _booleans_only_where_booleans_belong(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or value is None:
                continue
            kind = _scalar_kind(field.annotation)
            if kind == "bool" and not isinstance(value, bool):
                raise FieldError(name, value, "must be true or false, unquoted (yes/no, on/off, 0/1 and strings are not booleans here)")
            if kind == "number" and isinstance(value, bool):
                raise FieldError(name, value, "must be a number, not true or false")
        return data


def _scalar_kind(annotation: Any) -> str | None:
    """'bool' for a boolean field, 'number' for an int or float field (either optional), else None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    options = tuple(option for option in options if option is not type(None))
    if options == (bool,):
        return "bool"
    if options and all(option in (int, float) for option in options):
        return "number"
    return None


_YAML_BOOL = "tag:yaml.org,2002:bool"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core booleans (true/false only) and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise _DuplicateKeyError(key, seen[key].start_mark.line + 1, key_node.start_mark.line + 1)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _YAML_BOOL] for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_YAML_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")
        self.key = key
        self.first_line = first_line
        self.line = line


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a UTF-8 YAML file whose top level must be a mapping (YAML 1.2 booleans, no duplicate keys)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} (line {line}) cannot be decoded; save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}: a mapping takes each key once (YAML would silently keep the last)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def validate_model(model_cls: type[ModelT], data: Any, *, source: str, context: dict[str, Any] | None = None) -> ModelT:
    """Validate ``data`` as ``model_cls``; ``source`` names where it came from in errors."""
    try:
        return model_cls.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model_cls, source=source)) from None


def load_yaml_model(path: str | Path, model_cls: type[ModelT]) -> ModelT:
    """Load and validate one YAML configuration file."""
    path = Path(path)
    return validate_model(model_cls, read_yaml_mapping(path), source=str(path))


def config_error(source: str, field: str, value: Any, expected: str) -> ConfigError:
    """A problem found across files (a runtime config against its batch), worded like a validation error."""
    return ConfigError(f"{source}: invalid configuration (1 problem)\n  {source}: {field}: {expected}; got {value!r}")


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel], *, source: str) -> str:
    """Render a pydantic error as lines of ``file: field.path: problem (expected …); got value``."""
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''})"]
    for error in exc.errors(include_url=False):
        location = list(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            location.append(cause.field)
            lines.append(f"  {source}: {'.'.join(str(part) for part in location)}: {cause.expected}; got {cause.value!r}")
            continue
        dotted = ".".join(str(part) for part in location) or "<top level>"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            allowed = _allowed_fields(model_cls, location[:-1])
            guess = difflib.get_close_matches(str(location[-1]), allowed, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            message = f"unknown field{hint} Allowed here: {', '.join(sorted(allowed))}"
        else:
            message = message.removeprefix("Value error, ")
            description = _field_description(model_cls, location)
            if description:
                message = f"{message} (expected: {description})"
            if error["type"] != "missing" and not isinstance(error.get("input"), dict | list):
                message = f"{message}; got {error.get('input')!r}"
        lines.append(f"  {source}: {dotted}: {message}")
    return "\n".join(lines)


def _submodel(model_cls: type[BaseModel] | None, location: list[Any]) -> type[BaseModel] | None:
    """Follow ``location`` through nested models (skipping list indices and dict keys)."""
    current = model_cls
    for part in location:
        if current is None:
            return None
        if not isinstance(part, str) or part not in current.model_fields:
            continue
        current = _model_in_annotation(current.model_fields[part].annotation)
    return current


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(argument)
        if found is not None:
            return found
    return None


def _allowed_fields(model_cls: type[BaseModel], location: list[Any]) -> list[str]:
    sub = _submodel(model_cls, location)
    return list(sub.model_fields) if sub is not None else []


def _field_description(model_cls: type[BaseModel], location: list[Any]) -> str | None:
    if not location or not isinstance(location[-1], str):
        return None
    sub = _submodel(model_cls, location[:-1])
    if sub is None or location[-1] not in sub.model_fields:
        return None
    return sub.model_fields[location[-1]].description
