"""The operator screen against what a probe of it found (issue 15): each test is one attack, and fails on the screen before the fix.

The screen runs on a real :class:`~controller.runtime.Runtime` (history, audit trail, desk and mode machine real; no PLC cycle:
a fake port answers the one read a signature makes), through httpx's ASGI transport, and through uvicorn for what
only the server shows (TLS, the peer address it reports).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.advisory import Recommendation
from controller.modes import RequestedMode, State
from controller.ports import Reading
from controller.runtime import Runtime
from controller.runtime_config import RuntimeSettings, ScreenSettings, load_runtime_config
from interfaces.audit import AuditTrail
from interfaces.history import SqliteHistory
from interfaces.opcua_certificates import create_certificate
from interfaces.users import Role, UserStore
from interfaces.web.app import create_app
from interfaces.web.security import client_address
from interfaces.web.serve import serve_screen
from plant_models.config_loading import validate_model
from plant_models.errors import ConfigError
from plant_models.parameters import parameter_vector
from simulator.config import load_simulation

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
USERS = {
    "olga": (Role.OPERATOR, "Ochre-lantern-Tundra-58"),
    "erik": (Role.ENGINEER, "Bramble-quartz-Violet-31"),
    "vera": (Role.VIEWER, "Cobalt-meadow-Falcon-76"),
    "quinn": (Role.QA, "Juniper-anvil-Saffron-19"),
}
SCREEN = "http://localhost:8080"  # a Host the screen answers by default (loopback names; see allowed_hosts)
FOREIGN = "https://attacker.example"
BASIS = (0.5, 0.1, 36.5)

pytestmark = pytest.mark.security


class ScannedPlc:
    """The one PLC read a signature makes: the batch clock, the last lab result's number, the setpoints running, remote enabled."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {
            "Status.ProcessTime": 2.2,
            "Status.RemoteEnabled": True,
            "Sample.Seq": 0,
            **dict(zip(("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature"), BASIS, strict=True)),
        }

    async def read(self) -> Mapping[str, Reading]:
        return {name: Reading(value, True, None) for name, value in self.values.items()}


@dataclass
class Screen:
    runtime: Runtime
    history_path: Path

    def recommend(self) -> Recommendation:
        """Offer a pending recommendation in advisory mode, as a cycle at 2 h would."""
        recommendation = Recommendation(
            made_at_h=2.0,
            expires_at_h=3.0,
            feed_rate_lph=0.6,
            glucose_rate_lph=0.12,
            temperature_degc=36.0,
            harvest_now=False,
            harvest_time_h=300.0,
            predicted_titer_g_per_l=5.1,
            predicted_score_g_per_day=610.0,
            basis_setpoints=BASIS,
        )
        self.runtime.modes.state = State.ADVISORY
        self.runtime.desk.offer(recommendation)
        return recommendation

    def audit_actions(self) -> list[str]:
        trail = AuditTrail(self.history_path, read_only=True)
        try:
            return [record.action for record in trail.records()]
        finally:
            trail.close()


@pytest.fixture
def screen(tmp_path: Path) -> Iterator[Screen]:
    loaded = load_simulation(PLATFORM)
    history_path = tmp_path / "history.sqlite"
    users = UserStore(history_path)
    for name, (role, password) in USERS.items():
        users.add_user(name, full_name=f"{name.title()} Tester", role=role, password=password)
    users.close()
    runtime = Runtime(
        port=ScannedPlc(),  # type: ignore[arg-type]
        history=SqliteHistory(history_path),
        batch=loaded.batch,
        nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
        settings=RuntimeSettings(mode=RequestedMode.ADVISORY),
        mpc=object(),  # type: ignore[arg-type]  # never solves here
        audit=AuditTrail(history_path),
    )
    yield Screen(runtime, history_path)
    runtime.history.close()
    runtime.recorder.audit.close()


@asynccontextmanager
async def app_client(screen: Screen, settings: ScreenSettings | None = None, *, peer: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    users, audit = UserStore(screen.history_path), AuditTrail(screen.history_path, read_only=True)
    app = create_app(runtime=screen.runtime, users=users, audit=audit, history_path=screen.history_path, settings=settings)
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=SCREEN) as client:
        yield client
    users.close()
    audit.close()


