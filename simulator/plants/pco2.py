"""A CHO plant at production scale whose dissolved CO2 accumulates, with a bicarbonate pH loop that feeds sodium into the osmolality.

Written on 7 Dec 2026 as a **held-out** plant, blind: no controller, NMPC,
estimator or campaign was run on it while it was written. Parameter values come
from physiology and the literature cited in docs/plants.md §8 and §12.6; the
platform recipe (§11) was run only to check that the batch is plausible.

Structure (after the CO2 accumulation of large-scale CHO cultures, Gray et al.
1996, Mostafa & Gu 2003, Matsunaga et al. 2009; the pCO2 and osmolality
inhibition of animal cells and its synergy, Kimura & Miller 1996, deZengotita
et al. 1998, 2002, Zhu et al. 2005; the rise of osmolality with pCO2 under pH
control, Schmelzer et al. 2000; cold-inducible proteins that raise recombinant
expression, Al-Fageeh & Smales 2006), and what differs from ``plant_models.cho``:

- **dissolved CO2 is a consequence of scale**: respiration (per cell, slower when
  cold) and the lactic acid neutralised by bicarbonate make CO2, stripping removes
  it at ``kLa_CO2 (pCO2 - pCO2_gas)``, and the stripping coefficient **falls as the
  working volume rises** towards the vessel's fill (fixed stripping gas and
  liquid surface for a growing volume). pCO2 is quasi-steady (stripping acts within
  an hour) and is not shown to the controller;
- **a pH loop with sodium bicarbonate**: the medium's bicarbonate is an alkalinity
  state; lactic acid uses it up, CO2 raises the bicarbonate that pH 6.95 needs,
  and the pump adds base when the culture falls short. Base brings sodium and
  bicarbonate, so osmolality **rises with pCO2 as well as with lactate**; when
  lactate is consumed the alkalinity comes back and the pump rests;
- **pCO2 and osmolality inhibit together**: above 75 mmHg and 340 mOsm/kg their
  excesses add into one stress index whose Hill-2 response is worse than the
  product of the separate ones; the stress slows division and, steeply, kills;
  pCO2 alone also lowers specific productivity and (saturating) glycolysis; there
  is no culture-age term;
- **temperature**: growth follows a square-root (Ratkowsky) law; respiration and
  glycolysis Q10 factors; specific productivity rises only through a
  **cold-inducible factor** that accumulates at a rate proportional to the
  degrees below 36 °C and decays with a half-life of two days (+31 % at 33 °C,
  reached over a few days);
- lactate is a **reversible exchange** towards an equilibrium set by the glycolytic
  flux (made while glycolysis is fast, taken back when it slows); glutamine uptake
  is **coupled to glucose uptake**; lactate acts on the cells only through the base
  and osmolality it brings (pH is controlled);
- the **CER the off-gas analyser reads is the CO2 stripped**, which includes the CO2
  set free by neutralised lactic acid, so the apparent respiratory quotient is
  above RQ while lactate is made and below it while lactate is consumed; the
  capacitance rises with osmolality (swollen cells).

Equations, parameter tables and the behaviour under the platform recipe are in
``docs/plants.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import casadi as ca
import numpy as np
from pydantic import Field

from controller.config import BatchConfig
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H, Signal, smooth_positive
from plant_models.config_loading import FrozenConfig
from plant_models.errors import ConfigError
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_MMHG = 1.0
_SMOOTH_EPS_MOSM_PER_KG = 1.0
_SMOOTH_EPS_MM = 0.3
_SMOOTH_EPS_DEGC = 0.1
_SMOOTH_EPS_MM_PER_H = 0.01
_O2_PER_LACTATE_MOL_PER_MOL = 3.0
_CO2_PER_LACTATE_MOL_PER_MOL = 3.0


class Pco2Growth(FrozenConfig):
    """Division: a square-root (Ratkowsky) temperature law, Monod in glucose and glutamine, Hill-2 ammonia, and the pCO2–osmolality stress."""

    mu_max_per_h: float = Field(default=0.042, gt=0.0, le=0.2, description="division rate at the reference temperature without limitation or stress [1/h]")
    temperature_min_degc: float = Field(default=24.0, ge=10.0, le=32.0, description="temperature at which the square-root law reaches zero growth [°C]")
    temperature_max_degc: float = Field(default=42.0, ge=38.5, le=46.0, description="temperature above which growth collapses in the square-root law [°C]")
    high_temperature_decline_per_degc: float = Field(default=1.0, gt=0.0, le=5.0, description="steepness of the collapse towards the maximum temperature [1/°C]")
    k_glucose_g_per_l: float = Field(default=0.1, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.25, gt=0.0, description="Monod constant for glutamine (the feed's amino acids) [mM]")
    ammonia_half_mm: float = Field(default=12.0, gt=0.0, description="ammonia that halves division (Hill 2) [mM]")


class Pco2Stress(FrozenConfig):
    """The cells' response to dissolved CO2 and osmolality: one additive stress index for growth and death; pCO2 alone for productivity and glycolysis."""

    pco2_threshold_mmhg: float = Field(default=75.0, ge=0.0, le=300.0, description="pCO2 above which CO2 acts on the cells [mmHg]")
    pco2_per_unit_mmhg: float = Field(default=160.0, gt=0.0, description="excess pCO2 that adds one unit of stress [mmHg]")
    osmolality_threshold_mosm_per_kg: float = Field(default=340.0, ge=250.0, le=500.0, description="osmolality above which it adds stress [mOsm/kg]")
    osmolality_per_unit_mosm_per_kg: float = Field(default=136.0, gt=0.0, description="excess osmolality that adds one unit of stress [mOsm/kg]")
    productivity_half_excess_mmhg: float = Field(default=120.0, gt=0.0, description="excess pCO2 that halves specific productivity (Hill 2) [mmHg]")
    glycolysis_inhibition_max: float = Field(default=0.5, ge=0.0, lt=1.0, description="largest fractional inhibition of glucose uptake by pCO2 [-]")
    glycolysis_half_excess_mmhg: float = Field(default=20.0, gt=0.0, description="excess pCO2 at half the largest glycolysis inhibition [mmHg]")


