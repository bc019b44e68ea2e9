"""Tag maps: where each logical signal lives on a PLC, how it is encoded and scaled.

A tag map is configuration (YAML in ``configs/plc/``): a PLC that names or
scales its tags differently is a new file, not new code. The defaults map the
reference interface exactly (``shared/reference-plc.md``):
``configs/plc/reference-opcua.yaml`` and ``configs/plc/reference-modbus.yaml``.

Scaling: engineering value = raw value × ``scale`` + ``offset``, for real
signals only (the runtime works in the reference units of
:data:`interfaces.signals.SIGNALS`).

OPC UA security (:class:`OpcUaSecurity`, the map's optional ``security``
section): the mode, the policy, the client certificate and key, the directory
of trusted server certificates, and *where* the user credentials are (names
of environment variables, a password file), never the credentials themselves.
Relative paths are relative to the tag map file. See docs/opcua-security.md.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from interfaces.signals import SIGNALS, Kind
from plant_models.config_loading import FieldError, FrozenConfig, format_validation_error, read_yaml_mapping
from plant_models.errors import ConfigError

SecurityMode = Literal["sign_and_encrypt", "sign", "none"]
SecurityPolicyName = Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
OpcUaType = Literal["double", "float", "uint32", "int32", "uint16", "int16", "boolean", "string"]
ModbusType = Literal["float32", "float64", "uint16", "int16", "uint32", "int32", "string", "bool"]
ModbusTable = Literal["input", "holding", "coil", "discrete"]
WordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
"""The byte order of a 16-, 32- or 64-bit value over its registers, A the most significant byte, in address order."""
ModbusWordOrder = Literal["ABCD", "CDAB", "BADC", "DCBA", "big", "little"]
"""A :data:`WordOrder`, or pymodbus's names for the first two: ``big`` is ABCD, ``little`` CDAB."""
_WORD_ORDERS: dict[ModbusWordOrder, WordOrder] = {"ABCD": "ABCD", "CDAB": "CDAB", "BADC": "BADC", "DCBA": "DCBA", "big": "ABCD", "little": "CDAB"}

_TYPES_FOR_KIND: dict[Kind, frozenset[str]] = {
    Kind.REAL: frozenset({"double", "float", "float32", "float64", "uint32", "int32", "uint16", "int16"}),
    Kind.UNSIGNED: frozenset({"uint32", "uint16"}),
    Kind.INTEGER: frozenset({"int32", "int16", "uint32", "uint16"}),
    Kind.BOOLEAN: frozenset({"boolean", "bool"}),
    Kind.TEXT: frozenset({"string"}),
}
REGISTERS_PER_TYPE: dict[str, int] = {"float32": 2, "float64": 4, "uint16": 1, "int16": 1, "uint32": 2, "int32": 2}


class _Scaled(FrozenConfig):
    scale: float = Field(default=1.0, description="engineering value = raw × scale + offset")
    offset: float = Field(default=0.0, description="engineering value = raw × scale + offset")

    @model_validator(mode="after")
    def _nonzero_scale(self) -> _Scaled:
        if self.scale == 0.0:
            raise FieldError("scale", self.scale, "must not be 0 (engineering value = raw × scale + offset; a write divides by it)")
        return self

    @property
    def scaled(self) -> bool:
        return (self.scale, self.offset) != (1.0, 0.0)

    def to_engineering(self, raw: Any) -> Any:
        """The engineering value of a raw one; an unscaled tag (every non-real signal) passes it through unchanged."""
        return raw * self.scale + self.offset if self.scaled else raw

    def to_raw(self, value: Any) -> Any:
        """The raw value of an engineering one; an unscaled tag passes it through unchanged."""
        return (value - self.offset) / self.scale if self.scaled else value


UINT32_MAX = 4_294_967_295
_NAMESPACE_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


def split_browse_path(path: str) -> list[tuple[str | None, str]]:
    """The segments of a browse path ``name/name/...``, each as (namespace name or None, browse name).

    A segment may start with ``<namespace>:`` (a name from the map's
    ``namespaces``); ``&`` escapes the next character, so ``&/``, ``&:`` and
    ``&&`` stand for themselves in a browse name. Raises :class:`ValueError`
    for an empty segment or a dangling ``&``.
    """
    segments: list[tuple[str | None, str]] = []
    namespace: str | None = None
    name: list[str] = []
    escaped = False

    def end_segment() -> None:
        if not name:
            raise ValueError(f"browse path {path!r}: an empty browse name (two '/' in a row, a leading or trailing '/', or '<namespace>:' alone)")
        segments.append((namespace, "".join(name)))

    for character in path:
        if escaped:
            name.append(character)
            escaped = False
        elif character == "&":
            escaped = True
        elif character == ":" and namespace is None and name:
            namespace, name = "".join(name), []
        elif character == "/":
            end_segment()
            namespace, name = None, []
        else:
            name.append(character)
    if escaped:
        raise ValueError(f"browse path {path!r}: ends with a lone '&' (it escapes the next character)")
    end_segment()
    return segments


