"""Tag maps: the default maps are the reference interface exactly; a wrong map fails at load with a clear message; Modbus encoding."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import yaml

from interfaces.modbus_codec import ModbusEncodingError, ModbusLayout, registers_by_address
from interfaces.signals import SIGNALS
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
from plant_models.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "plc"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-plc.md"


@pytest.fixture(scope="module")
def modbus() -> ModbusTagMap:
    tag_map = load_tag_map(CONFIGS / "reference-modbus.yaml")
    assert isinstance(tag_map, ModbusTagMap)
    return tag_map


def _words(value: float) -> list[int]:
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


def test_opcua_reference_map_names_every_signal_in_its_namespace():
    tag_map = load_tag_map(CONFIGS / "reference-opcua.yaml")
    assert isinstance(tag_map, OpcUaTagMap)
    assert tag_map.namespace_uri == "urn:bioreactor-mpc:reference-plc"
    assert set(tag_map.tags) == set(SIGNALS)
    assert all(tag.node == f"BR01.{name}" for name, tag in tag_map.tags.items())
    types = {name: tag.type for name, tag in tag_map.tags.items()}
    assert types["Sample.Seq"] == types["MPC.Heartbeat"] == "uint32"
    assert types["Status.Phase"] == types["MPC.Mode"] == "int32"
    assert types["SP.HarvestRequest"] == "boolean" and types["Status.BatchId"] == "string" and types["PV.OUR"] == "double"


def test_modbus_reference_map_has_the_reference_addresses(modbus):
    tags = modbus.tags
    pv = ["PV.Temperature", "PV.pH", "PV.DO", "PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal", "PV.OUR", "PV.CER", "PV.Capacitance", "PV.AgitationSpeed"]
    assert [(tags[n].table, tags[n].address, tags[n].bad_when.address, tags[n].bad_when.bit) for n in pv] == [("input", 2 * i, 63, i) for i in range(11)]
    samples = ["Sample.VCD", "Sample.Viability", "Sample.Glucose", "Sample.Lactate", "Sample.Glutamine", "Sample.Ammonia", "Sample.Titer", "Sample.Osmolality"]
    assert tags["Sample.TakenAt"].address == 30 and tags["Sample.TakenAt"].bad_when is None
    assert [(tags[n].address, tags[n].bad_when.address, tags[n].bad_when.bit) for n in samples] == [(32 + 2 * i, 64, i) for i in range(8)]
    assert (tags["Status.ProcessTime"].address, tags["Sample.Seq"].address, tags["Status.Phase"].address) == (22, 60, 62)
    assert (tags["Sample.Seq"].type, tags["Status.Phase"].type, tags["MPC.Mode"].type) == ("uint32", "uint16", "uint16")
    assert (tags["Status.BatchId"].address, tags["Status.BatchId"].register_count) == (70, 8)
    holding = [
        "SP.FeedRate",
        "SP.GlucoseRate",
        "SP.Temperature",
        "MPC.Heartbeat",
        "MPC.Mode",
        "MPC.Rec.FeedRate",
        "MPC.Rec.GlucoseRate",
        "MPC.Rec.Temperature",
        "MPC.Rec.HarvestTime",
        "MPC.Pred.HarvestTiter",
    ]
    assert [tags[n].address for n in holding] == [0, 2, 4, 10, 12, 20, 22, 24, 26, 28]
    assert all(tags[n].table == "holding" for n in holding)
    assert (tags["SP.HarvestRequest"].table, tags["SP.HarvestRequest"].address) == ("coil", 0)
    assert [(tags[n].table, tags[n].address) for n in ("Status.RemoteEnabled", "Status.WatchdogTripped", "Sim.Lockstep")] == [("discrete", i) for i in range(3)]
    assert (modbus.unit_id, modbus.word_order) == (1, "big")


def test_modbus_blocks_and_decoding(modbus):
    layout = ModbusLayout(modbus)
    blocks = {block.table: block for block in layout.blocks()}
    assert (blocks["input"].start, blocks["input"].count) == (0, 78)  # one read: values, quality words and the batch id
    assert (blocks["holding"].start, blocks["holding"].count) == (0, 30)
    assert (blocks["coil"].count, blocks["discrete"].count) == (1, 3)
    inputs = [0] * 78
    inputs[0:2] = _words(36.5)
    inputs[22:24] = _words(121.25)
    inputs[36:38] = _words(math.nan)  # Sample.Glucose not measured
    inputs[60:62] = [0x0001, 0x0002]  # Sample.Seq = 65538, high word first
    inputs[62] = 1
    inputs[63] = 1 << 9  # PV.Capacitance Bad
    inputs[64] = 1 << 2  # the third sample float after TakenAt (glucose) not measured
    inputs[70:78] = [0x4252, 0x3031, 0x2D30, 0x3037, 0, 0, 0, 0]  # "BR01-007"
    raw = {
        "input": registers_by_address(blocks["input"], inputs),
        "holding": registers_by_address(blocks["holding"], [0] * 30),
        "coil": registers_by_address(blocks["coil"], [False]),
        "discrete": registers_by_address(blocks["discrete"], [True, False, True]),
    }
    values = layout.decode(raw)
    assert values["PV.Temperature"].value == 36.5 and values["PV.Temperature"].good
    assert values["Status.ProcessTime"].value == 121.25
    assert not values["PV.Capacitance"].good and values["PV.Volume"].good
    assert not values["Sample.Glucose"].good and math.isnan(values["Sample.Glucose"].value)
    assert values["Sample.Titer"].good
    assert values["Sample.Seq"].value == 65538 and values["Status.Phase"].value == 1
    assert values["Status.BatchId"].value == "BR01-007"
    assert values["Status.RemoteEnabled"].value is True and values["Sim.Lockstep"].value is True


def test_modbus_encoding_of_writes(modbus):
    layout = ModbusLayout(modbus)
    write = layout.encode("SP.Temperature", 33.0)
    assert (write.table, write.address, list(write.registers)) == ("holding", 4, _words(33.0))
    heartbeat = layout.encode("MPC.Heartbeat", 70000)
    assert heartbeat.registers == (1, 70000 - 65536)
    assert layout.encode("SP.HarvestRequest", True).bit is True
    with pytest.raises(ModbusEncodingError, match="not finite"):
        layout.encode("SP.FeedRate", math.nan)
    with pytest.raises(ModbusEncodingError, match="outside the range of uint32"):
        layout.encode("MPC.Heartbeat", -1)
    with pytest.raises(KeyError, match="not a writable signal"):
        layout.encode("PV.Temperature", 36.0)
    batch_id = layout.encode_value("Status.BatchId", "BR01-007")
    assert batch_id.registers == (0x4252, 0x3031, 0x2D30, 0x3037, 0, 0, 0, 0)


def test_scaled_integer_tag_round_trips(modbus):
    """A PLC that sends temperature as an int16 in tenths of a degree is a different map, not different code."""
    data = modbus.model_dump(mode="json")
    data["tags"]["SP.Temperature"] = {"table": "holding", "address": 4, "type": "int16", "scale": 0.1}
    layout = ModbusLayout(ModbusTagMap.model_validate(data))
    assert layout.encode("SP.Temperature", 33.4).registers == (334,)
    raw = {table: dict.fromkeys(range(200), 0) for table in ("input", "holding", "coil", "discrete")}
    raw["holding"][4] = 334
    assert layout.decode(raw)["SP.Temperature"].value == pytest.approx(33.4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tags"].pop("PV.Volume"), "required signals missing: PV.Volume"),
        (lambda d: d["tags"].__setitem__("PV.Volumen", d["tags"]["PV.Volume"]), "unknown signal; did you mean 'PV.Volume'"),
        (lambda d: d["tags"]["SP.FeedRate"].update(table="input"), "must be in holding registers or coils"),
        (lambda d: d["tags"]["PV.pH"].update(address=1), "tags.PV.pH.address: input register 1 is also used by tags.PV.Temperature; got 1"),
        (lambda d: d["tags"]["SP.HarvestRequest"].update(table="holding"), "does not fit table 'holding'"),
        (lambda d: d["tags"]["Sample.Seq"].update(type="float32"), "cannot carry a unsigned signal"),
        (lambda d: d["tags"]["PV.OUR"].update(bad_when={"address": 0, "bit": 3}), "tags.PV.OUR.bad_when.address: input register 0 is also used by tags.PV.Temperature; got 0"),
        (lambda d: d["tags"]["PV.Temperature"].update(address=63), ".bad_when.address: input register 63 is also used by tags.PV.Temperature; got 63"),
        (lambda d: d.update(word_order="middle"), "word_order"),
    ],
)
def test_wrong_modbus_map_names_the_file_and_the_problem(tmp_path, change, message):
    data = yaml.safe_load((CONFIGS / "reference-modbus.yaml").read_text())
    change(data)
    path = tmp_path / "plc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        load_tag_map(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_wrong_opcua_map_and_protocol_are_reported(tmp_path):
    data = yaml.safe_load((CONFIGS / "reference-opcua.yaml").read_text())
    data["tags"]["PV.OUR"]["node"] = data["tags"]["PV.CER"]["node"]
    path = tmp_path / "plc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"tags\.PV\.OUR\.node: is also the node of tags\.PV\.CER; got 'BR01\.PV\.CER'"):
        load_tag_map(path)
    path.write_text(yaml.safe_dump({**data, "protocol": "profinet"}))
    with pytest.raises(ConfigError, match="protocol: expected 'opcua' or 'modbus'; got 'profinet'"):
        load_tag_map(path)


@pytest.mark.skipif(not REFERENCE.exists(), reason="the shared reference document is not beside the checkout")
def test_every_reference_tag_is_a_signal():
    names = {line.split("`")[1] for line in REFERENCE.read_text().splitlines() if line.startswith("| `")}
    assert names == set(SIGNALS)


# --------------------------------------------------------------------------- OPC UA security section


def _opcua_map_with(tmp_path: Path, security: object = None, **top: object) -> Path:
    data = yaml.safe_load((CONFIGS / "reference-opcua.yaml").read_text())
    if security is not None:
        data["security"] = security
    data.update(top)
    path = tmp_path / "plc.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_opcua_security_paths_are_relative_to_the_map(tmp_path):
    path = _opcua_map_with(
        tmp_path,
        {
            "policy": "Aes256_Sha256_RsaPss",
            "certificate": "pki/own/runtime.der",
            "private_key": "/etc/bioreactor-mpc/pki/own/runtime.pem",
            "trust_store": "pki/trusted",
            "username_env": "OPCUA_USER",
            "password_file": "secrets/opcua-password",
        },
    )
    security = load_tag_map(path).security
    assert security is not None and (security.mode, security.policy) == ("sign_and_encrypt", "Aes256_Sha256_RsaPss")
    assert security.certificate == tmp_path / "pki" / "own" / "runtime.der"
    assert security.private_key == Path("/etc/bioreactor-mpc/pki/own/runtime.pem")  # absolute paths stay
    assert (security.trust_store, security.password_file) == (tmp_path / "pki" / "trusted", tmp_path / "secrets" / "opcua-password")
    assert load_tag_map(CONFIGS / "reference-opcua.yaml").security is None  # the reference map stays insecure (needs the opt-in)


@pytest.mark.parametrize(
    ("security", "top", "message"),
    [
        (
            {"certificate": "c.der", "private_key": "k.pem", "trust_store": "t", "username_env": "U", "password": "hunter2"},
            {},
            "security: password: a password is never read from the tag map",
        ),
        (None, {"password": "hunter2"}, "<top level>: password: a password is never read from the tag map"),
        (
            {"certificate": "c.der", "private_key": "k.pem", "trust_store": "t", "username_env": "U", "password_env": "hunter2!"},
            {},
            "security: password_env: expected the name of an environment variable",
        ),
        (None, {"endpoint": "opc.tcp://operator:hunter2@10.0.0.5:4840/"}, "endpoint: the endpoint URL must not hold a user name or password"),
    ],
)
def test_opcua_credentials_in_the_map_are_refused_without_echoing_them(tmp_path, security, top, message):
    path = _opcua_map_with(tmp_path, security, **top)
    with pytest.raises(ConfigError) as error:
        load_tag_map(path)
    text = str(error.value)
    assert str(path) in text and message in text and "hunter2" not in text
    if "password:" in message:
        assert "password_env" in text and "password_file" in text


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ({"trust_store": "t"}, "security: mode 'sign_and_encrypt' needs certificate, private_key"),
        ({"mode": "sign", "certificate": "c.der", "private_key": "k.pem"}, "security: mode 'sign' needs trust_store"),
        ({"mode": "none", "username_env": "U", "password_env": "P"}, "mode 'none' would send the password in clear text"),
        ({"mode": "none", "username_env": "U"}, "a user name (username_env) and a password (password_env or password_file) go together"),
        ({"mode": "none", "password_env": "P", "password_file": "p"}, "password_env or password_file, not both"),
        ({"mode": "none", "policy": "Basic128Rsa15"}, "security.policy: Input should be 'Basic256Sha256', 'Aes128_Sha256_RsaOaep' or 'Aes256_Sha256_RsaPss'"),
        ({"mode": "none", "username": "operator"}, "security: username: a user name is never read from the tag map"),
    ],
)
def test_incomplete_or_contradictory_security_is_reported(tmp_path, security, message):
    path = _opcua_map_with(tmp_path, security)
    with pytest.raises(ConfigError) as error:
        load_tag_map(path)
    assert str(path) in str(error.value) and message in str(error.value)