class Pco2Death(FrozenConfig):
    """Death: basal (Q10), the stress index (Hill 4), glucose and glutamine starvation (exponential), lysis."""

    basal_per_h: float = Field(default=0.0015, ge=0.0, description="death rate of unstressed, fed cells at the reference temperature [1/h]")
    basal_q10: float = Field(default=2.0, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    stress_max_per_h: float = Field(default=0.05, ge=0.0, description="death rate added at a saturating stress index [1/h]")
    stress_half: float = Field(default=1.5, gt=0.0, description="stress index at half the added death rate (Hill 4) [-]")
    glucose_starvation_per_h: float = Field(default=0.03, ge=0.0, description="death rate added with no glucose [1/h]")
    glucose_starvation_scale_g_per_l: float = Field(default=0.15, gt=0.0, description="glucose at which the starvation term has fallen to 1/e [g/L]")
    glutamine_starvation_per_h: float = Field(default=0.006, ge=0.0, description="death rate added with no glutamine (the feed's amino acids) [1/h]")
    glutamine_starvation_scale_mm: float = Field(default=0.15, gt=0.0, description="glutamine at which its starvation term has fallen to 1/e [mM]")
    lysis_per_h: float = Field(default=0.005, ge=0.0, description="first-order lysis of dead cells [1/h]")


class Pco2Metabolism(FrozenConfig):
    """Glucose uptake (rest plus division, Q10, pCO2-inhibited), glutamine coupled to it, ammonia, and the lactate exchange."""

    glucose_rest_g_per_1e9_cells_h: float = Field(
        default=0.004, ge=0.0, description="glucose uptake of cells that do not divide, at the reference temperature and ample glucose [g/(1e9 cells·h)]"
    )
    glucose_division_g_per_1e9_cells_h: float = Field(
        default=0.012, ge=0.0, description="glucose uptake added by division at the maximum division rate (in proportion below it) [g/(1e9 cells·h)]"
    )
    k_glucose_uptake_g_per_l: float = Field(default=0.3, gt=0.0, description="Monod constant of glucose transport [g/L]")
    q10: float = Field(default=2.0, ge=1.0, description="glucose uptake (glycolysis) ratio per 10 °C [-]")
    glutamine_per_glucose_mol_per_mol: float = Field(default=0.25, ge=0.0, le=2.0, description="glutamine taken up per glucose taken up, at ample glutamine [mol/mol]")
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.8, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    lactate_per_glucose_g_per_g: float = Field(default=0.8, ge=0.0, le=1.0, description="lactate made per glucose taken up when the medium holds no lactate [g/g]")
    lactate_reuptake_l_per_1e9_cells_h: float = Field(
        default=0.0026, ge=0.0, description="lactate taken back per viable cell and per g/L of lactate in the medium [L/(1e9 cells·h)]"
    )


class Pco2Respiration(FrozenConfig):
    """Oxygen uptake and the CO2 it makes; the capacitance probe."""

    o2_rest_mmol_per_1e9_cells_h: float = Field(default=0.10, ge=0.0, description="oxygen uptake of cells that do not divide, at the reference temperature [mmol/(1e9 cells·h)]")
    o2_division_mmol_per_1e9_cells_h: float = Field(
        default=0.10, ge=0.0, description="oxygen uptake added by division at the maximum division rate (in proportion below it) [mmol/(1e9 cells·h)]"
    )
    q10: float = Field(default=2.3, ge=1.0, description="respiration ratio per 10 °C [-]")
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 made per O2 respired [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(
        default=0.9, gt=0.0, description="permittivity per viable cell density at the seed culture's osmolality [pF/cm per 1e6 cells/mL]"
    )
    swelling_per_100_mosm_per_kg: float = Field(
        default=0.1, ge=0.0, le=1.0, description="relative rise of the permittivity per cell per 100 mOsm/kg above the seed culture's osmolality [-]"
    )


class Pco2Stripping(FrozenConfig):
    """CO2 removal by the stripping gas and the headspace, and the CO2 chemistry of the medium."""

    kla_at_full_volume_per_h: float = Field(default=0.6, gt=0.0, le=20.0, description="volumetric CO2 stripping coefficient at the vessel's full working volume [1/h]")
    full_volume_l: float = Field(default=2000.0, gt=0.0, description="the vessel's full working volume, where the stripping coefficient is the one above [L]")
    volume_exponent: float = Field(default=1.0, ge=0.0, le=3.0, description="the stripping coefficient scales as (full volume / volume) to this power [-]")
    gas_pco2_mmhg: float = Field(default=35.0, ge=0.0, le=100.0, description="pCO2 the culture would reach with no CO2 production (inlet gas and headspace) [mmHg]")
    co2_solubility_mm_per_mmhg: float = Field(default=0.031, gt=0.0, description="dissolved CO2 per pCO2 in the medium (Henry) [mM/mmHg]")


class Pco2Ph(FrozenConfig):
    """The pH loop: sodium bicarbonate added when pH falls below its lower limit."""

    base_ph: float = Field(default=6.95, ge=6.5, le=7.5, description="pH below which the loop adds base (setpoint minus deadband) [-]")
    pka: float = Field(default=6.1, ge=5.8, le=6.4, description="apparent pKa of CO2/bicarbonate in the medium [-]")
    loop_lag_h: float = Field(default=2.0, gt=0.0, le=12.0, description="time constant with which the base pump makes up a bicarbonate shortfall [h]")


class Pco2ColdResponse(FrozenConfig):
    """A cold-inducible factor (RBM3/CIRP-like) that builds up below an onset temperature and raises specific productivity."""

    onset_degc: float = Field(default=36.0, ge=30.0, le=38.0, description="temperature below which the factor is induced [°C]")
    induction_per_degc_h: float = Field(default=0.008, ge=0.0, description="induction rate per degree below the onset, on the part not yet induced [1/(°C·h)]")
    decay_per_h: float = Field(default=0.015, gt=0.0, description="first-order decay of the factor [1/h]")


class Pco2Product(FrozenConfig):
    """Specific productivity and the galactosylation of new product."""

    q_product_pg_per_cell_day: float = Field(
        default=22.0, ge=0.0, le=200.0, description="specific productivity at the reference temperature, no cold factor, pCO2 below its threshold [pg/(cell·day)]"
    )
    cold_gain: float = Field(default=0.5, ge=0.0, le=3.0, description="relative gain of specific productivity with the cold-inducible factor fully induced [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses (Monod) [g/L]")
    galactosylated_max_fraction: float = Field(
        default=0.8, ge=0.0, le=1.0, description="galactosylated fraction of new product without ammonia at the seed culture's osmolality [-]"
    )
    galactosylation_ammonia_scale_mm: float = Field(default=40.0, gt=0.0, description="ammonia that lowers the galactosylated fraction of new product by a factor e [mM]")
    galactosylation_osmolality_scale_mosm_per_kg: float = Field(
        default=500.0, gt=0.0, description="osmolality above the seed culture's that lowers the galactosylated fraction of new product by a factor e [mOsm/kg]"
    )


class Pco2Medium(FrozenConfig):
    """What the batch file does not say about the medium and the seed culture."""

    bicarbonate_mm: float = Field(default=18.0, ge=0.0, le=60.0, description="sodium bicarbonate of the basal medium at inoculation [mM]")
    reference_osmolality_mosm_per_kg: float = Field(
        default=300.0, ge=250.0, le=400.0, description="osmolality of the seed culture: the cells' volume and galactosylation are those of this level [mOsm/kg]"
    )
    sensing_lag_h: float = Field(
        default=4.0, gt=0.0, le=24.0, description="time constant with which the cells' response (intracellular pH and what follows) follows the medium's pCO2 [h]"
    )


class Pco2Temperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 and the growth law are 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class Pco2Kinetics(FrozenConfig):
    """All parameters of the pCO2 plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: Pco2Growth = Pco2Growth()
    stress: Pco2Stress = Pco2Stress()
    death: Pco2Death = Pco2Death()
    metabolism: Pco2Metabolism = Pco2Metabolism()
    respiration: Pco2Respiration = Pco2Respiration()
    stripping: Pco2Stripping = Pco2Stripping()
    ph: Pco2Ph = Pco2Ph()
    cold_response: Pco2ColdResponse = Pco2ColdResponse()
    product: Pco2Product = Pco2Product()
    medium: Pco2Medium = Pco2Medium()
    temperature: Pco2Temperature = Pco2Temperature()


def osmolality_of(other_osmolytes: Any, glucose: Any, lactate: Any, glutamine: Any, ammonia: Any, bicarbonate: Any) -> Any:
    """Culture osmolality [mOsm/kg]: the other osmolytes and the tracked solutes, bicarbonate included, one osmole per mole (dissolved CO2 leaves the sample)."""
    return other_osmolytes + glucose * 1000.0 / GLUCOSE_G_PER_MOL + lactate * 1000.0 / LACTATE_G_PER_MOL + glutamine + ammonia + bicarbonate


def square_root_growth_factor(temperature: Any, reference: Any, minimum: Any, maximum: Any, decline: Any) -> Any:
    """Ratkowsky's square-root law, ``[b (T - Tmin)(1 - exp(c (T - Tmax)))]²``, relative to the reference temperature (numbers or CasADi)."""

    def root(t: Any) -> Any:
        return smooth_positive(t - minimum, _SMOOTH_EPS_DEGC) * smooth_positive(1.0 - ca.exp(decline * (t - maximum)), 1e-3)

    return (root(temperature) / root(reference)) ** 2


def stripping_coefficient_per_h(volume_l: Any, kla_full_per_h: Any, full_volume_l: Any, exponent: Any) -> Any:
    """The CO2 stripping coefficient at a working volume: the full-volume value scaled by (full / volume) to a power."""
    return kla_full_per_h * (full_volume_l / volume_l) ** exponent


_STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("dead_cells", "1e6 cells/mL", "dead (not yet lysed) cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine (the feed's amino acids, lumped)"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("bicarbonate", "mM", "bicarbonate (the medium's alkalinity): what the medium brought and the base added, less the lactic acid neutralised"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes (the sodium the base brings included)"),
    Signal("cold_response", "-", "cold-inducible factor, 0 (none) to 1 (fully induced)"),
    Signal("sensed_pco2", "mmHg", "the pCO2 the cells respond to: follows the medium's pCO2 with a lag of hours"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base (sodium bicarbonate) added for pH control since inoculation"),
)

INTERNALS: tuple[Signal, ...] = (
    Signal("pco2", "mmHg", "dissolved CO2 partial pressure (quasi-steady)"),
    Signal("ph", "-", "culture pH from the bicarbonate and the dissolved CO2"),
    Signal("stress_index", "-", "the pCO2 and osmolality stress that slows division and kills"),
    Signal("stripping_coefficient", "1/h", "kLa of CO2 at the present working volume"),
    Signal("base_rate", "L/h", "base pump rate"),
    Signal("co2_production", "mmol/L/h", "CO2 made: respiration and neutralised lactic acid"),
)
"""Quantities of the pCO2 plant that no probe of the PLC shows (for tests and documentation)."""


class Pco2Plant(KineticsPlant[Pco2Kinetics]):
    """Dissolved CO2 that accumulates at scale, a bicarbonate pH loop that raises osmolality, pCO2–osmolality stress, a lagging cold-inducible productivity gain."""

    name = "pco2"
    description = (
        "dissolved CO2 accumulating with cell density and fill volume, a bicarbonate pH loop feeding osmolality, synergistic pCO2-osmolality stress, cold-inducible productivity"
    )
    states = _STATES
    kinetics_type = Pco2Kinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        x = self.inoculated_state(batch)
        index = self.state_index
        bicarbonate = self.kinetics.medium.bicarbonate_mm
        x[index("viable_cells")] = batch.inoculation.viable_cell_density_1e6_per_ml
        x[index("bicarbonate")] = bicarbonate
        x[index("other_osmolytes")] -= bicarbonate
        if x[index("other_osmolytes")] < 0.0:
            raise ConfigError(
                f"inoculation.osmolality_mosm_per_kg: {batch.inoculation.osmolality_mosm_per_kg} cannot hold the tracked solutes and the "
                f"{bicarbonate:g} mM bicarbonate of plant {self.name!r}'s medium; expected a higher osmolality or a leaner medium"
            )
        x[index("cold_response")] = 0.0
        x[index("sensed_pco2")] = self.kinetics.stripping.gas_pco2_mmhg  # a seed culture at the gas's pCO2
        return x

    @cached_property
    def internals(self) -> ca.Function:
        """``(t, x, u, p) -> y`` with the :data:`INTERNALS` in order: what the equations compute but no probe shows."""
        t, x, u, p = ca.SX.sym("t"), ca.SX.sym("x", self.n_states), ca.SX.sym("u", self.n_inputs), ca.SX.sym("p", self.n_parameters)
        _, observed = self.equations(t, x, u, p)
        y = ca.vertcat(*[observed[signal.name] for signal in INTERNALS])
        return ca.Function(f"{self.name}_internals", [t, x, u, p], [y], ["t", "x", "u", "p"], ["y"])

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        xv, xd = s["viable_cells"], s["dead_cells"]
        glc, gln, lac, amm, bicarbonate = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"], s["bicarbonate"]
        volume, temperature, cold, sensed_pco2 = s["volume"], s["temperature"], s["cold_response"], s["sensed_pco2"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]
        mu_max = k["growth.mu_max_per_h"]

        osmolality = osmolality_of(s["other_osmolytes"], glc, lac, gln, amm, bicarbonate)
        osmolality_rise = smooth_positive(osmolality - k["medium.reference_osmolality_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)

        # The stress: excess pCO2 (as the cells sense it) and excess osmolality add; their Hill-2 response makes them synergise.
        excess_pco2 = smooth_positive(sensed_pco2 - k["stress.pco2_threshold_mmhg"], _SMOOTH_EPS_MMHG)
        excess_osmolality = smooth_positive(osmolality - k["stress.osmolality_threshold_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)
        stress = excess_pco2 / k["stress.pco2_per_unit_mmhg"] + excess_osmolality / k["stress.osmolality_per_unit_mosm_per_kg"]

        mu = (
            mu_max
            * square_root_growth_factor(temperature, reference, k["growth.temperature_min_degc"], k["growth.temperature_max_degc"], k["growth.high_temperature_decline_per_degc"])
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * gln
            / (k["growth.k_glutamine_mm"] + gln)
            / (1.0 + (amm / k["growth.ammonia_half_mm"]) ** 2)
            / (1.0 + stress**2)
        )
        stress_half = k["death.stress_half"]
        kd = (
            k["death.basal_per_h"] * q10_factor(k["death.basal_q10"], temperature, reference)
            + k["death.stress_max_per_h"] * stress**4 / (stress_half**4 + stress**4)
            + k["death.glucose_starvation_per_h"] * ca.exp(-glc / k["death.glucose_starvation_scale_g_per_l"])
            + k["death.glutamine_starvation_per_h"] * ca.exp(-gln / k["death.glutamine_starvation_scale_mm"])
        )

        # Glycolysis: rest plus division, glucose transport, Q10, inhibited (saturating) by pCO2; glutamine follows glucose.
        glycolysis_left = 1.0 - k["stress.glycolysis_inhibition_max"] * excess_pco2 / (k["stress.glycolysis_half_excess_mmhg"] + excess_pco2)
        q_glucose = (
            q10_factor(k["metabolism.q10"], temperature, reference)
            * (k["metabolism.glucose_rest_g_per_1e9_cells_h"] + k["metabolism.glucose_division_g_per_1e9_cells_h"] * mu / mu_max)
            * glc
            / (k["metabolism.k_glucose_uptake_g_per_l"] + glc)
            * glycolysis_left
        )
        q_glutamine = k["metabolism.glutamine_per_glucose_mol_per_mol"] * q_glucose * 1000.0 / GLUCOSE_G_PER_MOL * gln / (k["metabolism.k_glutamine_uptake_mm"] + gln)
        r_glucose = q_glucose * xv
        r_glutamine = q_glutamine * xv
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln
        # Lactate: exchange towards the equilibrium the glycolytic flux sets (made while glycolysis is fast, taken back when it slows).
        r_lactate = (k["metabolism.lactate_per_glucose_g_per_g"] * q_glucose - k["metabolism.lactate_reuptake_l_per_1e9_cells_h"] * lac) * xv
        lactic_acid_mm_per_h = r_lactate * 1000.0 / LACTATE_G_PER_MOL
        lactate_oxidised_mm_per_h = smooth_positive(-lactic_acid_mm_per_h, _SMOOTH_EPS_MM_PER_H)

        # Respiration and the CO2 balance: respiration, oxidised lactate and the neutralised lactic acid make CO2, stripping removes it (quasi-steady).
        q_o2 = q10_factor(k["respiration.q10"], temperature, reference) * (
            k["respiration.o2_rest_mmol_per_1e9_cells_h"] + k["respiration.o2_division_mmol_per_1e9_cells_h"] * mu / mu_max
        )
        our = q_o2 * xv + _O2_PER_LACTATE_MOL_PER_MOL * lactate_oxidised_mm_per_h
        co2_production = k["respiration.respiratory_quotient"] * q_o2 * xv + _CO2_PER_LACTATE_MOL_PER_MOL * lactate_oxidised_mm_per_h + lactic_acid_mm_per_h
        kla = stripping_coefficient_per_h(volume, k["stripping.kla_at_full_volume_per_h"], k["stripping.full_volume_l"], k["stripping.volume_exponent"])
        solubility = k["stripping.co2_solubility_mm_per_mmhg"]
        pco2 = k["stripping.gas_pco2_mmhg"] + co2_production / (kla * solubility)

        # The pH loop: the bicarbonate pH base_ph needs at this pCO2; the pump makes up a shortfall with sodium bicarbonate.
        bicarbonate_needed = solubility * pco2 * 10.0 ** (k["ph.base_ph"] - k["ph.pka"])
        base_mm_per_h = smooth_positive(bicarbonate_needed - bicarbonate, _SMOOTH_EPS_MM) / k["ph.loop_lag_h"]
        base_rate = base_mm_per_h * volume / (1000.0 * k["media.base_mol_per_l"])
        ph = k["ph.pka"] + ca.log10(ca.fmax(bicarbonate, 1e-6) / (solubility * pco2))

        q_product = (
            k["product.q_product_pg_per_cell_day"]
            * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H
            * (1.0 + k["product.cold_gain"] * cold)
            * glc
            / (k["product.k_glucose_g_per_l"] + glc)
            / (1.0 + (excess_pco2 / k["stress.productivity_half_excess_mmhg"]) ** 2)
        )
        r_product = q_product * xv
        new_galactosylated = (
            k["product.galactosylated_max_fraction"]
            * ca.exp(-amm / k["product.galactosylation_ammonia_scale_mm"])
            * ca.exp(-osmolality_rise / k["product.galactosylation_osmolality_scale_mosm_per_kg"])
        )

        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume
        below_onset = smooth_positive(k["cold_response.onset_degc"] - temperature, _SMOOTH_EPS_DEGC)

        dx = [
            (mu - kd - dilution) * xv,
            kd * xv - (k["death.lysis_per_h"] + dilution) * xd,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            k["metabolism.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation - dilution * amm,
            base_mm_per_h - lactic_acid_mm_per_h - dilution * bicarbonate,
            feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] / volume + k["media.base_osmoles_per_mol"] * base_mm_per_h - dilution * s["other_osmolytes"],
            k["cold_response.induction_per_degc_h"] * below_onset * (1.0 - cold) - k["cold_response.decay_per_h"] * cold,
            (pco2 - sensed_pco2) / k["medium.sensing_lag_h"],
            r_product - dilution * s["titer"],
            new_galactosylated * r_product - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        observed = {
            "viable_cells": xv,
            "viability": 100.0 * xv / (xv + xd),
            "glucose": glc,
            "glutamine": gln,
            "lactate": lac,
            "ammonia": amm,
            "titer": s["titer"],
            "galactosylated_fraction": s["galactosylated_titer"] / ca.fmax(s["titer"], 1e-9),
            "osmolality": osmolality,
            "volume": volume,
            "temperature": temperature,
            "base_added": s["base_added"],
            "our": our,
            "cer": co2_production,
            "capacitance": k["respiration.capacitance_pf_per_cm_per_1e6_cells_ml"] * xv * (1.0 + k["respiration.swelling_per_100_mosm_per_kg"] * osmolality_rise / 100.0),
            "pco2": pco2,
            "ph": ph,
            "stress_index": stress,
            "stripping_coefficient": kla,
            "base_rate": base_rate,
            "co2_production": co2_production,
        }
        return dx, observed
