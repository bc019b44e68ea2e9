"""The culture model against physics: mass balances, dilution, non-negativity, the temperature lag."""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest

from controller.config import BatchConfig
from plant_models.cho import INPUT_INDEX, OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.parameters import PARAMETER_NAMES


def _integrate_with_quadratures(model: CultureModel, x0: np.ndarray, u: np.ndarray, p: np.ndarray, t_end_h: float):
    """Integrate the model with CVODES and, alongside, the consumption integrals ∫ r·V dt."""
    t = ca.SX.sym("t")
    x = ca.SX.sym("x", model.n_states)
    y = model.outputs(t, x, u, p)
    volume = x[STATE_INDEX["volume"]]
    quadratures = ca.vertcat(
        y[OUTPUT_INDEX["glucose_uptake"]] * volume,
        y[OUTPUT_INDEX["glutamine_uptake"]] * volume,
        y[OUTPUT_INDEX["product_formation"]] * volume,
    )
    ode = {"t": t, "x": x, "ode": model.rhs(t, x, u, p), "quad": quadratures}
    integrator = ca.integrator("balance", "cvodes", ode, 0.0, t_end_h, {"abstol": 1e-10, "reltol": 1e-10})
    result = integrator(x0=x0)
    return np.asarray(result["xf"]).ravel(), np.asarray(result["qf"]).ravel()


@pytest.fixture
def fed_conditions(batch: BatchConfig) -> tuple[np.ndarray, np.ndarray]:
    u = np.zeros(3)
    u[INPUT_INDEX["feed_rate"]] = 2.0
    u[INPUT_INDEX["glucose_rate"]] = 0.3
    u[INPUT_INDEX["temperature_setpoint"]] = 34.0
    return batch.inoculation.initial_state(), u


def test_glucose_fed_equals_consumed_plus_accumulated(model, nominal_p, batch, fed_conditions):
    x0, u = fed_conditions
    t_end = 200.0
    xf, consumed = _integrate_with_quadratures(model, x0, u, nominal_p, t_end)
    media = batch.media
    fed_g = t_end * (u[0] * media.nutrient_feed_glucose_g_per_l + u[1] * media.glucose_feed_g_per_l)
    accumulated_g = xf[STATE_INDEX["glucose"]] * xf[STATE_INDEX["volume"]] - x0[STATE_INDEX["glucose"]] * x0[STATE_INDEX["volume"]]
    assert consumed[0] > 0.3 * fed_g  # the balance is not trivially satisfied by a culture that eats nothing
    assert fed_g == pytest.approx(consumed[0] + accumulated_g, rel=1e-7)


def test_glutamine_fed_equals_consumed_plus_accumulated(model, nominal_p, batch, fed_conditions):
    x0, u = fed_conditions
    t_end = 200.0
    xf, consumed = _integrate_with_quadratures(model, x0, u, nominal_p, t_end)
    fed_mmol = t_end * u[0] * batch.media.nutrient_feed_glutamine_mm
    accumulated = xf[STATE_INDEX["glutamine"]] * xf[STATE_INDEX["volume"]] - x0[STATE_INDEX["glutamine"]] * x0[STATE_INDEX["volume"]]
    assert fed_mmol == pytest.approx(consumed[1] + accumulated, rel=1e-7)


def test_product_mass_equals_integral_of_formation(model, nominal_p, fed_conditions):
    x0, u = fed_conditions
    xf, formed = _integrate_with_quadratures(model, x0, u, nominal_p, 200.0)
    assert xf[STATE_INDEX["titer"]] * xf[STATE_INDEX["volume"]] == pytest.approx(formed[2], rel=1e-7)


def test_volume_rises_by_feeds_plus_base(model, nominal_p, fed_conditions):
    x0, u = fed_conditions
    xf, _ = _integrate_with_quadratures(model, x0, u, nominal_p, 100.0)
    added = 100.0 * (u[0] + u[1]) + xf[STATE_INDEX["base_added"]]
    assert xf[STATE_INDEX["volume"]] - x0[STATE_INDEX["volume"]] == pytest.approx(added, rel=1e-9)