class OpcUaTag(_Scaled):
    """Where a signal lives on an OPC UA server: a node id, or a browse path from the Objects folder, in a namespace.

    ``node`` is the identifier alone: a string (``BR01.PV.Temperature``, i.e.
    ``s=``) or a non-negative integer (``i=``). ``browse_path`` is
    ``name/name/...`` from the Objects folder (``BR01/PV/Temperature``),
    resolved by the server (TranslateBrowsePathsToNodeIds) at every connect.
    Give one of the two. ``namespace`` names one of the map's ``namespaces``;
    without it the tag is in ``namespace_uri``.
    """

    node: Annotated[int, Field(ge=0, le=UINT32_MAX, strict=True)] | str | None = Field(
        default=None, description="node identifier in the tag's namespace: a string (s=), e.g. 'BR01.PV.Temperature', or an integer (i=), e.g. 6021"
    )
    browse_path: str | None = Field(
        default=None,
        min_length=1,
        description="instead of node: browse names from the Objects folder separated by '/', e.g. 'BR01/PV/Temperature'; "
        "a segment may start with '<namespace>:' (a name in namespaces); '&' escapes '/', ':' and '&'",
    )
    namespace: str | None = Field(default=None, description="a name from the map's namespaces; default: the map's namespace_uri")
    type: OpcUaType = Field(description="the variable's data type; writes use it as the explicit variant type")

    @field_validator("node")
    @classmethod
    def _string_identifier(cls, node: int | str | None) -> int | str | None:
        if not isinstance(node, str):
            return node
        if not node:
            raise ValueError("an empty string is not a node identifier")
        if node != node.strip() or any(not character.isprintable() for character in node):
            raise ValueError("malformed: a string node id has no leading or trailing spaces and no control characters")
        if re.match(r"^(ns|nsu|i|s|g|b)=", node):
            raise ValueError(
                "malformed: give the identifier alone, without 'ns=…;s=' (the namespace comes from namespace_uri or the tag's namespace, its index from the server); "
                "a numeric identifier is an integer (node: 6021)"
            )
        return node

    @field_validator("browse_path")
    @classmethod
    def _browse_path(cls, path: str | None) -> str | None:
        if path is not None:
            split_browse_path(path)
        return path

    @model_validator(mode="after")
    def _one_address(self) -> OpcUaTag:
        if (self.node is None) == (self.browse_path is None):
            raise ValueError("give either node (a node id) or browse_path (browse names from the Objects folder), not both and not neither")
        return self

    @property
    def address(self) -> str:
        """The tag's address as a message shows it: the node identifier or the browse path, with its namespace name if any."""
        where = f"i={self.node}" if isinstance(self.node, int) else f"s={self.node}" if self.node is not None else f"browse path {self.browse_path}"
        return f"{where} in namespace {self.namespace}" if self.namespace is not None else where


class QualityBit(FrozenConfig):
    """A status bit in a register: set means the value is Bad (or not measured)."""

    table: Literal["input", "holding"] = "input"
    address: int = Field(ge=0, le=65535, description="register address, zero-based")
    bit: int = Field(ge=0, le=15, description="bit number, 0 = least significant")


