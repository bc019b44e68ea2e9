"""A CHO plant segregated into cycling and G0/G1-arrested cells, with a temperature optimum of productivity that the cells reach only after days.

Structure (after the cell-cycle models with temperature-dependent arrest of
Garcia Münzer et al. 2015, the hypothermic G0/G1 arrest of CHO reviewed by
Kumar et al. 2007 and used by Fox et al. 2004 to optimise the shift, and
Lloyd et al. 1999/2000 on productivity along the cycle), and what differs from
``plant_models.cho``:

- two viable populations: **cycling** cells divide; **arrested** cells do not.
  Cells arrest when cold (a switch around 34.3 °C, not a smooth exponential),
  when nutrients run short and when the culture is crowded; warm, fed,
  uncrowded arrested cells re-enter the cycle. Growth ends by arrest, not by a
  culture-age term, and a shift to 33 °C stops growth within a day or two;
- lactate is made by cycling cells and consumed by arrested ones, so the
  lactate shift follows the population, not the glucose concentration;
- the per-cell **secretory capacity** is a state that follows a bell-shaped
  temperature optimum (34.5 °C) with a lag of a day and a half: at 33 °C the
  cells make barely more than at 36.5 °C, at 31 °C much less — where the
  controller's model promises 1.6× at 33 °C and 2.1× at 31 °C;
- arrested cells make more product per cell than cycling ones, respire less,
  and die more slowly.

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
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H, Signal, logistic_decline, smooth_positive
from plant_models.config_loading import FrozenConfig
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_G_PER_L_H = 1e-4


class CellCycleGrowth(FrozenConfig):
    """Division rate of cycling cells."""

    mu_max_per_h: float = Field(default=0.05, gt=0.0, le=0.2, description="maximum division rate of cycling cells at the reference temperature [1/h]")
    q10: float = Field(default=2.0, ge=1.0, description="division rate ratio per 10 °C [-]")
    k_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for glutamine [mM]")
    ki_lactate_g_per_l: float = Field(default=6.0, gt=0.0, description="lactate that halves division [g/L]")
    ki_ammonia_mm: float = Field(default=10.0, gt=0.0, description="ammonia that halves division [mM]")
    osmolality_half_mosm_per_kg: float = Field(default=470.0, gt=200.0, description="osmolality that halves division [mOsm/kg]")
    osmolality_width_mosm_per_kg: float = Field(default=20.0, gt=0.0, description="width of the osmotic inhibition [mOsm/kg]")


class CellCycleArrest(FrozenConfig):
    """Transitions between the cycling and the arrested population."""

    basal_per_h: float = Field(default=0.002, ge=0.0, description="arrest rate of a warm, fed, uncrowded culture [1/h]")
    cold_max_per_h: float = Field(default=0.02, ge=0.0, description="additional arrest rate well below the cold-arrest temperature [1/h]")
    cold_half_degc: float = Field(default=34.3, ge=28.0, le=38.0, description="temperature at which half the cold-arrest rate applies [°C]")
    cold_width_degc: float = Field(default=0.5, gt=0.0, description="width of the cold-arrest switch [°C]")
    starvation_max_per_h: float = Field(default=0.03, ge=0.0, description="additional arrest rate without glucose or glutamine [1/h]")
    crowding_max_per_h: float = Field(default=0.02, ge=0.0, description="additional arrest rate in a crowded culture [1/h]")
    crowding_half_1e6_per_ml: float = Field(default=16.0, gt=0.0, description="viable cell density at half the crowding arrest rate [1e6 cells/mL]")
    crowding_hill: float = Field(default=3.0, ge=1.0, description="Hill exponent of crowding arrest [-]")
    release_max_per_h: float = Field(default=0.01, ge=0.0, description="return of arrested cells to the cycle when warm, fed and uncrowded [1/h]")
    inoculum_arrested_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="arrested fraction of the viable inoculum [-]")


class CellCycleDeath(FrozenConfig):
    """Death of cycling cells; arrested cells die at a fraction of that rate."""

    kd_min_per_h: float = Field(default=0.0009, ge=0.0, description="basal death rate of cycling cells at the reference temperature [1/h]")
    q10: float = Field(default=2.5, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    kd_lactate_max_per_h: float = Field(default=0.003, ge=0.0, description="maximum lactate-induced death rate [1/h]")
    k_lactate_g_per_l: float = Field(default=6.0, gt=0.0, description="lactate at half the lactate-induced death [g/L]")
    kd_ammonia_max_per_h: float = Field(default=0.01, ge=0.0, description="maximum ammonia-induced death rate [1/h]")
    k_ammonia_mm: float = Field(default=14.0, gt=0.0, description="ammonia at half the ammonia-induced death [mM]")
    kd_starvation_max_per_h: float = Field(default=0.03, ge=0.0, description="death rate without glucose [1/h]")
    k_starvation_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="glucose below which starvation death sets in [g/L]")
    kd_amino_acid_starvation_max_per_h: float = Field(default=0.004, ge=0.0, description="death rate without glutamine, the feed's amino-acid proxy [1/h]")
    k_amino_acid_starvation_mm: float = Field(default=0.1, gt=0.0, description="glutamine below which amino-acid starvation death sets in [mM]")
    arrested_ratio: float = Field(default=0.6, ge=0.0, le=1.0, description="death rate of arrested relative to cycling cells [-]")
    lysis_per_h: float = Field(default=0.006, ge=0.0, description="first-order lysis of dead cells [1/h]")


class CellCycleMetabolism(FrozenConfig):
    """Uptake by each population; lactate made by cycling and consumed by arrested cells."""

    yield_cells_per_glucose_1e9_per_g: float = Field(default=1.5, gt=0.0, description="cells formed per g glucose for division [1e9 cells/g]")
    glucose_maintenance_g_per_1e9_cells_h: float = Field(default=0.005, ge=0.0, description="non-growth glucose uptake of cycling cells [g/(1e9 cells·h)]")
    k_glucose_uptake_g_per_l: float = Field(default=0.15, gt=0.0, description="Monod constant of maintenance glucose uptake [g/L]")
    yield_cells_per_glutamine_1e9_per_mmol: float = Field(default=3.0, gt=0.0, description="cells formed per mmol glutamine [1e9 cells/mmol]")
    glutamine_maintenance_mmol_per_1e9_cells_h: float = Field(default=0.002, ge=0.0, description="non-growth glutamine uptake of cycling cells [mmol/(1e9 cells·h)]")
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of maintenance glutamine uptake [mM]")
    arrested_maintenance_ratio: float = Field(default=0.8, ge=0.0, description="maintenance uptake of arrested relative to cycling cells [-]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    lactate_yield_from_glucose_g_per_g: float = Field(default=0.4, ge=0.0, le=1.0, description="lactate per g of division-associated glucose [g/g]")
    lactate_uptake_max_g_per_1e9_cells_h: float = Field(default=0.005, ge=0.0, description="lactate consumption of arrested cells [g/(1e9 cells·h)]")
    k_lactate_uptake_g_per_l: float = Field(default=1.0, gt=0.0, description="Monod constant of lactate consumption [g/L]")
    q10: float = Field(default=2.0, ge=1.0, description="maintenance and lactate uptake ratio per 10 °C [-]")


class CellCycleProduct(FrozenConfig):
    """Productivity: secretory capacity with a temperature optimum and a lag; arrested cells produce more."""

    q_product_pg_per_cell_day: float = Field(
        default=27.0, ge=0.0, le=200.0, description="productivity of a cycling cell at full capacity at the reference temperature [pg/(cell·day)]"
    )
    arrested_ratio: float = Field(default=1.4, ge=0.0, description="productivity of arrested relative to cycling cells [-]")
    temperature_optimum_degc: float = Field(default=34.5, ge=28.0, le=38.0, description="temperature of the highest secretory capacity [°C]")
    temperature_curvature_per_degc2: float = Field(default=0.08, ge=0.0, description="capacity target exp(-c((T-Topt)^2-(Tref-Topt)^2)) [1/°C²]")
    capacity_lag_h: float = Field(default=36.0, gt=0.0, description="time constant of the secretory capacity following its target [h]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses [g/L]")
    k_glutamine_mm: float = Field(default=0.2, gt=0.0, description="glutamine (amino-acid proxy) that halves productivity [mM]")
    galactosylated_max_fraction: float = Field(default=0.74, gt=0.0, le=1.0, description="galactosylated fraction of new product without stress [-]")
    galactosylation_ki_ammonia_mm: float = Field(default=20.0, gt=0.0, description="ammonia that halves galactosylation of new product [mM]")


class CellCycleMeasurement(FrozenConfig):
    """Off-gas, base and capacitance links; respiration differs by population."""

    o2_per_growth_mmol_per_1e9_cells: float = Field(default=2.7, ge=0.0, description="oxygen per cell formed [mmol/1e9 cells]")
    o2_maintenance_mmol_per_1e9_cells_h: float = Field(
        default=0.12, ge=0.0, description="maintenance oxygen uptake of cycling cells at the reference temperature [mmol/(1e9 cells·h)]"
    )
    arrested_o2_ratio: float = Field(default=0.65, ge=0.0, description="maintenance respiration of arrested relative to cycling cells [-]")
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per viable cell density [pF/cm per 1e6 cells/mL]")


class CellCycleTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which the Q10 factors and the capacity target are 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class CellCycleKinetics(FrozenConfig):
    """All parameters of the cell-cycle plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: CellCycleGrowth = CellCycleGrowth()
    arrest: CellCycleArrest = CellCycleArrest()
    death: CellCycleDeath = CellCycleDeath()
    metabolism: CellCycleMetabolism = CellCycleMetabolism()
    product: CellCycleProduct = CellCycleProduct()
    measurement: CellCycleMeasurement = CellCycleMeasurement()
    temperature: CellCycleTemperature = CellCycleTemperature()


