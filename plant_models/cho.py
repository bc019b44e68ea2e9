"""The CHO fed-batch culture model, written once in CasADi symbolics.

A pure function of (process time, state, input, parameters), in the style of
python-control's ``updfcn(t, x, u, params)``: no clock, no logging, no files.
The simulator integrates it with "true" parameters; the estimator and the MPC
build their predictions from the same :class:`CultureModel` with their own
parameter vectors. Equations, units and sources are in ``docs/model.md``.

Units: time h, volume L, flows L/h, cells 1e6 cells/mL (= 1e9 cells/L),
glucose, lactate and product g/L, glutamine and ammonia mM, osmolality
mOsm/kg, temperature °C.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import casadi as ca

from plant_models.parameters import CORRECTION_AGE_REFERENCE_H, PARAMETER_NAMES

GLUCOSE_G_PER_MOL = 180.156
LACTATE_G_PER_MOL = 90.078
PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H = 1e-3 / 24.0
SMOOTH_POSITIVE_EPS_G_PER_L_H = 1e-4


@dataclass(frozen=True)
class Signal:
    """One named entry of a state, input or output vector."""

    name: str
    unit: str
    description: str


STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("dead_cells", "1e6 cells/mL", "dead (not yet lysed) cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than glucose, lactate, glutamine and ammonia"),
    Signal("titer", "g/L", "product (antibody) concentration"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)

INPUTS: tuple[Signal, ...] = (
    Signal("feed_rate", "L/h", "nutrient feed pump rate"),
    Signal("glucose_rate", "L/h", "glucose feed pump rate"),
    Signal("temperature_setpoint", "degC", "culture temperature setpoint"),
)

OUTPUTS: tuple[Signal, ...] = (
    Signal("viability", "%", "viable fraction of all cells"),
    Signal("osmolality", "mOsm/kg", "culture osmolality"),
    Signal("galactosylated_fraction", "-", "quality attribute: galactosylated fraction of the product"),
    Signal("our", "mmol/L/h", "oxygen uptake rate"),
    Signal("cer", "mmol/L/h", "CO2 evolution rate"),
    Signal("capacitance", "pF/cm", "permittivity of the viable biovolume"),
    Signal("base_rate", "L/h", "base addition rate for pH control"),
    Signal("growth_rate", "1/h", "specific growth rate"),
    Signal("death_rate", "1/h", "specific death rate"),
    Signal("glucose_uptake", "g/L/h", "volumetric glucose consumption"),
    Signal("glutamine_uptake", "mM/h", "volumetric glutamine consumption (uptake and degradation)"),
    Signal("lactate_net_production", "g/L/h", "volumetric lactate production minus consumption"),
    Signal("product_formation", "g/L/h", "volumetric product formation"),
)


def _index(signals: tuple[Signal, ...]) -> dict[str, int]:
    return {signal.name: i for i, signal in enumerate(signals)}


STATE_INDEX = _index(STATES)
INPUT_INDEX = _index(INPUTS)
OUTPUT_INDEX = _index(OUTPUTS)
PARAMETER_INDEX = {name: i for i, name in enumerate(PARAMETER_NAMES)}


def smooth_positive(x: Any, eps: float) -> Any:
    """max(x, 0), made differentiable so integrators and NLP solvers see a smooth RHS."""
    return 0.5 * (x + ca.sqrt(x * x + eps * eps))


def logistic_decline(x: Any, half: Any, width: Any) -> Any:
    """1 well below ``half``, 0.5 at ``half``, 0 well above."""
    return 1.0 / (1.0 + ca.exp((x - half) / width))


def _equations(t: Any, x: Any, u: Any, p: Any) -> tuple[Any, Any]:
    """State derivative and algebraic outputs as CasADi expressions."""
    s = {name: x[i] for name, i in STATE_INDEX.items()}
    i = {name: u[k] for name, k in INPUT_INDEX.items()}
    k = {name: p[j] for name, j in PARAMETER_INDEX.items()}

    def par(name: str) -> Any:
        return k[f"culture.{name}"]

    def media(name: str) -> Any:
        return k[f"media.{name}"]

    xv, xd = s["viable_cells"], s["dead_cells"]
    glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
    volume, temperature = s["volume"], s["temperature"]
    feed, glucose_feed = i["feed_rate"], i["glucose_rate"]

    delta_t = temperature - par("temperature.reference_degc")
    age = (t - CORRECTION_AGE_REFERENCE_H) / CORRECTION_AGE_REFERENCE_H

    def correction(rate: str) -> Any:
        """The learned factor of one specific rate (1 with the corrections at zero: CorrectionParameters)."""
        return ca.exp(
            par(f"correction.{rate}_temperature_per_degc") * delta_t + par(f"correction.{rate}_temperature2_per_degc2") * delta_t**2 + par(f"correction.{rate}_age") * age
        )

    osmolality = s["other_osmolytes"] + glc * 1000.0 / GLUCOSE_G_PER_MOL + lac * 1000.0 / LACTATE_G_PER_MOL + gln + amm
    below_reference = par("temperature.reference_degc") - temperature

    # Growth: Monod in both substrates, hyperbolic metabolite inhibition,
    # logistic inhibition by osmolality and by culture age, a temperature
    # optimum (1 at the reference temperature, slower when cold or hot).
    mu = (
        par("growth.mu_max_per_h")
        * ca.exp(
            -par("growth.temperature_curvature_per_degc2")
            * ((temperature - par("growth.temperature_optimum_degc")) ** 2 - (par("temperature.reference_degc") - par("growth.temperature_optimum_degc")) ** 2)
        )
        * glc
        / (par("growth.k_glucose_g_per_l") + glc)
        * gln
        / (par("growth.k_glutamine_mm") + gln)
        * par("growth.ki_lactate_g_per_l")
        / (par("growth.ki_lactate_g_per_l") + lac)
        * par("growth.ki_ammonia_mm")
        / (par("growth.ki_ammonia_mm") + amm)
        * logistic_decline(osmolality, par("growth.osmolality_half_mosm_per_kg"), par("growth.osmolality_width_mosm_per_kg"))
        * logistic_decline(t, par("growth.age_half_h"), par("growth.age_width_h"))
        * correction("growth")
    )

    # Death: basal (slower when cold) plus sigmoidal lactate, ammonia and
    # glucose-starvation terms.
    k_lac_d = par("death.k_lactate_g_per_l")
    k_amm_d = par("death.k_ammonia_mm")
    k_starve = par("death.k_starvation_glucose_g_per_l")
    kd = (
        par("death.kd_min_per_h") * ca.exp(-par("death.temperature_sensitivity_per_degc") * below_reference)
        + par("death.kd_lactate_max_per_h") * lac**2 / (k_lac_d**2 + lac**2)
        + par("death.kd_ammonia_max_per_h") * amm**2 / (k_amm_d**2 + amm**2)
        + par("death.kd_starvation_max_per_h") * k_starve**2 / (k_starve**2 + glc**2)
    ) * correction("death")

    # Metabolism.
    metabolic_temperature = ca.exp(-par("metabolism.temperature_sensitivity_per_degc") * below_reference)
    # The glucose-uptake correction bends both parts of the uptake, and the lactate made from the growth part with it: lactate
    # formed per glucose taken up never exceeds the lactate yield (≤ 1 g/g).
    glucose_uptake_correction = correction("glucose_uptake")
    glucose_for_growth = mu / par("metabolism.yield_cells_per_glucose_1e9_per_g") * glucose_uptake_correction
    q_glucose = (
        glucose_for_growth
        + (par("metabolism.glucose_maintenance_g_per_1e9_cells_h") * metabolic_temperature * glc / (par("metabolism.k_glucose_maintenance_g_per_l") + glc))
        * glucose_uptake_correction
    )
    q_glutamine = mu / par("metabolism.yield_cells_per_glutamine_1e9_per_mmol") + (
        par("metabolism.glutamine_maintenance_mmol_per_1e9_cells_h") * metabolic_temperature * gln / (par("metabolism.k_glutamine_maintenance_mm") + gln)
    )
    q_lactate_production = par("metabolism.lactate_yield_from_glucose_g_per_g") * glucose_for_growth
    k_switch = par("metabolism.k_glucose_lactate_switch_g_per_l")
    q_lactate_uptake = (
        par("metabolism.lactate_uptake_max_g_per_1e9_cells_h") * metabolic_temperature * lac / (par("metabolism.k_lactate_uptake_g_per_l") + lac) * k_switch / (k_switch + glc)
    )
    glutamine_degradation = par("metabolism.glutamine_degradation_per_h") * gln
    r_glucose = q_glucose * xv
    r_glutamine_uptake = q_glutamine * xv
    r_lactate = (q_lactate_production - q_lactate_uptake) * xv
    r_ammonia = par("metabolism.ammonia_yield_from_glutamine_mol_per_mol") * r_glutamine_uptake + glutamine_degradation

    # Product and its quality.
    q_product = (
        par("product.q_product_pg_per_cell_day")
        * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H
        * ca.exp(par("product.temperature_sensitivity_per_degc") * below_reference)
        * glc
        / (par("product.k_glucose_g_per_l") + glc)
        * correction("product")
    )
    r_product = q_product * xv
    k_amm_q = par("product.galactosylation_ki_ammonia_mm")
    new_galactosylated_fraction = (
        par("product.galactosylated_max_fraction")
        * k_amm_q
        / (k_amm_q + amm)
        * logistic_decline(
            osmolality,
            par("product.galactosylation_osmolality_half_mosm_per_kg"),
            par("product.galactosylation_osmolality_width_mosm_per_kg"),
        )
    )

    # pH control: base neutralises the lactic acid formed (never removes any).
    base_rate = par("measurement.base_per_lactate_mol_per_mol") * smooth_positive(r_lactate, SMOOTH_POSITIVE_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / media("base_mol_per_l")

    strength = media("nutrient_feed_strength")
    inflow = feed + glucose_feed + base_rate
    dilution = inflow / volume

    dx: list[Any] = [None] * len(STATES)
    dx[STATE_INDEX["viable_cells"]] = (mu - kd - dilution) * xv
    dx[STATE_INDEX["dead_cells"]] = kd * xv - (par("death.lysis_per_h") + dilution) * xd
    dx[STATE_INDEX["glucose"]] = (feed * strength * media("nutrient_feed_glucose_g_per_l") + glucose_feed * media("glucose_feed_g_per_l")) / volume - dilution * glc - r_glucose
    dx[STATE_INDEX["glutamine"]] = feed * strength * media("nutrient_feed_glutamine_mm") / volume - dilution * gln - r_glutamine_uptake - glutamine_degradation
    dx[STATE_INDEX["lactate"]] = r_lactate - dilution * lac
    dx[STATE_INDEX["ammonia"]] = r_ammonia - dilution * amm
    dx[STATE_INDEX["other_osmolytes"]] = (
        feed * strength * media("nutrient_feed_other_osmolytes_mosm_per_kg") + base_rate * media("base_mol_per_l") * media("base_osmoles_per_mol") * 1000.0
    ) / volume - dilution * s["other_osmolytes"]
    dx[STATE_INDEX["titer"]] = r_product - dilution * s["titer"]
    dx[STATE_INDEX["galactosylated_titer"]] = new_galactosylated_fraction * r_product - dilution * s["galactosylated_titer"]
    dx[STATE_INDEX["volume"]] = inflow
    dx[STATE_INDEX["temperature"]] = (i["temperature_setpoint"] - temperature) / par("temperature.lag_h")
    dx[STATE_INDEX["base_added"]] = base_rate

    q_o2 = par("measurement.o2_per_growth_mmol_per_1e9_cells") * mu + (par("measurement.o2_maintenance_mmol_per_1e9_cells_h") * metabolic_temperature)
    our = q_o2 * xv
    y: list[Any] = [None] * len(OUTPUTS)
    y[OUTPUT_INDEX["viability"]] = 100.0 * xv / (xv + xd)
    y[OUTPUT_INDEX["osmolality"]] = osmolality
    y[OUTPUT_INDEX["galactosylated_fraction"]] = s["galactosylated_titer"] / ca.fmax(s["titer"], 1e-9)
    y[OUTPUT_INDEX["our"]] = our
    y[OUTPUT_INDEX["cer"]] = par("measurement.respiratory_quotient") * our
    y[OUTPUT_INDEX["capacitance"]] = par("measurement.capacitance_pf_per_cm_per_1e6_cells_ml") * xv
    y[OUTPUT_INDEX["base_rate"]] = base_rate
    y[OUTPUT_INDEX["growth_rate"]] = mu
    y[OUTPUT_INDEX["death_rate"]] = kd
    y[OUTPUT_INDEX["glucose_uptake"]] = r_glucose
    y[OUTPUT_INDEX["glutamine_uptake"]] = r_glutamine_uptake + glutamine_degradation
    y[OUTPUT_INDEX["lactate_net_production"]] = r_lactate
    y[OUTPUT_INDEX["product_formation"]] = r_product
    return ca.vertcat(*dx), ca.vertcat(*y)


def rk4(rhs: Any, t: Any, x: Any, u: Any, p: Any, dt: Any, substeps: int = 1) -> tuple[Any, Any]:
    """``substeps`` classic RK4 steps of ``rhs(t, x, u, p)`` over ``dt`` with inputs held: ``(t + dt, x_next)``."""
    h = dt / substeps if substeps != 1 else dt
    tk, xk = t, x
    for _ in range(substeps):
        k1 = rhs(tk, xk, u, p)
        k2 = rhs(tk + h / 2, xk + h / 2 * k1, u, p)
        k3 = rhs(tk + h / 2, xk + h / 2 * k2, u, p)
        k4 = rhs(tk + h, xk + h * k3, u, p)
        xk = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tk = tk + h
    return tk, xk


@dataclass(frozen=True)
class CultureModel:
    """The culture model as CasADi functions with named, unit-carrying signals.

    ``rhs(t, x, u, p) -> dx/dt`` and ``outputs(t, x, u, p) -> y`` accept
    numbers, SX or MX, so the same functions serve simulation, estimation and
    optimal control.
    """

    states: tuple[Signal, ...] = STATES
    inputs: tuple[Signal, ...] = INPUTS
    outputs_spec: tuple[Signal, ...] = OUTPUTS
    parameter_names: tuple[str, ...] = PARAMETER_NAMES

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_parameters(self) -> int:
        return len(self.parameter_names)

    @cached_property
    def _symbolic(self) -> tuple[ca.SX, ca.SX, ca.SX, ca.SX, ca.SX, ca.SX]:
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.n_states)
        u = ca.SX.sym("u", self.n_inputs)
        p = ca.SX.sym("p", self.n_parameters)
        dx, y = _equations(t, x, u, p)
        return t, x, u, p, dx, y

    @cached_property
    def rhs(self) -> ca.Function:
        t, x, u, p, dx, _ = self._symbolic
        return ca.Function("cho_rhs", [t, x, u, p], [dx], ["t", "x", "u", "p"], ["dx"])

    @cached_property
    def outputs(self) -> ca.Function:
        t, x, u, p, _, y = self._symbolic
        return ca.Function("cho_outputs", [t, x, u, p], [y], ["t", "x", "u", "p"], ["y"])

    def state_index(self, name: str) -> int:
        return STATE_INDEX[name]

    def input_index(self, name: str) -> int:
        return INPUT_INDEX[name]

    def output_index(self, name: str) -> int:
        return OUTPUT_INDEX[name]

    def rk4(self, t: Any, x: Any, u: Any, p: Any, dt: Any, substeps: int = 1) -> tuple[Any, Any]:
        """``substeps`` classic RK4 steps over ``dt`` with inputs held, on symbols (SX or MX) or numbers: ``(t + dt, x_next)``."""
        return rk4(self.rhs, t, x, u, p, dt, substeps)

    def rk4_step(self, dt_h: float, substeps: int = 1) -> ca.Function:
        """A fixed-step RK4 map ``(t, x, u, p) -> (t + dt, x_next)`` with inputs held constant."""
        t, x, u, p = ca.SX.sym("t"), ca.SX.sym("x", self.n_states), ca.SX.sym("u", self.n_inputs), ca.SX.sym("p", self.n_parameters)
        tk, xk = self.rk4(t, x, u, p, dt_h, substeps)
        return ca.Function("cho_rk4", [t, x, u, p], [tk, xk], ["t", "x", "u", "p"], ["t_next", "x_next"])