async def log_in(client: httpx.AsyncClient, name: str, *, password: str | None = None, headers: Mapping[str, str] | None = None) -> httpx.Response:
    """Log in as a browser does: load the log-in page (its cookie and form token), post the form from the screen's origin."""
    page = await client.get("/login")
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert token is not None, page.text
    form = {"username": name, "password": password or USERS[name][1], "csrf_token": token.group(1)}
    return await client.post("/login", data=form, headers={"Origin": SCREEN, **(headers or {})})


async def page_token(client: httpx.AsyncClient) -> str:
    """The CSRF token the screen's page gives its scripts."""
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', (await client.get("/")).text)
    assert found is not None
    return found.group(1)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


# ---------------------------------------------------------------------- the login throttle and X-Forwarded-For


def test_x_forwarded_for_from_an_untrusted_peer_does_not_reset_the_login_throttle(screen):
    """The probe: from 127.0.0.1, a new X-Forwarded-For with every guess; 20 guesses were checked, then the right password accepted."""

    async def scenario() -> None:
        async with app_client(screen) as client:
            for guess in range(20):
                response = await log_in(client, "olga", password=f"guess-number-{guess:02d}", headers={"X-Forwarded-For": f"203.0.113.{guess}"})
                assert response.status_code == 303
            right = await log_in(client, "olga", headers={"X-Forwarded-For": "203.0.113.200"})
            assert right.headers["location"] == "/login?error=throttled", "the sixth try from the same peer is refused, whatever it claims"
            assert "bioreactor_mpc_session" not in right.cookies

    run(scenario())


def test_one_address_guessing_a_new_user_name_each_time_is_throttled(screen):
    """helper-24's flood: 59 failed log-ins in 20 s from one client, each with a new user name, none throttled."""
    from interfaces.web.app import ADDRESS_ATTEMPTS

    async def scenario() -> None:
        async with app_client(screen) as client:
            for guess in range(ADDRESS_ATTEMPTS):
                response = await log_in(client, f"user{guess:03d}", password="not-a-password-of-anyone")
                assert response.headers["location"] == "/login?error=credentials", guess
            flooded = await log_in(client, "user999", password="not-a-password-of-anyone")
            assert flooded.headers["location"] == "/login?error=throttled"
            right = await log_in(client, "olga")
            assert right.headers["location"] == "/login?error=throttled", "the address is refused, whatever the name"

    run(scenario())


def test_x_forwarded_for_from_a_trusted_proxy_is_honoured(screen):
    settings = ScreenSettings(trusted_proxies=("10.1.0.0/16",))

    async def scenario() -> None:
        async with app_client(screen, settings, peer="10.1.0.5") as client:
            for guess in range(5):
                # A client may write anything to the left of what the proxy appends: only the proxy's entry counts.
                claimed = f"198.51.100.{guess}, 203.0.113.9"
                assert (await log_in(client, "olga", password=f"guess-number-{guess}", headers={"X-Forwarded-For": claimed})).status_code == 303
            blocked = await log_in(client, "olga", headers={"X-Forwarded-For": "203.0.113.9"})
            assert blocked.headers["location"] == "/login?error=throttled"
            elsewhere = await log_in(client, "olga", headers={"X-Forwarded-For": "203.0.113.10"})
            assert elsewhere.headers["location"] == "/", "another client behind the same proxy is not blocked"

    run(scenario())


def test_the_client_address_is_the_peer_unless_the_peer_is_a_trusted_proxy():
    proxies = ScreenSettings(trusted_proxies=("10.1.0.0/16", "192.0.2.1")).proxy_networks
    assert client_address("127.0.0.1", ["203.0.113.7"], ()) == "127.0.0.1"
    assert client_address("198.51.100.3", ["203.0.113.7"], proxies) == "198.51.100.3"
    assert client_address("10.1.0.5", ["203.0.113.7"], proxies) == "203.0.113.7"
    assert client_address("10.1.0.5", ["1.2.3.4, 203.0.113.7", "192.0.2.1"], proxies) == "203.0.113.7", "proxies chained: the last untrusted hop"
    assert client_address("10.1.0.5", ["203.0.113.7, not-an-address"], proxies) == "10.1.0.5", "garbage from a trusted proxy counts the proxy"
    assert client_address("10.1.0.5", [], proxies) == "10.1.0.5"


