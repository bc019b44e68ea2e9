"""A CHO plant whose cells die by delayed apoptosis, triggered by nutrient limitation and by osmolality, with a bistable lactate switch and a lagging cold adaptation.

Written on 7 Dec 2026 as a **held-out** plant: after the controller's settings
had been fixed, with parameter values chosen only so that the platform recipe
gives a plausible batch (docs/plants.md §7 and §11), never by how a controller does on it.

Structure (after the segregated models of normal and apoptotic CHO cells of
Naderi et al. 2011 and Meshram et al. 2013, the apoptosis that nutrient
deprivation induces in CHO (Zanghi et al. 1999; Krampe & Al-Rubeai 2010;
Grilo & Mantalaris 2019); the hyperosmotic response of CHO, slower growth
with higher specific productivity (Kim & Lee 2002; Alhuthali et al. 2021);
the multiplicity of glycolytic states and the switch to lactate consumption
(Europa et al. 2000; Mulukutla et al. 2012, 2015; Hartley et al. 2018); the
delay of apoptosis by mild hypothermia (Moore et al. 1997) and the
cold-shock response that takes about a day (Al-Fageeh & Smales 2006)), and what
differs from ``plant_models.cho``:

- death is **apoptotic and delayed**: stress (glucose or amino-acid
  limitation, osmolality above what the cells are adapted to) builds an
  apoptotic signal with a lag of a day; the signal moves healthy cells into
  an **early-apoptotic** class, whose membranes are still intact, so the cell
  counter and the viability count them as viable; they stop dividing, make
  and respire less, and die some twenty hours later. The viability a
  controller sees falls a day or two after the stress that caused it. There
  is no culture-age term: growth ends when the feed no longer covers the
  amino acids (glutamine, the batch file's proxy) and osmolality slows it;
- **osmolality acts continuously from the medium's own level**: it raises
  specific productivity (saturating), slows growth and adds apoptotic stress.
  The feeds are hyperosmotic, so feeding more both nourishes and stresses;
- the **lactate switch is bistable**: a fraction of the cells is in a
  high-glycolytic-flux state that turns part of its glucose into lactate;
  the rest consume lactate. Cells leave that state when their glucose uptake
  falls (slower growth, cold, low glucose) or lactate is high, and a positive
  feedback makes each state self-sustaining, so the switch has a memory
  (hysteresis): raising glucose again does not bring lactate production back
  unless uptake rises well past the threshold;
- **temperature acts on growth and apoptosis through an adapted temperature**
  that follows the culture temperature with a lag of 18 h: a shift slows
  growth and delays apoptosis only after a day; there is **no cold gain of
  specific productivity** (the shift pays through longer-lived cells);
- the galactosylated fraction of new product **falls with specific
  productivity** (less time in the Golgi per molecule), not with ammonia;
- OUR and capacitance per viable cell fall as the early-apoptotic fraction
  rises (apoptotic cells respire less and have shrunk).

Equations, parameter tables and the behaviour under the platform recipe are in
``docs/plants.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import casadi as ca
import numpy as np
from pydantic import Field

from controller.config import BatchConfig
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H, Signal, smooth_positive
from plant_models.config_loading import FrozenConfig
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_G_PER_L_H = 1e-4
_SMOOTH_EPS_MOSM_PER_KG = 1.0
_O2_PER_LACTATE_MOL_PER_MOL = 3.0
_INOCULUM_HIGH_FLUX_FRACTION = 1.0
"""Seed cultures grow exponentially: every inoculated cell is in the high-glycolytic-flux state."""


class ApoptosisGrowth(FrozenConfig):
    """Division rate of healthy cells (early-apoptotic cells do not divide)."""

    mu_max_per_h: float = Field(default=0.045, gt=0.0, le=0.2, description="maximum division rate of healthy cells at the reference temperature [1/h]")
    q10: float = Field(default=4.0, ge=1.0, description="division rate ratio per 10 °C of the adapted temperature [-]")
    k_glucose_g_per_l: float = Field(default=0.15, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for glutamine (the feed's amino acids) [mM]")
    ki_lactate_g_per_l: float = Field(default=7.0, gt=0.0, description="lactate that halves division [g/L]")
    ki_ammonia_mm: float = Field(default=10.0, gt=0.0, description="ammonia that halves division [mM]")


class ApoptosisOsmotic(FrozenConfig):
    """The cells' response to osmolality above the level they are adapted to: slower growth, higher productivity, apoptotic stress."""

    adapted_mosm_per_kg: float = Field(
        default=300.0, ge=250.0, le=400.0, description="osmolality the cells are adapted to (the seed medium's); only the excess above it acts [mOsm/kg]"
    )
    growth_half_excess_mosm_per_kg: float = Field(default=150.0, gt=0.0, description="excess osmolality that halves division (Hill 2) [mOsm/kg]")
    productivity_gain: float = Field(default=1.0, ge=0.0, le=3.0, description="relative gain of specific productivity at a large excess osmolality [-]")
    productivity_half_excess_mosm_per_kg: float = Field(default=120.0, gt=0.0, description="excess osmolality at half the productivity gain [mOsm/kg]")
    excess_per_unit_stress_mosm_per_kg: float = Field(
        default=200.0, gt=0.0, description="excess osmolality that adds one unit of apoptotic stress (as much as glucose exhaustion) [mOsm/kg]"
    )


