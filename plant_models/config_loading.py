"""Load frozen pydantic configuration models from YAML with errors a user can act on.

Every configuration in this project is a pydantic model with ``frozen=True``
and ``extra="forbid"``. :func:`load_yaml_model` reads one file, validates it
and, on failure, raises :class:`~plant_models.errors.ConfigError` whose message
names the file, the dotted path of each offending field, what was expected
(with the field's unit where it has one) and, for a misspelt field, the
closest valid names.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from plant_models.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class FrozenConfig(BaseModel):
    """Base of every configuration model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
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


def validate_model(model_cls: type[ModelT], data: Any, *, source: str) -> ModelT:
    """Validate ``data`` as ``model_cls``; ``source`` names where it came from in errors."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model_cls, source=source)) from None


def load_yaml_model(path: str | Path, model_cls: type[ModelT]) -> ModelT:
    """Load and validate one YAML configuration file."""
    path = Path(path)
    return validate_model(model_cls, read_yaml_mapping(path), source=str(path))


def format_validation_error(exc: ValidationError, model_cls: type[BaseModel], *, source: str) -> str:
    """Render a pydantic error as lines of ``file: field.path: problem (expected …)``."""
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem{'s' if exc.error_count() != 1 else ''})"]
    for error in exc.errors(include_url=False):
        location = [part for part in error["loc"]]
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