def test_a_client_inside_a_trusted_network_cannot_choose_its_address_and_a_port_is_dropped():
    """Found by the attack review: a client inside a trusted network (a proxy subnet drawn too wide) wrote a new address to the
    left of its own with every guess, and the left-most entry was counted; a proxy that writes ports made every client the proxy."""
    proxies = ScreenSettings(trusted_proxies=("10.1.0.0/16",)).proxy_networks
    claimed = {client_address("10.1.0.5", [f"10.1.99.{guess}, 10.1.0.7"], proxies) for guess in range(20)}
    assert claimed == {"10.1.0.7"}, "the address the proxy saw, whatever the client claimed"
    assert client_address("10.1.0.5", ["203.0.113.7:5123"], proxies) == "203.0.113.7"
    assert client_address("10.1.0.5", ["[2001:db8::7]:5123"], proxies) == "2001:db8::7"
    assert client_address("10.1.0.5", ["[2001:db8::7]"], proxies) == "2001:db8::7"
    assert client_address("10.1.0.5", ["2001:db8::7"], proxies) == "2001:db8::7"


def test_an_oversized_body_is_refused_before_any_route_reads_it(screen):
    """Found by the attack review: a 300 MB JSON body posted without a session was read whole and parsed (422, not 401), in the
    runtime's own process (its memory grew by the body's size); a form with its token in the header was read whole too."""
    megabytes = 8

    async def body() -> AsyncIterator[bytes]:
        for _ in range(megabytes):
            yield b"[" * (1024 * 1024)

    async def scenario() -> None:
        async with serve_screen(screen.runtime, ScreenSettings(port=free_port()), screen.history_path) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            declared = await client.post("/api/mode", content=b"[" * (megabytes * 1024 * 1024), headers={"Content-Type": "application/json"})
            chunked = await client.post("/api/mode", content=body(), headers={"Content-Type": "application/json"})
            page = await client.get("/login")
            token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
            assert token is not None
            form = b"username=olga&password=" + b"a" * (megabytes * 1024 * 1024)
            login = await client.post(
                "/login", content=form, headers={"Origin": url.rstrip("/"), "X-CSRF-Token": token.group(1), "Content-Type": "application/x-www-form-urlencoded"}
            )
            assert [declared.status_code, chunked.status_code, login.status_code] == [413, 413, 413]
            assert "larger than 65536 bytes" in chunked.json()["detail"]
            ordinary = await log_in(client, "olga", headers={"Origin": url.rstrip("/")})
            assert ordinary.headers["location"] == "/", "a form of ordinary size still logs in"

    run(scenario())
    assert "login_failed" not in screen.audit_actions(), "the oversized log-in never reached the password check"


def test_uvicorn_does_not_take_the_client_address_from_x_forwarded_for(screen):
    """What the probe hit: uvicorn's own proxy-header handling believes X-Forwarded-For from 127.0.0.1 by default."""

    async def scenario() -> None:
        async with serve_screen(screen.runtime, ScreenSettings(port=free_port()), screen.history_path) as url, httpx.AsyncClient(base_url=url) as client:
            for guess in range(5):
                await log_in(client, "olga", password=f"guess-number-{guess}", headers={"X-Forwarded-For": f"203.0.113.{guess}", "Origin": url.rstrip("/")})
            right = await log_in(client, "olga", headers={"X-Forwarded-For": "203.0.113.99", "Origin": url.rstrip("/")})
            assert right.headers["location"] == "/login?error=throttled"

    run(scenario())


# ---------------------------------------------------------------------- CSRF and origin


