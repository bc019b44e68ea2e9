"""The runtime's configuration: how it behaves (:class:`RuntimeSettings`) and, for a deployment, which files it uses (:class:`RuntimeConfig`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from controller.config import BatchConfig, BatchTemplate
from controller.estimator import EstimatorConfig
from controller.forecast import EarlyWarningConfig
from controller.modes import RequestedMode
from controller.nmpc import NmpcConfig
from controller.plausibility import PlausibilityConfig
from controller.quality import DataQualityConfig
from controller.safeguards import SafeguardSettings
from plant_models.config_loading import FieldError, FrozenConfig, config_error, read_yaml_mapping, validate_model
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters, parameter_vector

_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
"""An origin as a browser sends it in ``Origin``: scheme, host, optional port."""
LOOPBACK_NAMES = ("localhost",)
"""Host names that always mean this machine (an IP address is checked with :mod:`ipaddress`)."""


def _is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (0.0.0.0, ::)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ScreenSettings(FrozenConfig):
    """Where and how the operator screen listens (docs/operator-screen.md, section "Security").

    On a loopback address it may serve plain HTTP; on any other address it
    serves HTTPS (a certificate from files, or one made at each start), unless
    ``allow_plain_http`` says a reverse proxy in front terminates TLS.
    """

    host: str = Field(default="127.0.0.1", min_length=1, description="address to listen on; 0.0.0.0 for every interface (then TLS, or allow_plain_http behind a TLS proxy)")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port")
    tls_certificate: Path | None = Field(default=None, description="PEM certificate (with its chain) to serve HTTPS with; relative to the config file")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_certificate (readable by the service user only); relative to the config file")
    tls_self_signed: bool = Field(
        default=False, description="serve HTTPS with a self-signed certificate made at each start (browsers warn; a stopgap until a site certificate is installed)"
    )
    allow_plain_http: bool = Field(
        default=False, description="serve plain HTTP on a non-loopback address: only where a reverse proxy in front terminates TLS and is the only way in"
    )
    secure_cookies: bool = Field(default=False, description="mark the session cookie Secure without TLS here (TLS terminated at a proxy); always so with TLS")
    trusted_proxies: tuple[str, ...] = Field(
        default=(), description="addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For is believed; empty: the connection's peer is the client"
    )
    allowed_origins: tuple[str, ...] = Field(
        default=(), description="origins (scheme://host[:port]) browsers may post from besides the one the screen is served at, e.g. the proxy's https URL"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description=(
            "host names (or addresses) browsers reach the screen at, as in its URL; the loopback names always; empty: the host it listens on."
            " Any other Host header is refused (400), so a page on another site cannot reach it through DNS rebinding. Required when listening on every interface"
        ),
    )
    password_policy: Path | None = Field(
        default=None,
        description="the site's password policy file (YAML, docs/audit-and-users.md; the same file as users --password-policy): its ageing and inactivity lock apply at log-in; relative to the config file",
    )

    @property
    def tls(self) -> bool:
        """Whether the screen itself serves HTTPS."""
        return self.tls_certificate is not None or self.tls_self_signed

    @property
    def host_names(self) -> tuple[str, ...]:
        """The Host header values (without port) the screen answers: the loopback names, and ``allowed_hosts`` or else the host it listens on."""
        named = self.allowed_hosts or ((self.host,) if not _is_wildcard(self.host) else ())
        return tuple(dict.fromkeys([*LOOPBACK_NAMES, "127.0.0.1", *(name.lower() for name in named)]))

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in self.trusted_proxies)

    @model_validator(mode="after")
    def _consistent(self) -> ScreenSettings:
        for index, proxy in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError as error:
                raise FieldError(f"trusted_proxies[{index}]", proxy, f"must be an IP address or a network such as 10.0.0.0/24 ({error})") from error
        for index, origin in enumerate(self.allowed_origins):
            if _ORIGIN.fullmatch(origin) is None:
                raise FieldError(f"allowed_origins[{index}]", origin, "must be an origin: http:// or https://, a host and an optional :port, no path")
        if (self.tls_certificate is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_certificate"
            raise FieldError(missing, None, "tls_certificate and tls_key go together: give both, or neither")
        if self.tls_certificate is not None and self.tls_self_signed:
            raise FieldError("tls_self_signed", True, "contradicts tls_certificate: use the certificate files or a self-signed certificate, not both")
        for index, name in enumerate(self.allowed_hosts):
            if not name or any(c in name for c in "/:@ ") or (name.startswith("*") and not name.startswith("*.")):
                raise FieldError(
                    f"allowed_hosts[{index}]",
                    name,
                    "must be a host name or an IPv4 address as browsers put it in Host, such as screen.plant.example or 10.20.0.5 (*.domain for a whole domain), without scheme or port",
                )
        if self.allow_plain_http and self.tls:
            raise FieldError("allow_plain_http", True, "contradicts the TLS settings: the screen serves HTTPS itself")
        if not self.tls and not self.allow_plain_http and not is_loopback(self.host):
            raise FieldError(
                "host",
                self.host,
                "is not a loopback address, and plain HTTP there sends passwords and sessions in clear: set tls_certificate and tls_key "
                "(or tls_self_signed: true), or allow_plain_http: true when a reverse proxy in front terminates TLS",
            )
        if _is_wildcard(self.host) and not self.allowed_hosts:
            raise FieldError(
                "allowed_hosts",
                [],
                f"the screen listens on every interface ({self.host}): name the host names browsers use to reach it (its DNS name, its address), so that no other site can reach it through DNS rebinding",
            )
        return self

    def resolved(self, base: Path, *, source: str) -> ScreenSettings:
        """These settings with the certificate and policy paths relative to ``base`` (the config file's folder), checked to exist."""
        paths = {name: base / path for name in ("tls_certificate", "tls_key", "password_policy") if (path := getattr(self, name)) is not None}
        if not paths:
            return self
        for name, resolved in paths.items():
            if not resolved.is_file():
                raise config_error(source, f"screen.{name}", str(getattr(self, name)), f"no such file {resolved}")
        return self.model_copy(update=paths)


class RuntimeSettings(FrozenConfig):
    """How the runtime behaves (the paths of a deployment are in :class:`RuntimeConfig`)."""

    mode: RequestedMode = Field(default=RequestedMode.CLOSED_LOOP, description="off, advisory or closed-loop")
    poll_interval_s: float = Field(default=1.0, gt=0.0, le=60.0, description="how often the batch clock is read between cycles [s]")
    io_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0, description="timeout of every PLC request [s]")
    reconnect_initial_s: float = Field(default=0.5, gt=0.0, description="first wait before reconnecting after a lost link [s]")
    reconnect_max_s: float = Field(default=10.0, gt=0.0, description="longest wait between reconnection attempts [s]")
    max_write_failures: int = Field(default=3, ge=1, description="failed setpoint writes in a row before the runtime drops to fault")
    write_retry_cycles: int = Field(default=6, ge=1, description="cycles in fault for failing writes before one more write is tried")
    fault_hand_over_cycles: int | None = Field(
        default=3,
        ge=1,
        description="after this many cycles in fault, stop moving MPC.Heartbeat so that the PLC's watchdog hands control to its local recipe: "
        "a runtime that cannot trust what it sees must not leave the PLC on its last setpoints (docs/runtime.md, section 7); "
        "null: always move it, as the reference interface reads literally",
    )
    auto_approve: bool = Field(default=False, description="advisory mode: approve every recommendation at once (lockstep tests and demos only; logged at start)")
    screen: ScreenSettings | None = Field(default=None, description="serve the operator screen; none without this section")
    early_warning: EarlyWarningConfig = EarlyWarningConfig()
    quality: DataQualityConfig = DataQualityConfig()
    nmpc: NmpcConfig = NmpcConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    plausibility: PlausibilityConfig = PlausibilityConfig()
    safeguards: SafeguardSettings = SafeguardSettings()

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeSettings:
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise FieldError("reconnect_initial_s", self.reconnect_initial_s, f"must not be above reconnect_max_s ({self.reconnect_max_s})")
        mpc = self.nmpc.mpc
        if mpc.glucose_min_g_per_l >= mpc.glucose_max_g_per_l:
            raise FieldError("nmpc.mpc.glucose_min_g_per_l", mpc.glucose_min_g_per_l, f"must be below nmpc.mpc.glucose_max_g_per_l ({mpc.glucose_max_g_per_l})")
        if self.nmpc.initial_harvest_h is not None and self.nmpc.initial_harvest_h <= 0.0:
            raise FieldError("nmpc.initial_harvest_h", self.nmpc.initial_harvest_h, "must be greater than 0 (a process time [h]), or none for the recipe's")
        return self


