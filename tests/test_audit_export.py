"""Checkpoints of the audit trail's head exported outside the history (a file, syslog, HTTP on 127.0.0.1), and the runtime's audit key and sinks from its config."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from bioreactor_mpc.runtime_cli import audit_key, checkpoint_sinks
from controller.runtime_config import load_runtime_config
from interfaces.audit import AuditTrail
from interfaces.audit_export import CheckpointExportError, FileSink, HttpSink, SyslogSink, read_checkpoints
from interfaces.audit_keys import KEY_ENV, AuditKeyError, create_key_file

pytestmark = pytest.mark.usefixtures("uncached_logging")

REPO = Path(__file__).resolve().parents[1]


def _trail_with_records(path: Path, **kwargs: Any) -> AuditTrail:
    trail = AuditTrail(path, **kwargs)
    for i in range(3):
        trail.append(actor="runtime", action="alarm_raised", subject=f"alarm {i}", details={"i": i})
    return trail


def test_a_file_sink_appends_one_line_per_checkpoint_and_it_reads_back(tmp_path):
    key = create_key_file(tmp_path / "keys" / "audit.key")
    sink_file = tmp_path / "offsite" / "cp.jsonl"
    trail = _trail_with_records(tmp_path / "h.sqlite", key=key, sinks=[FileSink(sink_file)])
    first = trail.checkpoint("requested")
    trail.append(actor="runtime", action="alarm_cleared", subject="alarm 0", details={})
    second = trail.checkpoint("requested")
    trail.close()
    read, damaged = read_checkpoints(sink_file)
    assert damaged == []
    assert [r.checkpoint for r in read] == [first, second]
    assert (first.seq, second.seq) == (4, 6) and first.history == "h.sqlite" and first.key_id == key.key_id and first.mac
    assert [r.where for r in read] == [f"{sink_file} line 1", f"{sink_file} line 2"]


def test_a_trail_checkpoints_itself_every_n_records_and_at_close(tmp_path):
    sink_file = tmp_path / "cp.jsonl"
    trail = AuditTrail(tmp_path / "h.sqlite", sinks=[FileSink(sink_file)], checkpoint_every=4)
    for i in range(9):
        trail.append(actor="runtime", action="alarm_raised", subject=f"alarm {i}", details={})
    trail.close()
    read, _ = read_checkpoints(sink_file)
    assert [(r.checkpoint.seq, r.checkpoint.reason) for r in read] == [(5, "every 4 records"), (10, "every 4 records"), (12, "shutdown")]


def test_syslog_gets_one_message_per_checkpoint(tmp_path):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5.0)
    port = receiver.getsockname()[1]
    try:
        trail = _trail_with_records(tmp_path / "h.sqlite", sinks=[SyslogSink(f"127.0.0.1:{port}")])
        checkpoint = trail.checkpoint("requested")
        trail.close()
        message = receiver.recv(65536).decode()
    finally:
        receiver.close()
    assert message.startswith("<38>bioreactor-mpc: bioreactor-mpc-audit-checkpoint {")  # facility auth (4) * 8 + severity info (6)
    syslog_file = tmp_path / "syslog"
    syslog_file.write_text(f"Dec  6 10:00:00 edge {message[4:]}\n")
    read, damaged = read_checkpoints(syslog_file)
    assert damaged == [] and [r.checkpoint for r in read] == [checkpoint]


def test_a_syslog_socket_that_is_not_there_is_a_logged_failure_not_a_traceback(tmp_path, capsys):
    sink = SyslogSink(str(tmp_path / "no-such-log-socket"))
    trail = _trail_with_records(tmp_path / "h.sqlite", sinks=[sink])
    with capture_logs() as logs:
        trail.checkpoint("requested")
    trail.close()
    failures = [e for e in logs if e["event"] == "audit_checkpoint_export_failed"]
    assert len(failures) == 1 and failures[0]["error"].startswith(f"syslog {tmp_path / 'no-such-log-socket'}: cannot send the checkpoint of seq 4")
    assert "Traceback" not in capsys.readouterr().err


def test_a_bad_syslog_address_is_a_clear_error():
    with pytest.raises(CheckpointExportError, match="syslog 'loghost': expected /path/to/socket or host:port"):
        SyslogSink("loghost")


class _Collector(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    status = 204

    def do_POST(self) -> None:
        time.sleep(self.server.delay_s)  # type: ignore[attr-defined]
        length = int(self.headers["Content-Length"])
        self.server.received.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    server.received = []  # type: ignore[attr-defined]
    server.status = 204  # type: ignore[attr-defined]
    server.delay_s = 0.0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_an_http_endpoint_gets_each_checkpoint_as_a_json_post(tmp_path, endpoint):
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/checkpoints"
    trail = _trail_with_records(tmp_path / "h.sqlite", sinks=[HttpSink(url, timeout_s=5.0)])
    checkpoint = trail.checkpoint("requested")
    trail.close()
    assert len(endpoint.received) == 1
    assert endpoint.received[0]["seq"] == checkpoint.seq and endpoint.received[0]["hash"] == checkpoint.hash
    assert endpoint.received[0]["format"] == "bioreactor-mpc-audit-checkpoint"


def test_a_slow_endpoint_does_not_hold_up_the_trail_exporting_in_the_background(tmp_path, endpoint):
    endpoint.delay_s = 1.0
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/"
    trail = _trail_with_records(tmp_path / "h.sqlite", sinks=[HttpSink(url, timeout_s=5.0)], export_in_background=True)
    started = time.monotonic()
    checkpoint = trail.checkpoint("requested")
    assert time.monotonic() - started < 0.5, "the append and the checkpoint record do not wait for the endpoint"
    assert endpoint.received == []
    trail.close()  # waits for the export
    assert [r["seq"] for r in endpoint.received] == [checkpoint.seq]


def test_a_failing_sink_is_logged_and_the_record_stays_written(tmp_path, endpoint):
    endpoint.status = 503
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}/"
    closed.close()
    sink_file = tmp_path / "cp.jsonl"
    trail = _trail_with_records(tmp_path / "h.sqlite", sinks=[HttpSink(url, timeout_s=2.0), HttpSink(dead, timeout_s=2.0), FileSink(sink_file)])
    with capture_logs() as logs:
        checkpoint = trail.checkpoint("requested")
    trail.close()
    failures = [e for e in logs if e["event"] == "audit_checkpoint_export_failed"]
    assert [f["sink"] for f in failures] == [f"http {url}", f"http {dead}"]
    assert "answered 503" in failures[0]["error"] and "cannot send the checkpoint of seq 4" in failures[1]["error"]
    assert [r.checkpoint for r in read_checkpoints(sink_file)[0]] == [checkpoint], "the other sinks still get it"
    with pytest.raises(CheckpointExportError, match="only http:// and https://"):
        HttpSink("ftp://example.org/")


# --------------------------------------------------------------------------- the runtime's wiring


def _config(tmp_path: Path, **audit: Any) -> Path:
    origin = REPO / "configs" / "runtime" / "reference-opcua.yaml"
    data = yaml.safe_load(origin.read_text())
    for name in ("tag_map", "batch", "model"):
        data[name] = str((origin.parent / data[name]).resolve())
    data["history"] = str(tmp_path / "var" / "history.sqlite")
    if audit:
        data["audit"] = audit
    path = tmp_path / "etc" / "runtime.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_runtime_key_is_the_env_var_then_the_config_then_audit_key_beside_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = _config(tmp_path)
    with capture_logs() as logs:
        assert audit_key(load_runtime_config(config)) is None
    assert [e["event"] for e in logs] == ["audit_unkeyed"]
    beside = create_key_file(config.parent / "audit.key")
    assert audit_key(load_runtime_config(config)) == beside
    named = create_key_file(tmp_path / "secrets" / "site.key")
    found = audit_key(load_runtime_config(_config(tmp_path, key_file="../secrets/site.key")))
    assert found is not None and found.key_id == named.key_id and found.path is not None and found.path.resolve() == named.path
    from_env = create_key_file(tmp_path / "env.key")
    monkeypatch.setenv(KEY_ENV, str(from_env.path))
    assert audit_key(load_runtime_config(config)) == from_env


def test_a_named_key_that_is_missing_or_readable_by_others_stops_the_start(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(AuditKeyError, match="site.key: no such audit key file"):
        audit_key(load_runtime_config(_config(tmp_path, key_file="site.key")))
    key = create_key_file(tmp_path / "etc" / "site.key")
    assert key.path is not None
    key.path.chmod(0o604)
    with pytest.raises(AuditKeyError, match=r"site.key: mode 0604: an audit key file must be readable by its owner only"):
        audit_key(load_runtime_config(_config(tmp_path, key_file="site.key")))


def test_the_checkpoint_sinks_come_from_the_config(tmp_path):
    loaded = load_runtime_config(_config(tmp_path, checkpoints={"file": "../offsite/cp.jsonl", "syslog": "/dev/log", "http_url": "https://audit.example/cp", "every_cycles": 30}))
    sinks = checkpoint_sinks(loaded)
    assert [s.describe() for s in sinks] == [f"file {tmp_path / 'etc' / '..' / 'offsite' / 'cp.jsonl'}", "syslog /dev/log", "http https://audit.example/cp"]
    assert loaded.config.audit.checkpoints.every_cycles == 30 and loaded.config.audit.checkpoints.every_records == 100
    with capture_logs() as logs:
        assert checkpoint_sinks(load_runtime_config(_config(tmp_path))) == []
    assert [e["event"] for e in logs] == ["audit_checkpoints_not_exported"]


def test_a_bad_checkpoint_setting_names_the_field(tmp_path):
    from plant_models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"audit\.checkpoints\.http_url"):
        load_runtime_config(_config(tmp_path, checkpoints={"http_url": "ftp://x"}))
    with pytest.raises(ConfigError, match=r"audit\.checkpoints\.every_records"):
        load_runtime_config(_config(tmp_path, checkpoints={"every_records": 0}))