class ModbusTag(_Scaled):
    table: ModbusTable = Field(description="input registers, holding registers, coils or discrete inputs")
    address: int = Field(ge=0, le=65535, description="first register or bit, zero-based")
    type: ModbusType = Field(description="encoding: 32/64-bit values span 2/4 registers in the tag's (or the map's) word_order")
    length: int | None = Field(default=None, ge=2, le=240, description="characters, for type 'string' (two per register)")
    bad_when: QualityBit | None = Field(default=None, description="the quality bit that marks this value Bad")
    word_order: ModbusWordOrder | None = Field(
        default=None,
        description="this value's byte order over its registers, A the most significant byte: ABCD (big), CDAB (little: low word first), "
        "BADC or DCBA (bytes swapped in each register, a 16-bit value too); default: the map's word_order",
    )

    @model_validator(mode="after")
    def _fits(self) -> ModbusTag:
        if self.length is not None and self.type != "string":
            raise FieldError("length", self.length, f"applies to type 'string' only, not '{self.type}'")
        if self.word_order is not None and self.type in ("bool", "string"):
            raise FieldError("word_order", self.word_order, f"applies to numbers only, not '{self.type}' (a string's characters run in address order)")
        last = self.address + self.register_count - 1
        if last > 65535:
            raise FieldError("address", self.address, f"leaves no room for the {self.register_count} registers of a {self.type} (the last address is 65535)")
        return self

    @property
    def register_count(self) -> int:
        if self.type == "bool":
            return 1
        if self.type == "string":
            return ((self.length or 0) + 1) // 2
        return REGISTERS_PER_TYPE[self.type]


def _check_signal_names(names: list[str], *, kinds: dict[str, str], scaled: dict[str, bool]) -> None:
    problems = []
    for name in names:
        if name not in SIGNALS:
            guess = difflib.get_close_matches(name, list(SIGNALS), n=1)
            problems.append(f"tags.{name}: unknown signal" + (f"; did you mean '{guess[0]}'?" if guess else ""))
            continue
        signal = SIGNALS[name]
        if kinds[name] not in _TYPES_FOR_KIND[signal.kind]:
            allowed = ", ".join(sorted(_TYPES_FOR_KIND[signal.kind]))
            problems.append(f"tags.{name}: type '{kinds[name]}' cannot carry a {signal.kind.value} signal (expected one of {allowed})")
        if signal.kind is not Kind.REAL and scaled[name]:
            problems.append(f"tags.{name}: scale and offset apply to real signals only")
    missing = [name for name, signal in SIGNALS.items() if signal.required and name not in names]
    if missing:
        problems.append(f"tags: required signals missing: {', '.join(missing)}")
    if problems:
        raise ValueError("; ".join(problems))


_SECRET_FIELDS = ("password", "passwd", "username", "user")
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _refuse_secrets(data: Any) -> None:
    """Refuse a credential written into the map itself, without echoing its value."""
    if isinstance(data, dict):
        for name in _SECRET_FIELDS:
            if name in data:
                kind = "password" if name.startswith("pass") else "user name"
                instead = "security.password_env or security.password_file" if kind == "password" else "security.username_env"
                raise ValueError(
                    f"{name}: a {kind} is never read from the tag map (a YAML file ends up in backups and version control); "
                    f"remove it and give {instead} (see docs/opcua-security.md)"
                )


def check_endpoint_has_no_credentials(endpoint: str) -> str:
    """An ``opc.tcp://user:password@host`` URL would smuggle credentials past the rules; it is refused."""
    if "@" in urlsplit(endpoint).netloc:
        raise ValueError("the endpoint URL must not hold a user name or password (user@host); give them as security.username_env / password_env")
    return endpoint