class MonitoringSettings(FrozenConfig):
    """Where the runtime serves ``/metrics``, ``/healthz`` and ``/readyz`` for the plant's monitoring, with or without the screen (docs/monitoring.md).

    Plain HTTP and no login, as Prometheus scrapes: the endpoints show the
    runtime's counters and health, never process data or controls. Off the
    loopback, firewall the port to the monitoring server.
    """

    enabled: bool = Field(default=True, description="serve the monitoring endpoints (on by default: a runtime nobody watches can stall unseen)")
    host: str = Field(default="127.0.0.1", min_length=1, description="address to listen on; 0.0.0.0 for every interface (then firewall the port to the Prometheus server)")
    port: int = Field(default=9108, ge=0, le=65535, description="TCP port; 0 takes a free one, named in the log (tests and demos)")


class LogLevel(str, Enum):
    """The least severe log lines written."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class LoggingSettings(FrozenConfig):
    level: LogLevel = Field(default=LogLevel.INFO, description="the runtime's own lines: debug, info, warning, error or critical; the command line's --log-level overrides it")
    libraries_level: LogLevel = Field(
        default=LogLevel.WARNING, description="the libraries' lines (asyncua, pymodbus, uvicorn), never below level: their info lines are mostly connection chatter"
    )


class AuditCheckpointSettings(FrozenConfig):
    """Where the audit trail's checkpoints go, outside the history, and how often (docs/audit-and-users.md, section 2)."""

    file: Path | None = Field(default=None, description="append each checkpoint to this file (JSON lines), on another volume than the history; relative to the config file")
    syslog: str | None = Field(default=None, min_length=1, description="send each checkpoint to syslog: /dev/log, or host:port (UDP) of a log server")
    http_url: str | None = Field(default=None, pattern=r"^https?://", description="POST each checkpoint (JSON) to this http(s) endpoint")
    http_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0, description="how long a POST may take [s]")
    every_records: int = Field(default=100, ge=1, description="a checkpoint every this many audit records (and at shutdown)")
    every_cycles: int = Field(default=60, ge=1, description="and every this many control cycles: the process history's rows since the last one")