def test_state_changes_need_the_session_s_csrf_token_and_the_screen_s_origin(screen):
    """The probe: a JSON POST carrying a foreign Origin changed the mode."""
    body = {"mode": "closed-loop", "password": USERS["erik"][1], "reason": "trial"}

    async def scenario() -> None:
        async with app_client(screen) as client:
            assert (await log_in(client, "erik")).headers["location"] == "/"
            token = await page_token(client)
            refused = {
                "no token": await client.post("/api/mode", json=body, headers={"Origin": SCREEN}),
                "wrong token": await client.post("/api/mode", json=body, headers={"Origin": SCREEN, "X-CSRF-Token": "0" * 64}),
                "foreign origin": await client.post("/api/mode", json=body, headers={"Origin": FOREIGN, "X-CSRF-Token": token}),
                "foreign referer": await client.post("/api/mode", json=body, headers={"Referer": f"{FOREIGN}/page", "X-CSRF-Token": token}),
                "null origin": await client.post("/api/mode", json=body, headers={"Origin": "null", "X-CSRF-Token": token}),
            }
            for case, response in refused.items():
                assert response.status_code == 403, case
            assert "CSRF token" in refused["no token"].json()["detail"] and "CSRF token" in refused["wrong token"].json()["detail"]
            assert "attacker.example" in refused["foreign origin"].json()["detail"]
            assert screen.runtime.modes.requested is RequestedMode.ADVISORY and "mode_requested" not in screen.audit_actions(), "nothing changed"
            # A form post without the token (log out from another site) ends nothing.
            assert (await client.post("/logout", data={"csrf_token": "forged"}, headers={"Origin": SCREEN})).status_code == 403
            assert (await client.get("/api/status")).status_code == 200, "still logged in"
            # The page's own request: its origin, its token.
            changed = await client.post("/api/mode", json=body, headers={"Origin": SCREEN, "X-CSRF-Token": token})
            assert changed.status_code == 200, changed.text
            assert screen.runtime.modes.requested is RequestedMode.CLOSED_LOOP
            logout = await client.post("/logout", data={"csrf_token": token}, headers={"Origin": SCREEN})
            assert logout.status_code == 303 and (await client.get("/api/status")).status_code == 401

    run(scenario())


def test_the_log_in_form_needs_its_own_token_and_origin(screen):
    async def scenario() -> None:
        async with app_client(screen) as client:
            form = {"username": "olga", "password": USERS["olga"][1]}
            assert (await client.post("/login", data=form)).status_code == 403, "no log-in page loaded: no cookie, no token"
            await client.get("/login")
            assert (await client.post("/login", data={**form, "csrf_token": "0" * 64})).status_code == 403
            assert "bioreactor_mpc_session" not in client.cookies
            assert (await log_in(client, "olga", headers={"Origin": FOREIGN})).status_code == 403, "log-in CSRF from another site"
            assert (await log_in(client, "olga")).headers["location"] == "/"

    run(scenario())


def test_a_proxy_s_public_origin_is_accepted_when_configured(screen):
    settings = ScreenSettings(allowed_origins=("https://screen.plant.example",))

    async def scenario() -> None:
        async with app_client(screen, settings) as client:
            assert (await log_in(client, "erik", headers={"Origin": "https://screen.plant.example"})).headers["location"] == "/"
            token = await page_token(client)
            body = {"mode": "off", "password": USERS["erik"][1], "reason": "end of trial"}
            assert (await client.post("/api/mode", json=body, headers={"Origin": "https://screen.plant.example", "X-CSRF-Token": token})).status_code == 200
            assert (await client.post("/api/mode", json=body, headers={"Origin": "https://other.plant.example", "X-CSRF-Token": token})).status_code == 403

    run(scenario())


# ---------------------------------------------------------------------- headers, pages


def test_every_response_carries_the_security_headers_and_no_page_has_inline_script(screen):
    """The probe: no CSP, X-Frame-Options, nosniff, Referrer-Policy or HSTS."""

    async def scenario() -> list[httpx.Response]:
        async with app_client(screen) as client:
            responses = [await client.get("/login"), await client.get("/static/screen.js"), await client.get("/no-such-page"), await client.get("/api/status")]
            responses.append(await client.post("/api/mode", json={}, headers={"Origin": FOREIGN}))
            await log_in(client, "olga")
            responses.append(await client.get("/"))
            return responses

    responses = run(scenario())
    for response in responses:
        headers = response.headers
        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'" and "unsafe-inline" not in headers["content-security-policy"], response.url
        assert policy["frame-ancestors"] == "'none'" and headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"
        assert "strict-transport-security" not in headers, "plain HTTP on the loopback: no HSTS"
    assert responses[0].headers["cache-control"] == "no-store" and "no-store" not in responses[1].headers.get("cache-control", "")
    for page in (responses[0], responses[-1]):
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, flags=re.S)
        assert scripts or page is responses[0]
        assert all('src="/' in attributes and not body.strip() for attributes, body in scripts), "scripts from files only"
        assert not re.search(r"\son[a-z]+\s*=", page.text), "no inline event handlers"