class OpcUaSecurity(FrozenConfig):
    """How the runtime secures its OPC UA link (the tag map's ``security`` section).

    ``sign_and_encrypt`` (the default) or ``sign`` need ``certificate``,
    ``private_key`` and ``trust_store``; ``none`` needs the runtime's explicit
    insecure opt-in and carries no credentials. Credentials are read when
    connecting: the user name from the environment variable
    ``username_env``, the password from the environment variable
    ``password_env`` or the file ``password_file`` (one of the two).
    """

    mode: SecurityMode = Field(default="sign_and_encrypt", description="message security: sign_and_encrypt, sign, or none (needs the insecure opt-in)")
    policy: SecurityPolicyName = Field(default="Basic256Sha256", description="security policy: Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss")
    certificate: Path | None = Field(default=None, description="the runtime's application instance certificate, DER or PEM (relative to the tag map file)")
    private_key: Path | None = Field(default=None, description="the certificate's unencrypted RSA private key, PEM or DER, mode 0600 (relative to the tag map file)")
    trust_store: Path | None = Field(default=None, description="directory of trusted server (or CA) certificates, *.der or *.pem (relative to the tag map file)")
    username_env: str | None = Field(default=None, pattern=_ENV_NAME, description="name of the environment variable holding the OPC UA user name")
    password_env: str | None = Field(default=None, pattern=_ENV_NAME, description="name of the environment variable holding the password")
    password_file: Path | None = Field(default=None, description="file holding the password on its first line, mode 0600 (relative to the tag map file)")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        _refuse_secrets(data)
        if isinstance(data, dict):
            # Checked here rather than by the field's pattern, whose error would echo the value: a password
            # written where the variable's name belongs must not end up in a log.
            for name in ("username_env", "password_env"):
                value = data.get(name)
                if value is not None and not (isinstance(value, str) and re.fullmatch(_ENV_NAME, value)):
                    raise ValueError(
                        f"{name}: expected the name of an environment variable (letters, digits and _, not starting with a digit), "
                        f"such as OPCUA_PASSWORD; the value given is not shown"
                    )
        return data

    @field_validator("certificate", "private_key", "trust_store", "password_file")
    @classmethod
    def _relative_to_the_map(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        if path is None or path.is_absolute() or base is None:
            return path
        return Path(base) / path

    @model_validator(mode="after")
    def _complete(self) -> OpcUaSecurity:
        if self.mode != "none":
            missing = [name for name in ("certificate", "private_key", "trust_store") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"mode '{self.mode}' needs {', '.join(missing)} (the client certificate, its key and the directory of trusted server certificates)")
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give the password in one place: password_env or password_file, not both")
        has_password = self.password_env is not None or self.password_file is not None
        if has_password != (self.username_env is not None):
            raise ValueError("a user name (username_env) and a password (password_env or password_file) go together; give both or neither (anonymous)")
        if self.mode == "none" and self.username_env is not None:
            raise ValueError("mode 'none' would send the password in clear text; credentials need sign_and_encrypt (or sign)")
        return self

    @property
    def secured(self) -> bool:
        """Whether the mode signs (and encrypts): the port then needs no insecure opt-in."""
        return self.mode != "none"


class OpcUaTagMap(FrozenConfig):
    protocol: Literal["opcua"]
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="server endpoint URL, e.g. opc.tcp://127.0.0.1:4840/bioreactor")
    namespace_uri: str = Field(min_length=1, description="namespace of the node ids; its index is resolved from the server, never assumed")
    namespaces: dict[str, str] = Field(
        default_factory=dict,
        description="more namespaces by a short name (name: URI), for tags (namespace: name) and browse path segments ('name:Browse'); "
        "each index is resolved from the server's namespace array, never assumed",
    )
    security: OpcUaSecurity | None = Field(
        default=None,
        description="OPC UA security: mode, policy, certificate, private_key, trust_store, username_env, password_env or password_file (docs/opcua-security.md); "
        "without it the port connects only with the explicit insecure opt-in",
    )
    tags: dict[str, OpcUaTag]

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        _refuse_secrets(data)
        if isinstance(data, dict) and isinstance(data.get("endpoint"), str):
            # Here rather than in a field validator, whose error would echo the URL and its password.
            try:
                check_endpoint_has_no_credentials(data["endpoint"])
            except ValueError as error:
                raise ValueError(f"endpoint: {error}") from None
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaTagMap:
        _check_signal_names(list(self.tags), kinds={n: t.type for n, t in self.tags.items()}, scaled={n: t.scaled for n, t in self.tags.items()})
        for name, uri in self.namespaces.items():
            if not re.fullmatch(_NAMESPACE_NAME, name):
                raise FieldError(f"namespaces.{name}", name, "a namespace name is a letter followed by letters, digits, '_' or '-'")
            if not uri:
                raise FieldError(f"namespaces.{name}", uri, "must be a namespace URI")
        known = ", ".join(sorted(self.namespaces)) or "none defined"
        seen: dict[tuple[str | None, int | str | None, str | None], str] = {}
        for name, tag in self.tags.items():
            if tag.namespace is not None and tag.namespace not in self.namespaces:
                raise FieldError(f"tags.{name}.namespace", tag.namespace, f"is not a name in namespaces ({known})")
            if tag.browse_path is not None:
                unknown = sorted({ns for ns, _ in split_browse_path(tag.browse_path) if ns is not None and ns not in self.namespaces})
                if unknown:
                    raise FieldError(
                        f"tags.{name}.browse_path",
                        tag.browse_path,
                        f"names namespace {', '.join(unknown)}, not a name in namespaces ({known}); write a ':' in a browse name as '&:'",
                    )
            key = (tag.namespace, tag.node, tag.browse_path)
            other = seen.setdefault(key, name)
            if other != name:
                field = "node" if tag.node is not None else "browse_path"
                raise FieldError(f"tags.{name}.{field}", tag.node if tag.node is not None else tag.browse_path, f"is also the {field.replace('_', ' ')} of tags.{other}")
        return self

    def namespace_of(self, tag: OpcUaTag) -> str:
        """The namespace URI of a tag (of its node id, and of the browse path segments without a namespace name)."""
        return self.namespaces[tag.namespace] if tag.namespace is not None else self.namespace_uri

    def namespace_uris(self) -> list[str]:
        """Every namespace URI the map uses: ``namespace_uri`` first, then the named ones in order."""
        return list(dict.fromkeys([self.namespace_uri, *self.namespaces.values()]))