class AuditSettings(FrozenConfig):
    """The audit trail's key and checkpoints."""

    key_file: Path | None = Field(
        default=None,
        description="the audit key file (bioreactor-mpc audit key create; mode 0600, not in the history's directory); relative to the config file. "
        "Default: audit.key beside the config file, when it exists; $BIOREACTOR_MPC_AUDIT_KEY overrides both",
    )
    checkpoints: AuditCheckpointSettings = AuditCheckpointSettings()


class RuntimeConfig(RuntimeSettings):
    """A deployment: which PLC, which batch, which kinetics, where the history goes. Paths are relative to this file."""

    tag_map: Path = Field(description="the PLC's tag map (configs/plc/)")
    batch: Path = Field(
        description="the batch file, a process template: inoculation record, media, equipment, recipe, limits; "
        "without batch_id the runtime follows the PLC's Status.BatchId from batch to batch, with one it runs that batch only"
    )
    model: Path = Field(description="the nominal kinetics of the cell line")
    history: Path = Field(description="the SQLite history file (created if missing)")
    allow_insecure: bool = Field(default=False, description="OPC UA security mode None, by explicit opt-in (logged at every start)")
    audit: AuditSettings = Field(default=AuditSettings(), description="the audit trail's key and where its checkpoints are exported")
    monitoring: MonitoringSettings = Field(default=MonitoringSettings(), description="/metrics, /healthz and /readyz on their own port (docs/monitoring.md)")
    logging: LoggingSettings = Field(default=LoggingSettings(), description="the log level")