def test_the_log_in_page_shows_only_its_own_messages(screen):
    """The probe: /login?error= showed any attacker-chosen text."""

    async def scenario() -> dict[str, str]:
        async with app_client(screen) as client:
            return {
                code: (await client.get("/login", params={"error": code})).text
                for code in ("credentials", "throttled", "Your session expired. Call +1 555 0100 with your password", "<b>x</b>")
            }

    pages = run(scenario())
    assert "wrong user name or password" in pages["credentials"] and "too many failed attempts: wait five minutes" in pages["throttled"]
    forged = pages["Your session expired. Call +1 555 0100 with your password"]
    assert "555 0100" not in forged and "the log-in did not succeed: try again" in forged
    assert "<b>x</b>" not in pages["<b>x</b>"] and "&lt;b&gt;" not in pages["<b>x</b>"]


# ---------------------------------------------------------------------- signatures bound to id and digest


def test_a_signature_names_the_recommendation_s_id_and_digest_never_a_time(screen):
    """The probe: /api/recommendations/nan/reject signed the current recommendation, a NaN comparison passing."""

    async def scenario() -> None:
        async with app_client(screen) as client:
            recommendation = screen.recommend()
            await log_in(client, "olga")
            token = await page_token(client)
            shown = (await client.get("/api/status")).json()["recommendation"]
            assert shown["recommendation_id"] == recommendation.recommendation_id and shown["status"] == "pending"
            headers = {"Origin": SCREEN, "X-CSRF-Token": token}
            body = {"digest": shown["digest"], "password": USERS["olga"][1], "reason": "lab sample pending"}
            garbage = {
                path: await client.post(path, json=body, headers=headers)
                for path in ("/api/recommendations/nan/reject", "/api/recommendations/2.0/reject", "/api/recommendations/inf/approve", "/api/recommendations/-1/reject")
            }
            for path, response in garbage.items():
                assert response.status_code == 422 and "is not a recommendation id" in response.json()["detail"], path
            url = f"/api/recommendations/{shown['recommendation_id']}/reject"
            bad_digest = await client.post(url, json={**body, "digest": "zz"}, headers=headers)
            assert bad_digest.status_code == 422 and "content digest" in bad_digest.json()["detail"]
            other_digest = await client.post(url, json={**body, "digest": hashlib.sha256(b"other").hexdigest()}, headers=headers)
            assert other_digest.status_code == 409 and "what was shown is not what would be signed" in other_digest.json()["detail"]
            stale = await client.post(f"/api/recommendations/{uuid.uuid4().hex}/reject", json=body, headers=headers)
            assert stale.status_code == 409 and "not the current one" in stale.json()["detail"]
            assert screen.runtime.recommendation.status.value == "pending" and not any(a.startswith("recommendation_") for a in screen.audit_actions())
            # The one shown, by its id and digest: signed, and the audit record carries both.
            rejected = await client.post(url, json=body, headers=headers)
            assert rejected.status_code == 200, rejected.text
            assert rejected.json()["status"] == "rejected" and rejected.json()["signature"]["recommendation_id"] == recommendation.recommendation_id

    run(scenario())
    trail = AuditTrail(screen.history_path, read_only=True)
    (record,) = trail.records(action="recommendation_rejected")
    trail.close()
    signature, signed = record.details["signature"], record.details["recommendation"]
    assert signature["recommendation_id"] == signed["recommendation_id"] and screen.runtime.recommendation.recommendation_id in record.subject
    # The digest, recomputed from the audit record alone (sorted keys, no whitespace, NaN as null), is the one signed.
    content = {key: value for key, value in signed.items() if key not in ("status", "signature", "digest")}
    recomputed = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    assert signature["recommendation_digest"] == signed["digest"] == recomputed


# ---------------------------------------------------------------------- the audit trail


def test_a_signature_on_data_that_moved_on_is_refused(screen):
    """Found by the attack review, held: a recommendation signed after a new lab result, after the PLC's setpoints changed, past
    its expiry, or by the id and digest of the one before, is refused (409) and nothing is recorded as signed."""
    body = {"password": USERS["olga"][1], "reason": "as planned"}

    async def scenario() -> dict[str, int]:
        async with app_client(screen) as client:
            await log_in(client, "olga")
            headers = {"Origin": SCREEN, "X-CSRF-Token": await page_token(client)}

            async def sign(recommendation: Recommendation) -> int:
                path = f"/api/recommendations/{recommendation.recommendation_id}/approve"
                return (await client.post(path, json={**body, "digest": recommendation.digest}, headers=headers)).status_code

            found = {}
            for name, signal, moved in (("new lab result", "Sample.Seq", 1), ("setpoint changed", "SP.FeedRate", 0.7), ("past expiry", "Status.ProcessTime", 3.5)):
                recommendation = screen.recommend()
                kept = screen.runtime.port.values[signal]
                screen.runtime.port.values[signal] = moved
                found[name] = await sign(recommendation)
                screen.runtime.port.values[signal] = kept
            earlier = screen.recommend()
            screen.recommend()
            found["the one before"] = await sign(earlier)
            return found

    assert run(scenario()) == {"new lab result": 409, "setpoint changed": 409, "past expiry": 409, "the one before": 409}
    assert "recommendation_approved" not in screen.audit_actions()