class ApoptosisDeath(FrozenConfig):
    """Apoptotic stress, the signal that lags it, induction of early apoptosis, progression to death, lysis."""

    stress_basal: float = Field(default=0.1, ge=0.0, description="apoptotic stress of a fed culture at the adapted osmolality [-]")
    k_glucose_stress_g_per_l: float = Field(default=0.3, gt=0.0, description="glucose at which its limitation gives half a unit of stress (Hill 2) [g/L]")
    glutamine_stress_weight: float = Field(default=0.5, ge=0.0, description="stress of glutamine (amino-acid) exhaustion relative to glucose exhaustion [-]")
    k_glutamine_stress_mm: float = Field(default=0.2, gt=0.0, description="glutamine at which its limitation gives half its stress (Hill 2) [mM]")
    signal_lag_h: float = Field(default=24.0, gt=0.0, le=96.0, description="time constant of the apoptotic signal following the stress [h]")
    induction_max_per_h: float = Field(
        default=0.012, ge=0.0, description="rate at which healthy cells turn early-apoptotic at a saturating signal and the reference temperature [1/h]"
    )
    signal_half: float = Field(default=0.8, gt=0.0, description="signal at half the maximum induction rate (Hill 2) [-]")
    induction_q10: float = Field(default=3.0, ge=1.0, description="induction rate ratio per 10 °C of the adapted temperature [-]")
    progression_per_h: float = Field(default=0.05, gt=0.0, description="rate at which early-apoptotic cells lose membrane integrity (die) at the reference temperature [1/h]")
    progression_q10: float = Field(default=2.0, ge=1.0, description="progression rate ratio per 10 °C of the culture temperature [-]")
    lysis_per_h: float = Field(default=0.006, ge=0.0, description="first-order lysis of dead cells [1/h]")