def capacity_target(temperature_degc: Any, reference_degc: Any, optimum_degc: Any, curvature_per_degc2: Any) -> Any:
    """Secretory capacity the cells tend to at a temperature: a bell around the optimum, 1 at the reference temperature (numbers or CasADi)."""
    return ca.exp(-curvature_per_degc2 * ((temperature_degc - optimum_degc) ** 2 - (reference_degc - optimum_degc) ** 2))


_STATES: tuple[Signal, ...] = (
    Signal("cycling_cells", "1e6 cells/mL", "viable cells in the division cycle (G1, S, G2/M)"),
    Signal("arrested_cells", "1e6 cells/mL", "viable cells arrested in G0/G1"),
    Signal("dead_cells", "1e6 cells/mL", "dead, not yet lysed, cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than glucose, lactate, glutamine and ammonia"),
    Signal("secretory_capacity", "-", "per-cell secretory capacity relative to the reference temperature"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)


class CellCyclePlant(KineticsPlant[CellCycleKinetics]):
    """Cycling and arrested populations, cold-induced arrest, a delayed productivity optimum near 34.5 °C."""

    name = "cell_cycle"
    description = "cycling and G0/G1-arrested cells, cold-induced arrest, secretory capacity with a 34.5 °C optimum reached after a lag"
    states = _STATES
    kinetics_type = CellCycleKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        inoculum = batch.inoculation
        arrested = self.kinetics.arrest.inoculum_arrested_fraction
        viable = inoculum.viable_cell_density_1e6_per_ml
        x = self.inoculated_state(batch)
        index = self.state_index
        x[index("cycling_cells")] = viable * (1.0 - arrested)
        x[index("arrested_cells")] = viable * arrested
        product = self.kinetics.product
        x[index("secretory_capacity")] = float(
            capacity_target(inoculum.temperature_degc, self.kinetics.temperature.reference_degc, product.temperature_optimum_degc, product.temperature_curvature_per_degc2)
        )
        return x

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        cycling, arrested, dead = s["cycling_cells"], s["arrested_cells"], s["dead_cells"]
        viable = cycling + arrested
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        capacity, volume, temperature = s["secretory_capacity"], s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]

        osmolality = s["other_osmolytes"] + glc * 1000.0 / GLUCOSE_G_PER_MOL + lac * 1000.0 / LACTATE_G_PER_MOL + gln + amm
        nutrients = glc / (k["growth.k_glucose_g_per_l"] + glc) * gln / (k["growth.k_glutamine_mm"] + gln)

        division = (
            k["growth.mu_max_per_h"]
            * q10_factor(k["growth.q10"], temperature, reference)
            * nutrients
            * k["growth.ki_lactate_g_per_l"]
            / (k["growth.ki_lactate_g_per_l"] + lac)
            * k["growth.ki_ammonia_mm"]
            / (k["growth.ki_ammonia_mm"] + amm)
            * logistic_decline(osmolality, k["growth.osmolality_half_mosm_per_kg"], k["growth.osmolality_width_mosm_per_kg"])
        )

        cold = logistic_decline(temperature, k["arrest.cold_half_degc"], k["arrest.cold_width_degc"])
        crowding_hill = k["arrest.crowding_hill"]
        crowded = viable**crowding_hill / (k["arrest.crowding_half_1e6_per_ml"] ** crowding_hill + viable**crowding_hill)
        arrest_rate = k["arrest.basal_per_h"] + k["arrest.cold_max_per_h"] * cold + k["arrest.starvation_max_per_h"] * (1.0 - nutrients) + k["arrest.crowding_max_per_h"] * crowded
        release_rate = k["arrest.release_max_per_h"] * (1.0 - cold) * nutrients * (1.0 - crowded)

        k_lac_d, k_amm_d, k_starve = k["death.k_lactate_g_per_l"], k["death.k_ammonia_mm"], k["death.k_starvation_glucose_g_per_l"]
        k_aa_starve = k["death.k_amino_acid_starvation_mm"]
        kd_cycling = (
            k["death.kd_min_per_h"] * q10_factor(k["death.q10"], temperature, reference)
            + k["death.kd_lactate_max_per_h"] * lac**2 / (k_lac_d**2 + lac**2)
            + k["death.kd_ammonia_max_per_h"] * amm**2 / (k_amm_d**2 + amm**2)
            + k["death.kd_starvation_max_per_h"] * k_starve**2 / (k_starve**2 + glc**2)
            + k["death.kd_amino_acid_starvation_max_per_h"] * k_aa_starve**2 / (k_aa_starve**2 + gln**2)
        )
        kd_arrested = k["death.arrested_ratio"] * kd_cycling

        metabolic = q10_factor(k["metabolism.q10"], temperature, reference)
        maintenance_cells = cycling + k["metabolism.arrested_maintenance_ratio"] * arrested
        glucose_for_division = division / k["metabolism.yield_cells_per_glucose_1e9_per_g"]
        r_glucose = (
            glucose_for_division * cycling
            + k["metabolism.glucose_maintenance_g_per_1e9_cells_h"] * metabolic * glc / (k["metabolism.k_glucose_uptake_g_per_l"] + glc) * maintenance_cells
        )
        r_glutamine = (
            division / k["metabolism.yield_cells_per_glutamine_1e9_per_mmol"] * cycling
            + k["metabolism.glutamine_maintenance_mmol_per_1e9_cells_h"] * metabolic * gln / (k["metabolism.k_glutamine_uptake_mm"] + gln) * maintenance_cells
        )
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln
        r_lactate = (
            k["metabolism.lactate_yield_from_glucose_g_per_g"] * glucose_for_division * cycling
            - k["metabolism.lactate_uptake_max_g_per_1e9_cells_h"] * metabolic * lac / (k["metabolism.k_lactate_uptake_g_per_l"] + lac) * arrested
        )
        r_ammonia = k["metabolism.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation

        target = capacity_target(temperature, reference, k["product.temperature_optimum_degc"], k["product.temperature_curvature_per_degc2"])
        producing_cells = cycling + k["product.arrested_ratio"] * arrested
        r_product = (
            k["product.q_product_pg_per_cell_day"]
            * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H
            * capacity
            * glc
            / (k["product.k_glucose_g_per_l"] + glc)
            * gln
            / (k["product.k_glutamine_mm"] + gln)
            * producing_cells
        )
        k_gal_amm = k["product.galactosylation_ki_ammonia_mm"]
        new_galactosylated = k["product.galactosylated_max_fraction"] * k_gal_amm / (k_gal_amm + amm)

        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume

        dx = [
            (division - arrest_rate - kd_cycling - dilution) * cycling + release_rate * arrested,
            arrest_rate * cycling - (release_rate + kd_arrested + dilution) * arrested,
            kd_cycling * cycling + kd_arrested * arrested - (k["death.lysis_per_h"] + dilution) * dead,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            r_ammonia - dilution * amm,
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            (target - capacity) / k["product.capacity_lag_h"],
            r_product - dilution * s["titer"],
            new_galactosylated * r_product - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        maintenance_o2 = k["measurement.o2_maintenance_mmol_per_1e9_cells_h"] * metabolic
        our = (k["measurement.o2_per_growth_mmol_per_1e9_cells"] * division + maintenance_o2) * cycling + k["measurement.arrested_o2_ratio"] * maintenance_o2 * arrested
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
            "capacitance": k["measurement.capacitance_pf_per_cm_per_1e6_cells_ml"] * viable,
        }
        return dx, observed