def test_a_csrf_token_from_another_session_and_a_cookie_after_logout_are_refused(screen):
    """Found by the attack review, held: the CSRF token of one session replayed in another, and a session cookie kept after logout."""
    body = {"mode": "advisory", "password": USERS["erik"][1], "reason": "trial"}

    async def scenario() -> None:
        async with app_client(screen) as first, app_client(screen) as second:
            await log_in(first, "erik")
            await log_in(second, "erik")
            token_of_first = await page_token(first)
            replayed = await second.post("/api/mode", json=body, headers={"Origin": SCREEN, "X-CSRF-Token": token_of_first})
            assert replayed.status_code == 403
            assert "wrong CSRF token" in replayed.json()["detail"]
            kept = {"Cookie": f"bioreactor_mpc_session={first.cookies.get('bioreactor_mpc_session')}"}
            async with app_client(screen) as elsewhere:
                assert (await elsewhere.get("/api/status", headers=kept)).status_code == 200, "the kept cookie is the session's, before logout"
                assert (await first.post("/logout", headers={"Origin": SCREEN, "X-CSRF-Token": token_of_first})).status_code == 303
                assert (await elsewhere.get("/api/status", headers=kept)).status_code == 401
                after = await elsewhere.post("/api/mode", json=body, headers={**kept, "Origin": SCREEN, "X-CSRF-Token": token_of_first})
                assert after.status_code == 401

    run(scenario())
    assert "mode_requested" not in screen.audit_actions()


def test_only_qa_and_engineers_read_the_audit_trail(screen):
    """The probe: every viewer could read the whole audit trail."""

    async def scenario() -> dict[str, int]:
        statuses = {}
        for name in USERS:
            async with app_client(screen) as client:
                await log_in(client, name)
                statuses[name] = (await client.get("/api/audit?limit=5")).status_code
        return statuses

    assert run(scenario()) == {"olga": 403, "vera": 403, "erik": 200, "quinn": 200}


# ---------------------------------------------------------------------- TLS


def test_plain_http_off_the_loopback_is_refused_unless_a_tls_proxy_is_declared(screen):
    """The probe: binding 0.0.0.0 served plain HTTP with only a warning."""
    with pytest.raises(ConfigError, match=r"r\.yaml: screen\.host: is not a loopback address.*tls_certificate and tls_key.*allow_plain_http: true"):
        validate_model(RuntimeSettings, {"screen": {"host": "0.0.0.0"}}, source="r.yaml")
    everywhere = {"host": "0.0.0.0", "allowed_hosts": ["screen.plant.example"]}
    assert validate_model(ScreenSettings, {**everywhere, "allow_plain_http": True}, source="r.yaml").allow_plain_http
    assert validate_model(ScreenSettings, {**everywhere, "tls_self_signed": True}, source="r.yaml").tls
    unchecked = ScreenSettings().model_copy(update={"host": "0.0.0.0"})  # a copy skips validation: the server checks again

    async def scenario() -> None:
        async with serve_screen(screen.runtime, unchecked, screen.history_path):
            raise AssertionError("served plain HTTP on 0.0.0.0")

    with pytest.raises(ConfigError, match="screen: host 0.0.0.0 is not a loopback address"):
        run(scenario())