def test_dilution_without_cells_follows_mixing(model, nominal_p, batch):
    """With no cells, feeding only mixes: C·V grows by what the feed brings, exactly."""
    x0 = batch.inoculation.initial_state()
    x0[STATE_INDEX["viable_cells"]] = 0.0
    x0[STATE_INDEX["dead_cells"]] = 0.0
    x0[STATE_INDEX["titer"]] = 1.0
    p = nominal_p.copy()
    p[PARAMETER_NAMES.index("culture.metabolism.glutamine_degradation_per_h")] = 0.0
    u = np.array([5.0, 0.0, 36.5])
    xf, _ = _integrate_with_quadratures(model, x0, u, p, 50.0)
    v0, vf = x0[STATE_INDEX["volume"]], xf[STATE_INDEX["volume"]]
    assert vf == pytest.approx(v0 + 250.0 + xf[STATE_INDEX["base_added"]], rel=1e-12)
    assert xf[STATE_INDEX["base_added"]] < 0.05  # only the smoothing of max(0, ·) adds base without lactate
    expected_glucose = (x0[STATE_INDEX["glucose"]] * v0 + 250.0 * batch.media.nutrient_feed_glucose_g_per_l) / vf
    assert xf[STATE_INDEX["glucose"]] == pytest.approx(expected_glucose, rel=1e-8)
    assert xf[STATE_INDEX["titer"]] == pytest.approx(v0 / vf, rel=1e-8)  # product is diluted, not lost


def test_unfed_culture_starves_without_going_negative(model, nominal_p, batch):
    """Fifteen days without feed: substrates run out, states stay non-negative, cells die."""
    x0 = batch.inoculation.initial_state()
    states = []
    t, x = 0.0, x0
    one_hour = model.rk4_step(1.0 / 60.0)
    for _ in range(15 * 24):
        for _ in range(60):
            t_next, x_next = one_hour(t, x, np.array([0.0, 0.0, 36.5]), nominal_p)
            t, x = float(t_next), np.asarray(x_next).ravel()
        states.append(x)
    states = np.array(states)
    for name in ("viable_cells", "dead_cells", "glucose", "glutamine", "lactate", "ammonia", "titer"):
        assert states[:, STATE_INDEX[name]].min() >= -1e-9, name
    assert states[-1, STATE_INDEX["glucose"]] < 0.05
    viability = states[:, STATE_INDEX["viable_cells"]] / (states[:, STATE_INDEX["viable_cells"]] + states[:, STATE_INDEX["dead_cells"]])
    assert viability[-1] < 0.5 * viability.max()


def test_temperature_follows_setpoint_with_first_order_lag(model, nominal_p, batch, nominal):
    x0 = batch.inoculation.initial_state()
    u = np.array([0.0, 0.0, 33.0])
    lag = nominal.temperature.lag_h
    xf, _ = _integrate_with_quadratures(model, x0, u, nominal_p, lag)
    expected = 33.0 + (x0[STATE_INDEX["temperature"]] - 33.0) * np.exp(-1.0)
    assert xf[STATE_INDEX["temperature"]] == pytest.approx(expected, abs=1e-6)


def test_lower_temperature_raises_productivity_and_slows_growth(model, nominal_p, batch):
    x = batch.inoculation.initial_state()
    warm = x.copy()
    cold = x.copy()
    cold[STATE_INDEX["temperature"]] = 33.0
    u = np.array([0.0, 0.0, 36.5])
    y_warm = np.asarray(model.outputs(48.0, warm, u, nominal_p)).ravel()
    y_cold = np.asarray(model.outputs(48.0, cold, u, nominal_p)).ravel()
    assert y_cold[OUTPUT_INDEX["product_formation"]] > 1.3 * y_warm[OUTPUT_INDEX["product_formation"]]
    assert y_cold[OUTPUT_INDEX["growth_rate"]] < 0.8 * y_warm[OUTPUT_INDEX["growth_rate"]]