class ApoptosisMetabolism(FrozenConfig):
    """Glucose and glutamine uptake, ammonia, and the bistable glycolytic switch that decides whether lactate is made or consumed."""

    yield_cells_per_glucose_1e9_per_g: float = Field(default=1.5, gt=0.0, description="cells formed per g glucose for division [1e9 cells/g]")
    glucose_maintenance_g_per_1e9_cells_h: float = Field(
        default=0.004, ge=0.0, description="non-growth glucose uptake of healthy cells at the reference temperature [g/(1e9 cells·h)]"
    )
    k_glucose_uptake_g_per_l: float = Field(default=0.15, gt=0.0, description="Monod constant of glucose uptake [g/L]")
    yield_cells_per_glutamine_1e9_per_mmol: float = Field(default=3.0, gt=0.0, description="cells formed per mmol glutamine [1e9 cells/mmol]")
    glutamine_maintenance_mmol_per_1e9_cells_h: float = Field(
        default=0.002, ge=0.0, description="non-growth glutamine uptake of healthy cells at the reference temperature [mmol/(1e9 cells·h)]"
    )
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of maintenance glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    apoptotic_uptake_ratio: float = Field(default=0.5, ge=0.0, le=1.0, description="maintenance uptake and lactate consumption of early-apoptotic relative to healthy cells [-]")
    q10: float = Field(default=2.0, ge=1.0, description="maintenance and lactate uptake ratio per 10 °C of the culture temperature [-]")
    lactate_per_glucose_g_per_g: float = Field(default=0.4, ge=0.0, le=1.0, description="lactate made per g glucose taken up by cells in the high-flux state [g/g]")
    lactate_uptake_max_g_per_1e9_cells_h: float = Field(
        default=0.005, ge=0.0, description="lactate consumption of cells in the low-flux state at saturating lactate and the reference temperature [g/(1e9 cells·h)]"
    )
    k_lactate_uptake_g_per_l: float = Field(default=1.0, gt=0.0, description="Monod constant of lactate consumption [g/L]")
    switch_glucose_uptake_g_per_1e9_cells_h: float = Field(
        default=0.011,
        gt=0.0,
        description="glucose uptake of healthy cells that gives a glycolytic drive of 1 (the switch's middle) before the glucose and lactate factors [g/(1e9 cells·h)]",
    )
    switch_k_glucose_g_per_l: float = Field(default=1.0, gt=0.0, description="glucose at which the glucose factor of the glycolytic drive is ½ [g/L]")
    switch_k_lactate_g_per_l: float = Field(default=4.0, gt=0.0, description="lactate at which its feedback factor on the glycolytic drive is ½ [g/L]")
    switch_width: float = Field(default=0.15, gt=0.0, description="width of the switch in glycolytic drive [-]")
    switch_feedback: float = Field(default=8.0, ge=0.0, le=12.0, description="self-reinforcement of the glycolytic state; above 4 the switch is bistable [-]")
    switch_lag_h: float = Field(default=12.0, gt=0.0, description="time constant of the high-flux fraction following its target [h]")


class ApoptosisProduct(FrozenConfig):
    """Specific productivity (no temperature factor; raised by osmolality), and galactosylation that falls with it."""

    q_product_pg_per_cell_day: float = Field(default=22.0, ge=0.0, le=200.0, description="productivity of healthy cells at the adapted osmolality [pg/(cell·day)]")
    apoptotic_ratio: float = Field(default=0.4, ge=0.0, le=1.0, description="productivity of early-apoptotic relative to healthy cells [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses [g/L]")
    galactosylated_max_fraction: float = Field(default=0.85, ge=0.0, le=1.0, description="galactosylated fraction of new product at vanishing specific productivity [-]")
    galactosylation_half_productivity_pg_per_cell_day: float = Field(
        default=60.0, gt=0.0, description="specific productivity of healthy cells at which the galactosylated fraction of new product is halved [pg/(cell·day)]"
    )


class ApoptosisMeasurement(FrozenConfig):
    """Off-gas, base and capacitance; early-apoptotic cells respire less and read smaller."""

    o2_per_growth_mmol_per_1e9_cells: float = Field(default=2.7, ge=0.0, description="oxygen per cell formed [mmol/1e9 cells]")
    o2_maintenance_mmol_per_1e9_cells_h: float = Field(
        default=0.12, ge=0.0, description="maintenance oxygen uptake of healthy cells at the reference temperature [mmol/(1e9 cells·h)]"
    )
    apoptotic_o2_ratio: float = Field(default=0.5, ge=0.0, le=1.0, description="maintenance respiration of early-apoptotic relative to healthy cells [-]")
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per healthy viable cell density [pF/cm per 1e6 cells/mL]")
    apoptotic_capacitance_ratio: float = Field(default=0.6, ge=0.0, le=1.0, description="permittivity of an early-apoptotic (shrunken) cell relative to a healthy one [-]")