def test_a_foreign_host_header_is_refused_so_dns_rebinding_cannot_reach_the_screen(screen):
    """helper-24's attack: a page at evil.example, its name rebound to the screen's address, posted log-ins with Host and Origin its own."""
    with pytest.raises(ConfigError, match=r"screen\.allowed_hosts: the screen listens on every interface"):
        validate_model(RuntimeSettings, {"screen": {"host": "0.0.0.0", "tls_self_signed": True}}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"allowed_hosts\[0\]"):
        validate_model(ScreenSettings, {"allowed_hosts": ["https://screen.plant.example"]}, source="r.yaml")

    async def scenario() -> None:
        evil = {"Host": "evil.example", "Origin": "http://evil.example"}
        async with app_client(screen) as client:
            assert (await client.get("/login", headers=evil)).status_code == 400
            assert (await client.post("/login", data={"username": "olga", "password": "x"}, headers=evil)).status_code == 400
            assert (await client.get("/login")).status_code == 200  # localhost, the default
        named = ScreenSettings(allowed_hosts=("screen.plant.example",))
        async with app_client(screen, named) as client:
            assert (await client.get("/login", headers={"Host": "screen.plant.example"})).status_code == 200
            assert (await client.get("/login", headers=evil)).status_code == 400

    run(scenario())


def test_a_runtime_config_s_certificate_paths_are_relative_to_it_and_must_exist(tmp_path):
    runtime = REPO / "configs" / "runtime"
    files = {
        name: (runtime / relative).resolve()
        for name, relative in (("tag_map", "../plc/reference-opcua.yaml"), ("batch", "../batch/platform.yaml"), ("model", "../model/cho_nominal.yaml"))
    }
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "screen.pem").write_text("certificate")
    (tmp_path / "pki" / "screen-key.pem").write_text("key")
    lines = [f"{name}: {path}" for name, path in files.items()] + [
        "history: history.sqlite",
        "screen:",
        "  host: 0.0.0.0",
        "  allowed_hosts: [screen.plant.example]",
        "  tls_certificate: pki/screen.pem",
    ]
    config = tmp_path / "runtime.yaml"
    config.write_text("\n".join([*lines, "  tls_key: pki/screen-key.pem", ""]))
    screen = load_runtime_config(config).config.screen
    assert screen is not None and screen.tls_certificate == tmp_path / "pki" / "screen.pem" and screen.tls_key == tmp_path / "pki" / "screen-key.pem"
    config.write_text("\n".join([*lines, "  tls_key: pki/missing-key.pem", ""]))
    with pytest.raises(ConfigError, match=r"runtime\.yaml: screen\.tls_key: no such file .*pki/missing-key\.pem"):
        load_runtime_config(config)


def test_with_a_self_signed_certificate_the_screen_serves_https_with_hsts_and_secure_cookies(screen):
    async def scenario() -> None:
        settings = ScreenSettings(port=free_port(), tls_self_signed=True)
        async with serve_screen(screen.runtime, settings, screen.history_path) as url:
            assert url.startswith("https://127.0.0.1:")
            async with httpx.AsyncClient(base_url=url, verify=False) as client:  # self-signed: a browser warns, this test does not ask
                page = await client.get("/login")
                assert page.headers["strict-transport-security"].startswith("max-age=")
                assert re.search(r"bioreactor_mpc_login=[^;]+;.*\bSecure\b", page.headers["set-cookie"], flags=re.I)
                logged_in = await log_in(client, "olga", headers={"Origin": url.rstrip("/")})
                assert logged_in.headers["location"] == "/" and re.search(r"bioreactor_mpc_session=[^;]+;.*\bSecure\b", logged_in.headers["set-cookie"], flags=re.I)
            async with httpx.AsyncClient(base_url=url.replace("https", "http")) as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get("/login")

    run(scenario())


def test_the_screen_serves_the_certificate_from_its_files_and_names_a_bad_one(screen, tmp_path):
    certificate, key = tmp_path / "screen.pem", tmp_path / "screen-key.pem"
    create_certificate(certificate, key, common_name="screen test", application_uri="urn:test:screen", hostnames=["127.0.0.1"], days=2)
    trusted = ssl.create_default_context(cafile=str(certificate))

    async def scenario(settings: ScreenSettings) -> int:
        async with serve_screen(screen.runtime, settings, screen.history_path) as url, httpx.AsyncClient(base_url=url, verify=trusted) as client:
            return (await client.get("/login")).status_code

    assert run(scenario(ScreenSettings(port=free_port(), host="127.0.0.1", tls_certificate=certificate, tls_key=key))) == 200
    (tmp_path / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"tls_certificate .*broken\.pem and tls_key .*screen-key\.pem cannot serve HTTPS"):
        run(scenario(ScreenSettings(port=free_port(), tls_certificate=tmp_path / "broken.pem", tls_key=key)))


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