@pytest.mark.parametrize(("rate", "output"), [("growth", "growth_rate"), ("death", "death_rate"), ("glucose_uptake", "glucose_uptake"), ("product", "product_formation")])
def test_a_correction_multiplies_its_rate_by_the_stated_factor(model, nominal_p, batch, rate, output):
    """exp(a·ΔT + b·ΔT² + g·(t − 168 h)/168 h) on one rate (docs/model.md §3.11); the other rates unchanged."""
    x = batch.inoculation.initial_state()
    x[STATE_INDEX["temperature"]] = 34.5  # ΔT = −2 °C from the 36.5 °C reference
    u = np.array([0.0, 0.0, 34.5])
    corrected = nominal_p.copy()
    for term, value in (("temperature_per_degc", 0.1), ("temperature2_per_degc2", -0.02), ("age", 0.4)):
        corrected[PARAMETER_NAMES.index(f"culture.correction.{rate}_{term}")] = value
    t = 336.0  # one reference age after 168 h
    base = np.asarray(model.outputs(t, x, u, nominal_p)).ravel()
    bent = np.asarray(model.outputs(t, x, u, corrected)).ravel()
    assert bent[OUTPUT_INDEX[output]] == pytest.approx(base[OUTPUT_INDEX[output]] * np.exp(0.1 * -2.0 - 0.02 * 4.0 + 0.4 * 1.0), rel=1e-9)
    for other in {"growth_rate", "death_rate", "product_formation"} - {output}:  # none of them depends on another's correction
        assert bent[OUTPUT_INDEX[other]] == pytest.approx(base[OUTPUT_INDEX[other]], rel=1e-12)


def test_a_glucose_uptake_correction_makes_no_more_lactate_than_the_yield_allows(model, nominal_p, batch):
    """The correction bends the lactate made from growth glucose with the uptake: lactate per glucose stays ≤ the yield."""
    x = batch.inoculation.initial_state()
    x[STATE_INDEX["lactate"]] = 0.0  # nothing to take up: all lactate is made
    x[STATE_INDEX["temperature"]] = 33.0
    p = nominal_p.copy()
    p[PARAMETER_NAMES.index("culture.metabolism.lactate_yield_from_glucose_g_per_g")] = 0.9
    for slope in (-0.46, 0.0, 0.46):  # the fit's bounds of this slope
        p[PARAMETER_NAMES.index("culture.correction.glucose_uptake_temperature_per_degc")] = slope
        y = np.asarray(model.outputs(72.0, x, np.array([0.0, 0.0, 33.0]), p)).ravel()
        assert 0.0 < y[OUTPUT_INDEX["lactate_net_production"]] <= 0.9 * y[OUTPUT_INDEX["glucose_uptake"]]


def test_lactate_is_consumed_once_growth_stops_and_glucose_is_low(model, nominal_p, batch):
    x = batch.inoculation.initial_state()
    x[STATE_INDEX["viable_cells"]] = 15.0
    x[STATE_INDEX["lactate"]] = 2.5
    x[STATE_INDEX["glucose"]] = 0.5
    u = np.array([0.0, 0.0, 33.0])
    late = np.asarray(model.outputs(300.0, x, u, nominal_p)).ravel()
    early = np.asarray(model.outputs(24.0, x, u, nominal_p)).ravel()
    assert late[OUTPUT_INDEX["lactate_net_production"]] < 0.0
    assert early[OUTPUT_INDEX["lactate_net_production"]] > late[OUTPUT_INDEX["lactate_net_production"]]


def test_model_functions_accept_symbolic_arguments(model):
    """The MPC and estimator build on the same functions with MX and SX arguments."""
    for sym in (ca.SX, ca.MX):
        dx = model.rhs(sym.sym("t"), sym.sym("x", model.n_states), sym.sym("u", model.n_inputs), sym.sym("p", model.n_parameters))
        assert dx.shape == (model.n_states, 1)


def test_signal_names_are_unique_and_carry_units(model):
    for signals in (model.states, model.inputs, model.outputs_spec):
        names = [s.name for s in signals]
        assert len(names) == len(set(names))
        assert all(s.unit for s in signals)
    assert len(set(model.parameter_names)) == model.n_parameters