@dataclass(frozen=True)
class LoadedRuntime:
    source: Path
    config: RuntimeConfig
    template: BatchTemplate
    """The batch file: a process template (``batch_id`` absent: the runtime follows the PLC's batch id), or pinned to one batch."""
    nominal: CultureParameters
    tag_map_path: Path
    history_path: Path

    @property
    def batch(self) -> BatchConfig:
        """The template as a batch's config, for what depends on no particular batch (the MPC's problem); its id is the pinned one, if any."""
        return self.template.for_batch()


def load_runtime_config(path: str | Path, *, history: str | Path | None = None, mode: RequestedMode | None = None) -> LoadedRuntime:
    """Load a runtime config and the batch and kinetics files it names; ``history`` and ``mode`` override the file."""
    path = Path(path)
    config = validate_model(RuntimeConfig, read_yaml_mapping(path), source=str(path))
    if mode is not None:
        config = config.model_copy(update={"mode": mode})
    base = path.parent
    if config.screen is not None:
        config = config.model_copy(update={"screen": config.screen.resolved(base, source=str(path))})
    batch = BatchTemplate.from_yaml(base / config.batch)
    _check_against_batch(config, batch, source=str(path), batch_path=base / config.batch)
    nominal = CultureParameters.from_yaml(base / config.model)
    tag_map_path = base / config.tag_map
    if not tag_map_path.is_file():
        raise ConfigError(f"{path}: tag_map: no such file {tag_map_path}")
    history_path = Path(history) if history is not None else base / config.history
    return LoadedRuntime(path, config, batch, nominal, tag_map_path, history_path)


def _check_against_batch(config: RuntimeSettings, batch: BatchTemplate, *, source: str, batch_path: Path) -> None:
    """What a runtime config asks of its batch must be possible in it."""
    nmpc, limits = config.nmpc, batch.limits
    if nmpc.initial_harvest_h is not None and nmpc.initial_harvest_h > limits.latest_harvest_h:
        raise config_error(
            source, "nmpc.initial_harvest_h", nmpc.initial_harvest_h, f"must not be after the batch's limits.latest_harvest_h ({limits.latest_harvest_h} in {batch_path})"
        )
    headroom_l = batch.equipment.max_working_volume_l - batch.inoculation.volume_l
    if nmpc.mpc.volume_backoff_l >= headroom_l:
        raise config_error(
            source,
            "nmpc.mpc.volume_backoff_l",
            nmpc.mpc.volume_backoff_l,
            f"must be below the room the batch leaves after inoculation ({headroom_l:g} L = equipment.max_working_volume_l - inoculation.volume_l in {batch_path})",
        )
    osmolality_room = limits.osmolality_max_mosm_per_kg - batch.inoculation.osmolality_mosm_per_kg
    if nmpc.mpc.osmolality_backoff_mosm_per_kg >= osmolality_room:
        raise config_error(
            source,
            "nmpc.mpc.osmolality_backoff_mosm_per_kg",
            nmpc.mpc.osmolality_backoff_mosm_per_kg,
            f"must be below the room between the inoculum and the limit ({osmolality_room:g} mOsm/kg = limits.osmolality_max_mosm_per_kg - inoculation.osmolality_mosm_per_kg in {batch_path})",
        )
    if nmpc.mpc.glucose_max_g_per_l <= limits.glucose_min_g_per_l:
        raise config_error(
            source,
            "nmpc.mpc.glucose_max_g_per_l",
            nmpc.mpc.glucose_max_g_per_l,
            f"must be above the batch's limits.glucose_min_g_per_l ({limits.glucose_min_g_per_l} in {batch_path})",
        )


def nominal_parameter_vector(loaded: LoadedRuntime) -> np.ndarray:
    return parameter_vector(loaded.nominal, loaded.batch.media)