class ApoptosisMedium(FrozenConfig):
    """What the batch file does not say about the inoculum."""

    inoculum_apoptotic_fraction: float = Field(default=0.03, ge=0.0, lt=1.0, description="early-apoptotic fraction of the inoculum's viable cells [-]")


class ApoptosisTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 factor is 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")
    adaptation_lag_h: float = Field(default=18.0, gt=0.0, le=96.0, description="time constant of the cells' adapted temperature following the culture temperature [h]")


class ApoptosisKinetics(FrozenConfig):
    """All parameters of the apoptosis plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: ApoptosisGrowth = ApoptosisGrowth()
    osmotic: ApoptosisOsmotic = ApoptosisOsmotic()
    death: ApoptosisDeath = ApoptosisDeath()
    metabolism: ApoptosisMetabolism = ApoptosisMetabolism()
    product: ApoptosisProduct = ApoptosisProduct()
    measurement: ApoptosisMeasurement = ApoptosisMeasurement()
    medium: ApoptosisMedium = ApoptosisMedium()
    temperature: ApoptosisTemperature = ApoptosisTemperature()


def osmolality_of(other_osmolytes: Any, glucose: Any, lactate: Any, glutamine: Any, ammonia: Any) -> Any:
    """Culture osmolality [mOsm/kg] from the other osmolytes and the tracked solutes, one osmole per mole."""
    return other_osmolytes + glucose * 1000.0 / GLUCOSE_G_PER_MOL + lactate * 1000.0 / LACTATE_G_PER_MOL + glutamine + ammonia


def apoptotic_stress(glucose: Any, glutamine: Any, osmolality: Any, death: Mapping[str, Any], osmotic: Mapping[str, Any]) -> Any:
    """The stress the apoptotic signal follows: basal, glucose and amino-acid limitation (Hill 2), and the excess osmolality (numbers or CasADi).

    ``death`` and ``osmotic`` hold the :class:`ApoptosisDeath` and :class:`ApoptosisOsmotic` fields by name.
    """
    k_glucose, k_glutamine = death["k_glucose_stress_g_per_l"], death["k_glutamine_stress_mm"]
    excess = smooth_positive(osmolality - osmotic["adapted_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)
    return (
        death["stress_basal"]
        + k_glucose**2 / (k_glucose**2 + glucose**2)
        + death["glutamine_stress_weight"] * k_glutamine**2 / (k_glutamine**2 + glutamine**2)
        + excess / osmotic["excess_per_unit_stress_mosm_per_kg"]
    )


def high_flux_target(drive: Any, high_flux_fraction: Any, width: Any, feedback: Any) -> Any:
    """Fraction of cells the high-glycolytic-flux state tends to: a logistic in the drive (½ at 1), shifted by the fraction already there (the feedback that makes the switch bistable)."""
    return 1.0 / (1.0 + ca.exp(-((drive - 1.0) / width + feedback * (high_flux_fraction - 0.5))))


_STATES: tuple[Signal, ...] = (
    Signal("healthy_cells", "1e6 cells/mL", "viable cells without apoptotic commitment: they divide"),
    Signal("apoptotic_cells", "1e6 cells/mL", "early-apoptotic cells: committed, membranes still intact (counted viable), not dividing"),
    Signal("dead_cells", "1e6 cells/mL", "dead (late-apoptotic, membrane-permeable), not yet lysed, cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine (the feed's amino acids, lumped)"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("apoptotic_signal", "-", "the cells' apoptotic signal (caspase activation), which follows the stress with a lag"),
    Signal("high_flux_fraction", "-", "fraction of the cells in the high-glycolytic-flux, lactate-producing state"),
    Signal("adapted_temperature", "degC", "the temperature the cells' growth and apoptosis machinery has adapted to"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)


class ApoptosisPlant(KineticsPlant[ApoptosisKinetics]):
    """Delayed apoptosis from nutrient limitation and osmolality, productivity raised by osmolality, a bistable lactate switch, lagging cold adaptation."""

    name = "apoptosis"
    description = (
        "delayed apoptosis (healthy, early-apoptotic still counted viable, dead) from nutrient limitation and osmolality, bistable lactate switch, osmolality raises productivity"
    )
    states = _STATES
    kinetics_type = ApoptosisKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        inoculum = batch.inoculation
        kinetics = self.kinetics
        viable = inoculum.viable_cell_density_1e6_per_ml
        apoptotic = kinetics.medium.inoculum_apoptotic_fraction
        x = self.inoculated_state(batch)
        index = self.state_index
        x[index("healthy_cells")] = viable * (1.0 - apoptotic)
        x[index("apoptotic_cells")] = viable * apoptotic
        osmolality = osmolality_of(x[index("other_osmolytes")], inoculum.glucose_g_per_l, inoculum.lactate_g_per_l, inoculum.glutamine_mm, inoculum.ammonia_mm)
        stress = apoptotic_stress(inoculum.glucose_g_per_l, inoculum.glutamine_mm, osmolality, kinetics.death.model_dump(), kinetics.osmotic.model_dump())
        x[index("apoptotic_signal")] = float(stress)
        x[index("high_flux_fraction")] = _INOCULUM_HIGH_FLUX_FRACTION
        x[index("adapted_temperature")] = inoculum.temperature_degc
        return x

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        healthy, apoptotic, dead = s["healthy_cells"], s["apoptotic_cells"], s["dead_cells"]
        viable = healthy + apoptotic
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        signal, high_flux, adapted = s["apoptotic_signal"], s["high_flux_fraction"], s["adapted_temperature"]
        volume, temperature = s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]

        osmolality = osmolality_of(s["other_osmolytes"], glc, lac, gln, amm)
        excess_osmolality = smooth_positive(osmolality - k["osmotic.adapted_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)

        mu = (
            k["growth.mu_max_per_h"]
            * q10_factor(k["growth.q10"], adapted, reference)
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * gln
            / (k["growth.k_glutamine_mm"] + gln)
            * k["growth.ki_lactate_g_per_l"]
            / (k["growth.ki_lactate_g_per_l"] + lac)
            * k["growth.ki_ammonia_mm"]
            / (k["growth.ki_ammonia_mm"] + amm)
            / (1.0 + (excess_osmolality / k["osmotic.growth_half_excess_mosm_per_kg"]) ** 2)
        )

        # Apoptosis: stress -> lagging signal -> induction (healthy -> early apoptotic) -> progression (-> dead).
        stress = apoptotic_stress(
            glc,
            gln,
            osmolality,
            {name.removeprefix("death."): value for name, value in k.items() if name.startswith("death.")},
            {name.removeprefix("osmotic."): value for name, value in k.items() if name.startswith("osmotic.")},
        )
        half = k["death.signal_half"]
        induction = k["death.induction_max_per_h"] * q10_factor(k["death.induction_q10"], adapted, reference) * signal**2 / (half**2 + signal**2)
        progression = k["death.progression_per_h"] * q10_factor(k["death.progression_q10"], temperature, reference)

        metabolic = q10_factor(k["metabolism.q10"], temperature, reference)
        apoptotic_ratio = k["metabolism.apoptotic_uptake_ratio"]
        glucose_uptake_factor = glc / (k["metabolism.k_glucose_uptake_g_per_l"] + glc)
        glucose_maintenance = k["metabolism.glucose_maintenance_g_per_1e9_cells_h"] * metabolic * glucose_uptake_factor
        q_glucose_healthy = mu / k["metabolism.yield_cells_per_glucose_1e9_per_g"] * glucose_uptake_factor + glucose_maintenance
        r_glucose = q_glucose_healthy * healthy + apoptotic_ratio * glucose_maintenance * apoptotic

        glutamine_maintenance = k["metabolism.glutamine_maintenance_mmol_per_1e9_cells_h"] * metabolic * gln / (k["metabolism.k_glutamine_uptake_mm"] + gln)
        r_glutamine = (mu / k["metabolism.yield_cells_per_glutamine_1e9_per_mmol"] + glutamine_maintenance) * healthy + apoptotic_ratio * glutamine_maintenance * apoptotic
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln

        # The glycolytic switch: driven by the healthy cells' glucose uptake, the glucose level and (against it) lactate.
        k_drive_lactate = k["metabolism.switch_k_lactate_g_per_l"]
        drive = (
            q_glucose_healthy
            / k["metabolism.switch_glucose_uptake_g_per_1e9_cells_h"]
            * glc
            / (k["metabolism.switch_k_glucose_g_per_l"] + glc)
            * k_drive_lactate
            / (k_drive_lactate + lac)
        )
        target = high_flux_target(drive, high_flux, k["metabolism.switch_width"], k["metabolism.switch_feedback"])
        lactate_uptake = k["metabolism.lactate_uptake_max_g_per_1e9_cells_h"] * metabolic * lac / (k["metabolism.k_lactate_uptake_g_per_l"] + lac)
        lactate_consumed = (1.0 - high_flux) * lactate_uptake * (healthy + apoptotic_ratio * apoptotic)
        r_lactate = high_flux * k["metabolism.lactate_per_glucose_g_per_g"] * r_glucose - lactate_consumed

        q_product_pg = k["product.q_product_pg_per_cell_day"] * (
            1.0 + k["osmotic.productivity_gain"] * excess_osmolality / (k["osmotic.productivity_half_excess_mosm_per_kg"] + excess_osmolality)
        )
        r_product = q_product_pg * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H * glc / (k["product.k_glucose_g_per_l"] + glc) * (healthy + k["product.apoptotic_ratio"] * apoptotic)
        new_galactosylated = k["product.galactosylated_max_fraction"] / (1.0 + q_product_pg / k["product.galactosylation_half_productivity_pg_per_cell_day"])

        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume

        dx = [
            (mu - induction - dilution) * healthy,
            induction * healthy - (progression + dilution) * apoptotic,
            progression * apoptotic - (k["death.lysis_per_h"] + dilution) * dead,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            k["metabolism.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation - dilution * amm,
            (stress - signal) / k["death.signal_lag_h"],
            (target - high_flux) / k["metabolism.switch_lag_h"],
            (temperature - adapted) / k["temperature.adaptation_lag_h"],
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            r_product - dilution * s["titer"],
            new_galactosylated * r_product - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        o2_maintenance = k["measurement.o2_maintenance_mmol_per_1e9_cells_h"] * metabolic
        our = (
            (k["measurement.o2_per_growth_mmol_per_1e9_cells"] * mu + o2_maintenance) * healthy
            + k["measurement.apoptotic_o2_ratio"] * o2_maintenance * apoptotic
            + _O2_PER_LACTATE_MOL_PER_MOL * lactate_consumed * 1000.0 / LACTATE_G_PER_MOL
        )
        observed = {
            "viable_cells": viable,
            "viability": 100.0 * viable / (viable + dead),
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
            "cer": k["measurement.respiratory_quotient"] * our,
            "capacitance": k["measurement.capacitance_pf_per_cm_per_1e6_cells_ml"] * (healthy + k["measurement.apoptotic_capacitance_ratio"] * apoptotic),
        }
        return dx, observed
