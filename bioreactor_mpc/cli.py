"""The ``bioreactor-mpc`` command.

User errors (a bad config, a non-physical simulation) end with a message that
says what is wrong and where, and exit status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bioreactor_mpc import admin_cli, calibrate_cli, export_cli, init_cli, plant_sim_cli
from bioreactor_mpc.logging import configure_logging
from bioreactor_mpc.report import TrustTimeline, kpi_table, plot_predictions, write_batch_files
from bioreactor_mpc.resources import reference_config
from controller.modes import RequestedMode
from controller.runtime_config import LogLevel
from plant_models.errors import BioreactorMPCError

if TYPE_CHECKING:
    from simulator.closed_loop import ControlledBatchResult

DEFAULT_SIMULATION = reference_config("simulate", "platform.yaml")
DEFAULT_RUNTIME = reference_config("runtime", "reference-opcua.yaml")
DEFAULT_HISTORY = Path("runs/runtime/history.sqlite")
"""The history of ``run`` on the reference runtime config: under the current directory, never inside the installed package."""
EXIT_USER_ERROR = 2

log = structlog.get_logger("bioreactor_mpc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioreactor-mpc", description="Model-predictive control runtime for fed-batch CHO bioreactors.")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines even in a terminal")
    parser.add_argument(
        "--log-level",
        choices=[level.value for level in LogLevel],
        default=None,
        help="the least severe log lines written (default: for run, the config's logging.level; else info); the libraries' from warning, or from this when more severe",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="simulate one batch in-process and report its KPIs")
    simulate.add_argument("--config", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config (default: {DEFAULT_SIMULATION})")
    simulate.add_argument("--seed", type=int, default=None, help="override the config's seed")
    simulate.add_argument("--parameters", type=Path, default=None, help="kinetics file to use as the nominal set (overrides the config's 'model')")
    simulate.add_argument(
        "--controller",
        choices=["recipe", "nmpc", "oracle"],
        default="recipe",
        help="who decides: the PLC's platform recipe, the NMPC with its estimator, or the NMPC with perfect knowledge (the oracle)",
    )
    simulate.add_argument("--output-dir", type=Path, default=Path("runs/simulate"), help="where trajectories and the plot go (default: runs/simulate)")
    simulate.add_argument("--csv-every-min", type=int, default=15, help="trajectory file resolution in minutes (plant resolution is 1 min)")
    simulate.add_argument("--no-plot", action="store_true", help="skip the PNG plot")

    plc_sim = commands.add_parser("plc-sim", help="serve the simulated reference PLC on the network until the batch is harvested")
    plc_sim.add_argument("--protocol", choices=["opcua", "modbus"], default="opcua", help="OPC UA or Modbus TCP (default: opcua)")
    plc_sim.add_argument("--scenario", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config: truth, noise, faults (default: {DEFAULT_SIMULATION})")
    plc_sim.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    plc_sim.add_argument("--tag-map", type=Path, default=None, help="tag map to serve (default: configs/plc/reference-<protocol>.yaml)")
    plc_sim.add_argument("--endpoint", default=None, help="override the tag map's endpoint: opc.tcp://127.0.0.1:4841/bioreactor-mpc/, or host:port for Modbus")
    clock = plc_sim.add_mutually_exclusive_group()
    clock.add_argument("--lockstep", action="store_true", help="pause at every cycle boundary until MPC.Heartbeat moves (the default)")
    clock.add_argument("--time-scale", type=float, default=None, help="run free, this many plant seconds per wall second")
    plc_sim.add_argument("--lockstep-timeout-s", type=float, default=30.0, help="wall seconds a lockstep pause waits for the heartbeat (default 30)")
    plc_sim.add_argument("--report-dir", type=Path, default=None, help="at harvest, write the true trajectories, KPIs and plot here")
    plc_sim.add_argument("--report-stem", default=None, help="file name stem of the report (default: <batch>-seed<seed>-plc-sim)")
    plc_sim.add_argument("--local", action="store_true", help="the operator's switch in local: the PLC runs its own recipe and refuses SP.* writes")
    plc_sim.add_argument("--linger-s", type=float, default=3.0, help="keep serving this long after harvest, so clients read the final phase (default 3)")
    secured = plc_sim.add_argument_group(
        "OPC UA security (docs/opcua-security.md)",
        "without these, security mode None and every client may write: a test-only mode for 127.0.0.1; with them, SignAndEncrypt and only the writers write",
    )
    secured.add_argument(
        "--security",
        choices=["none", "sign", "sign-encrypt"],
        default=None,
        help="message security (Basic256Sha256): sign-encrypt or sign need --certificate, --private-key and --trusted-clients; none (test-only) needs none of them. "
        "Default: sign-encrypt when the certificate options are given, else none",
    )
    secured.add_argument("--certificate", type=Path, default=None, help="the simulated PLC's certificate (bioreactor-mpc certs); needs --private-key and --trusted-clients")
    secured.add_argument("--private-key", type=Path, default=None, help="the simulated PLC's private key")
    secured.add_argument("--trusted-clients", type=Path, default=None, help="directory of the client (or CA) certificates the PLC trusts, *.der or *.pem")
    secured.add_argument(
        "--writer-cert",
        type=Path,
        action="append",
        default=[],
        help="a certificate whose sessions may write (repeatable; default, unless --writer-user names a writer: runtime.der in --trusted-clients, "
        "the runtime's certificate); other trusted clients only read",
    )
    secured.add_argument("--users-file", type=Path, default=None, help="users as 'name:password' lines (mode 0600); then sessions need a user name and password")
    secured.add_argument("--writer-user", action="append", default=[], help="a user of --users-file who may write (repeatable)")

    run = commands.add_parser("run", help="run the runtime against a PLC until the batch is harvested")
    run.add_argument("--config", type=Path, default=DEFAULT_RUNTIME, help=f"runtime config (default: {DEFAULT_RUNTIME})")
    run.add_argument(
        "--mode",
        choices=[m.value for m in RequestedMode],
        default=None,
        help="the mode to request now (default: the one in force when the runtime last stopped on this batch, else the config's)",
    )
    run.add_argument("--endpoint", default=None, help="override the tag map's endpoint: an opc.tcp:// URL, or host:port for Modbus")
    run.add_argument("--history", type=Path, default=None, help=f"override the config's history file (the reference config's: {DEFAULT_HISTORY} under the current directory)")
    run.add_argument(
        "--take-over-as",
        metavar="ENGINEER",
        default=None,
        help="sign a take-over of a running batch this history has no record of (an engineer's user in the history's user store; docs/runtime.md)",
    )
    run.add_argument("--reason", default=None, help="why the batch is taken over without its history (with --take-over-as; recorded in the audit trail)")
    run.add_argument("--password-env", metavar="VAR", default=None, help="with --take-over-as: read the password from this environment variable instead of the terminal")

    demo = commands.add_parser("demo", help="the closed-loop demo: the simulated PLC in lockstep, the runtime against it over the network, the batch report")
    demo.add_argument("--protocol", choices=["opcua", "modbus"], default="opcua", help="OPC UA or Modbus TCP (default: opcua)")
    demo.add_argument("--mode", choices=[m.value for m in RequestedMode], default=RequestedMode.CLOSED_LOOP.value, help="the runtime's mode (default: closed-loop)")
    demo.add_argument("--scenario", type=Path, default=DEFAULT_SIMULATION, help=f"simulation config (default: {DEFAULT_SIMULATION})")
    demo.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    demo.add_argument("--runtime-config", type=Path, default=None, help="runtime config (default: configs/runtime/reference-<protocol>.yaml)")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where the report and the history go (default: runs/demo)")
    demo.add_argument("--lockstep-timeout-s", type=float, default=30.0, help="wall seconds the simulated PLC waits for the heartbeat (default 30)")
    demo.add_argument("--time-scale", type=float, default=None, help="advisory mode: plant seconds per wall second of the free-running PLC (default 360: a cycle every 10 s)")
    demo.add_argument("--auto-approve", action="store_true", help="advisory mode: approve every recommendation at once, in lockstep (tests)")
    demo.add_argument("--screen-port", type=int, default=None, help="advisory mode: the operator screen's port (default: a free one)")

    certs = commands.add_parser("certs", help="make the runtime's OPC UA application instance certificate and key (docs/opcua-security.md)")
    certs.add_argument("--cert", type=Path, required=True, help="certificate file to write (DER; PEM if it ends in .pem)")
    certs.add_argument("--key", type=Path, required=True, help="private key file to write (PEM, mode 0600)")
    certs.add_argument("--common-name", required=True, help="the certificate's common name, e.g. 'bioreactor-mpc edge01'")
    certs.add_argument("--application-uri", required=True, help="the OPC UA application URI, e.g. urn:edge01:bioreactor-mpc")
    certs.add_argument("--hostname", action="append", default=[], help="a DNS name or IP address of this machine (repeatable)")
    certs.add_argument("--organization", default=None, help="the certificate's organisation")
    certs.add_argument("--days", type=int, default=730, help="validity in days (default 730)")
    certs.add_argument("--force", action="store_true", help="overwrite existing files")

    init_cli.add_parser(commands)
    admin_cli.add_parsers(commands)
    calibrate_cli.add_parser(commands)
    export_cli.add_parsers(commands)
    plant_sim_cli.add_parsers(commands)

    schema = commands.add_parser("schema", help="write JSON Schemas of the config files, for editors that check YAML")
    schema.add_argument("--output-dir", type=Path, default=Path("runs/schema"), help="where the schemas go (default: runs/schema)")
    return parser


def _schema(args: argparse.Namespace, console: Console) -> int:
    import json

    from pydantic import TypeAdapter

    from controller.config import BatchTemplate
    from controller.runtime_config import RuntimeConfig
    from interfaces.tagmap import ModbusTagMap, OpcUaTagMap
    from plant_models.parameters import CultureParameters
    from simulator.config import SimulationConfig
    from simulator.io_faults import IoFaultScenario
    from simulator.io_map import IoMap

    args.output_dir.mkdir(parents=True, exist_ok=True)
    models: tuple[tuple[str, Any], ...] = (
        ("culture-parameters", CultureParameters),
        ("batch", BatchTemplate),  # a template: batch_id optional (the runtime then follows the PLC)
        ("simulation", SimulationConfig),
        ("tag-map-opcua", OpcUaTagMap),
        ("tag-map-modbus", ModbusTagMap),
        ("runtime", RuntimeConfig),
        ("io-map", IoMap),  # plant-sim's and soft-plc's --io: OPC UA or Modbus TCP, by its protocol
        ("io-faults", IoFaultScenario),  # plant-sim's --faults
    )
    for name, model in models:
        path = args.output_dir / f"{name}.schema.json"
        path.write_text(json.dumps(TypeAdapter(model).json_schema(), indent=2) + "\n", encoding="utf-8")
        console.print(f"{path}")
    return 0


def _plc_sim(args: argparse.Namespace, console: Console) -> int:
    import asyncio
    import json

    from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
    from simulator.batch import build_simulated_plc, kpis_of
    from simulator.config import load_simulation

    if args.time_scale is not None and not args.time_scale > 0.0:
        raise BioreactorMPCError(f"--time-scale must be positive, got {args.time_scale}")
    tag_map_path = args.tag_map or reference_config("plc", f"reference-{args.protocol}.yaml")
    tag_map = load_tag_map(tag_map_path)
    expected = OpcUaTagMap if args.protocol == "opcua" else ModbusTagMap
    if not isinstance(tag_map, expected):
        raise BioreactorMPCError(f"{tag_map_path}: protocol is '{tag_map.protocol}', --protocol {args.protocol} needs a {args.protocol} tag map")
    loaded = load_simulation(args.scenario, seed=args.seed)
    plc, _ = build_simulated_plc(loaded)
    plc.lockstep = args.time_scale is None
    if args.local:
        plc.set_operator_remote(False)

    security = _plc_security(args)

    async def serve() -> None:
        server = _plc_server(args.protocol, plc, tag_map, args.endpoint, security, loaded.batch)
        await server.start()
        access = ""
        if args.protocol == "opcua":
            secured = "Sign" if security is not None and security.mode == "sign" else "SignAndEncrypt"
            access = "; security mode None, every client may write (test-only)" if security is None else f"; {secured}, only the writers may write"
        console.print(f"simulated PLC on {server.endpoint} ({'lockstep' if plc.lockstep else f'x{args.time_scale:g}'}{access}); Ctrl-C stops it")
        try:
            if plc.lockstep:
                await server.run_lockstep(wall_timeout_s=args.lockstep_timeout_s)
            else:
                await server.run_free(time_scale=args.time_scale)
            console.print(f"batch ended at {plc.process_time_h:.2f} h: {plc.harvest_reason}")
            await asyncio.sleep(max(0.0, args.linger_s))
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        console.print("stopped")
        return 0
    if args.report_dir is not None:
        stem = args.report_stem or f"{loaded.batch.batch_id}-seed{loaded.simulation.seed}-plc-sim"
        trajectory = plc.plant.trajectory()
        kpis = kpis_of(trajectory, loaded.batch)
        files = write_batch_files(args.report_dir, stem, trajectory, tuple(plc.published), loaded.batch, title=f"{stem}: score {kpis.score_g_per_day:.0f} g/day")
        summary = {"kpis": kpis.as_dict(), "harvest_reason": plc.harvest_reason, "files": {kind: str(path) for kind, path in files.items()}}
        (args.report_dir / f"{stem}-kpis.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def _plc_security(args: argparse.Namespace) -> Any:
    """The simulated OPC UA PLC's security from plc-sim's options; None for the test-only security mode None."""
    from simulator.opcua_server import DEFAULT_WRITER_CERTIFICATE_NAME, OpcUaServerSecurity, read_users_file

    given = {"--certificate": args.certificate, "--private-key": args.private_key, "--trusted-clients": args.trusted_clients}
    dependent = [name for name, value in (("--writer-cert", args.writer_cert), ("--users-file", args.users_file), ("--writer-user", args.writer_user)) if value]
    if args.security == "none":
        if any(value is not None for value in given.values()) or dependent:
            named = [name for name, value in given.items() if value is not None] + dependent
            raise BioreactorMPCError(f"--security none: serves without security, so {', '.join(named)} would be ignored; leave them out, or ask for --security sign-encrypt")
        return None
    if args.security is not None and args.protocol != "opcua":
        raise BioreactorMPCError(f"--security {args.security}: an OPC UA security option; Modbus TCP has none (docs/opcua-security.md)")
    if args.security is not None and all(value is None for value in given.values()):
        raise BioreactorMPCError(f"--security {args.security}: needs --certificate, --private-key and --trusted-clients (the PLC's certificate and key, the clients it trusts)")
    if all(value is None for value in given.values()):
        if dependent:
            raise BioreactorMPCError(f"{', '.join(dependent)}: needs a secured server (--certificate, --private-key and --trusted-clients)")
        return None
    if args.protocol != "opcua":
        raise BioreactorMPCError(f"{', '.join(name for name, value in given.items() if value is not None)}: OPC UA security options; Modbus TCP has none (docs/opcua-security.md)")
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise BioreactorMPCError(f"{', '.join(missing)}: needed too for a secured server (--certificate, --private-key and --trusted-clients go together)")
    users = read_users_file(args.users_file) if args.users_file is not None else {}
    writers = tuple(args.writer_cert) or ((args.trusted_clients / DEFAULT_WRITER_CERTIFICATE_NAME,) if not args.writer_user else ())
    for path in writers:
        if not path.is_file():
            default = " (the default writer: the runtime's certificate, copied there; name another with --writer-cert)" if not args.writer_cert else ""
            raise BioreactorMPCError(f"--writer-cert: {path}: certificate file not found{default}")
    return OpcUaServerSecurity(
        certificate=args.certificate,
        private_key=args.private_key,
        trusted_clients=args.trusted_clients,
        users=users,
        writer_certificates=writers,
        writer_users=frozenset(args.writer_user),
        mode="sign" if args.security == "sign" else "sign_and_encrypt",
    )


def _plc_server(protocol: str, plc: Any, tag_map: Any, endpoint: str | None, security: Any = None, batch: Any = None) -> Any:
    if protocol == "opcua":
        from simulator.opcua_server import OpcUaPlcServer

        return OpcUaPlcServer(plc, tag_map, endpoint=endpoint, security=security, batch=batch)
    from interfaces.modbus_port import parse_endpoint
    from simulator.modbus_server import ModbusPlcServer

    host, port = parse_endpoint(endpoint) if endpoint is not None else (None, None)
    return ModbusPlcServer(plc, tag_map, host=host, port=port)


def _certs(args: argparse.Namespace, console: Console) -> int:
    from interfaces.opcua_certificates import create_certificate, describe

    if not args.hostname:
        raise BioreactorMPCError("--hostname: give at least one DNS name or IP address of this machine")
    try:
        certificate = create_certificate(
            args.cert,
            args.key,
            common_name=args.common_name,
            application_uri=args.application_uri,
            hostnames=args.hostname,
            days=args.days,
            organization=args.organization,
            overwrite=args.force,
        )
    except FileExistsError as error:
        raise BioreactorMPCError(f"{error.filename}: exists; nothing written (--force replaces it)") from error
    except ValueError as error:
        raise BioreactorMPCError(str(error)) from error
    console.print(f"certificate: {args.cert}\nprivate key: {args.key} (mode 0600)\n{describe(certificate)}", highlight=False, soft_wrap=True)
    console.print("import the certificate into the PLC's trusted certificates and compare the fingerprint the PLC shows", highlight=False, soft_wrap=True)
    return 0


def _run(args: argparse.Namespace, console: Console) -> int:
    import asyncio

    from bioreactor_mpc.runtime_cli import audit_key, print_summary, run_runtime
    from controller.runtime_config import load_runtime_config

    loaded = load_runtime_config(args.config, history=args.history or (DEFAULT_HISTORY if args.config == DEFAULT_RUNTIME else None))
    levels = loaded.config.logging  # the command line's level wins over the config's
    configure_logging(json=True if args.log_json else None, level=args.log_level or levels.level.value, libraries_level=levels.libraries_level.value)
    override = RequestedMode(args.mode) if args.mode else None
    if args.take_over_as is None and (args.reason is not None or args.password_env is not None):
        raise admin_cli.AdminCommandError("--reason and --password-env sign a take-over: they need --take-over-as ENGINEER")
    takeover = admin_cli.takeover_signature(args, loaded.history_path, audit_key(loaded)) if args.take_over_as is not None else None
    log.info("runtime_config", config=str(args.config), tag_map=str(loaded.tag_map_path), history=str(loaded.history_path), mode=(override or loaded.config.mode).value)
    summary = asyncio.run(run_runtime(loaded, endpoint=args.endpoint, console=console, mode_override=override, takeover=takeover))
    print_summary(summary, loaded.history_path, console)
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    from bioreactor_mpc.demo import run_demo

    return run_demo(
        protocol=args.protocol,
        scenario=args.scenario,
        seed=args.seed,
        mode=RequestedMode(args.mode),
        runtime_config=args.runtime_config or reference_config("runtime", f"reference-{args.protocol}.yaml"),
        output_dir=args.output_dir,
        lockstep_timeout_s=args.lockstep_timeout_s,
        console=console,
        time_scale=args.time_scale,
        auto_approve=args.auto_approve,
        screen_port=args.screen_port,
    )


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from simulator.batch import run_recipe_batch
    from simulator.closed_loop import estimator_source, oracle_source, run_controlled_batch
    from simulator.config import load_simulation

    if args.csv_every_min < 1:
        raise BioreactorMPCError(f"--csv-every-min must be at least 1, got {args.csv_every_min}")
    loaded = load_simulation(args.config, seed=args.seed, model=args.parameters)
    latest_h = loaded.batch.limits.latest_harvest_h
    log.info("batch_started", config=str(args.config), seed=loaded.simulation.seed, controller=args.controller, batch_id=loaded.batch.batch_id)
    with Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} h"), TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("batch", total=latest_h)
        advanced_to_h: list[float] = []

        def advance(t_h: float) -> None:
            progress.update(task, completed=t_h)
            advanced_to_h.append(t_h)

        controlled = None
        trust = None
        if args.controller == "recipe":
            result = run_recipe_batch(loaded, progress=advance)
        else:
            source = estimator_source if args.controller == "nmpc" else oracle_source
            controlled = run_controlled_batch(loaded, make_source=source, progress=advance, envelope=loaded.nominal.envelope, fitted=loaded.nominal.calibrated)
            result = controlled.batch
            trust = TrustTimeline.from_records([t for t, _ in controlled.trust], [summary for _, summary in controlled.trust])
    log.info("batch_harvested", process_time_h=round(result.kpis.harvest_time_h, 2), reason=result.harvest_reason)

    stem = f"{loaded.batch.batch_id}-seed{loaded.simulation.seed}-{args.controller}"
    title = f"{stem}: score {result.kpis.score_g_per_day:.0f} g/day"
    paths = write_batch_files(
        args.output_dir, stem, result.trajectory, result.lab_results, loaded.batch, title=title, csv_every_min=args.csv_every_min, plot=not args.no_plot, trust=trust
    )
    columns = {args.controller: result.kpis}
    if controlled is not None:
        columns["recipe, same batch"] = run_recipe_batch(loaded).kpis
    console.print(kpi_table(columns, f"{loaded.batch.batch_id}, seed {loaded.simulation.seed}, {args.controller}; harvest: {result.harvest_reason}"))
    if controlled is not None:
        recipe_score = columns["recipe, same batch"].score_g_per_day
        gain = 100.0 * (result.kpis.score_g_per_day / recipe_score - 1.0)
        console.print(f"score: {args.controller} {result.kpis.score_g_per_day:.1f} g/day against the recipe's {recipe_score:.1f} g/day on the same batch ({gain:+.1f} %)")
    if trust is not None:
        for line in trust.describe():
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    for kind, path in paths.items():
        console.print(f"{kind + ':':14s}{path}")
    if controlled is not None:
        _report_controller(controlled, args.output_dir, stem, console, plot=not args.no_plot)
    return 0


def _report_controller(controlled: ControlledBatchResult, output_dir: Path, stem: str, console: Console, *, plot: bool) -> None:
    import numpy as np

    solves = np.asarray(controlled.solve_times_s)
    if solves.size:
        console.print(
            f"solver: {solves.size} solves, median {1000 * np.median(solves):.0f} ms, p95 {1000 * np.percentile(solves, 95):.0f} ms, "
            f"max {1000 * solves.max():.0f} ms; failures {controlled.solver_failures}; warm solves retried cold {controlled.solver_cold_retries}; decisions {controlled.decisions_by_source}"
        )
    errors = controlled.harvest_titer_errors()
    if errors:
        actual = controlled.batch.kpis.titer_g_per_l
        for day in (3, 7, 10):
            at = [e for t, e in errors if t >= 24.0 * day]
            if at:
                console.print(f"harvest titer predicted on day {day:>2d}: {actual + at[0]:.2f} g/L (actual {actual:.2f}, error {100 * at[0] / actual:+.1f} %)")
    if plot and controlled.plan_snapshots:
        path = output_dir / f"{stem}-predictions.png"
        plot_predictions(path, controlled.batch.trajectory, controlled.plan_snapshots, f"{stem}: predicted vs actual")
        console.print(f"predictions:  {path}")


COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    "simulate": _simulate,
    "schema": _schema,
    "plc-sim": _plc_sim,
    "run": _run,
    "demo": _demo,
    "certs": _certs,
    "init": init_cli.run_init,
    "calibrate": calibrate_cli.run_calibrate,
    "export": export_cli.run_export,
    "report": export_cli.run_report,
    "soft-plc": plant_sim_cli.run_soft_plc,
    "plant-sim": plant_sim_cli.run_plant_sim,
}


def main(argv: Sequence[str] | None = None) -> int:
    if not faulthandler.is_enabled():
        with contextlib.suppress(ValueError, OSError):  # a standard error without a file descriptor (embedded, captured)
            faulthandler.enable()  # a crash in native code (SIGBUS on a vanished file, SIGSEGV) still says where
    args = _parser().parse_args(argv)
    configure_logging(json=True if args.log_json else None, level=args.log_level or LogLevel.INFO.value)
    console = Console()
    try:
        status = admin_cli.dispatch(args, console)
        if status is not None:
            return status
        return COMMANDS[args.command](args, console)
    except BioreactorMPCError as error:
        print(f"bioreactor-mpc {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