class ModbusTagMap(FrozenConfig):
    protocol: Literal["modbus"]
    host: str = Field(min_length=1, description="PLC host name or address")
    port: int = Field(default=502, ge=1, le=65535, description="TCP port")
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id")
    word_order: ModbusWordOrder = Field(
        default="big",
        description="the byte order of every number that does not give its own: ABCD or 'big' (high word first), CDAB or 'little' (low word first), "
        "BADC, DCBA (bytes swapped in each register, 16-bit values too)",
    )
    read_across_gaps: bool = Field(
        default=True,
        description="true: read each table in one request, the unmapped registers between signals included (the fewest requests); "
        "false, for a PLC that refuses to read unmapped addresses: one request per run of adjacent mapped registers",
    )
    tags: dict[str, ModbusTag]

    def word_order_of(self, tag: ModbusTag) -> WordOrder:
        """A tag's byte order: its own ``word_order``, or the map's; ``big`` and ``little`` as ABCD and CDAB."""
        return _WORD_ORDERS[tag.word_order or self.word_order]

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTagMap:
        _check_signal_names(list(self.tags), kinds={n: t.type for n, t in self.tags.items()}, scaled={n: t.scaled for n, t in self.tags.items()})
        occupied: dict[tuple[str, int], str] = {}

        def occupy(table: str, first: int, count: int, owner: str, field: str) -> None:
            for address in range(first, first + count):
                other = occupied.setdefault((table, address), owner)
                if other != owner:
                    raise FieldError(field, first, f"{table} register {address} is also used by {other}")

        for name, tag in self.tags.items():
            boolean = tag.type == "bool"
            if boolean != (tag.table in ("coil", "discrete")):
                raise FieldError(f"tags.{name}.type", tag.type, f"does not fit table '{tag.table}' (booleans live in coils or discrete inputs)")
            if SIGNALS[name].writable and tag.table not in ("holding", "coil"):
                raise FieldError(f"tags.{name}.table", tag.table, "a written signal must be in holding registers or coils")
            if tag.type == "string" and (tag.length is None or tag.length % 2):
                raise FieldError(f"tags.{name}.length", tag.length, "must be an even number of characters for a string (two per register)")
            occupy(tag.table, tag.address, tag.register_count, f"tags.{name}", f"tags.{name}.address")
        quality_bits: dict[tuple[str, int, int], str] = {}
        for name, tag in self.tags.items():
            if tag.bad_when is None:
                continue
            bad_when = tag.bad_when
            occupy(bad_when.table, bad_when.address, 1, "quality bits (bad_when)", f"tags.{name}.bad_when.address")
            other = quality_bits.setdefault((bad_when.table, bad_when.address, bad_when.bit), name)
            if other != name:
                raise FieldError(
                    f"tags.{name}.bad_when.bit",
                    bad_when.bit,
                    f"{bad_when.table} {bad_when.address} bit {bad_when.bit} is also tags.{other}.bad_when: each signal needs its own quality bit",
                )
        return self


TagMap = OpcUaTagMap | ModbusTagMap


def load_tag_map(path: str | Path) -> TagMap:
    """Load a tag map; its ``protocol`` field (``opcua`` or ``modbus``) chooses the schema.

    Relative paths in the map (the OPC UA security files) are resolved against
    the map file's directory, so a map and its certificates move together.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    protocol = data.get("protocol")
    models: dict[str, type[OpcUaTagMap | ModbusTagMap]] = {"opcua": OpcUaTagMap, "modbus": ModbusTagMap}
    if protocol not in models:
        raise ConfigError(f"{path}: protocol: expected 'opcua' or 'modbus'; got {protocol!r}")
    model = models[protocol]
    try:
        return model.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model, source=str(path))) from None
