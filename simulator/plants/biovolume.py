"""A CHO plant structured by biovolume: cells grow in size when they stop dividing, the probes read biovolume, and proteases clip the product.

Structure (after the dielectric-spectroscopy analyses of Opel et al. 2010 and
Ansorge et al. 2007 and the β-dispersion theory of Davey et al. 1992; the
volume-specific productivity of Lloyd et al. 2000 and Martínez et al. 2015;
the logistic capacity of López-Meza et al. 2016; host-cell proteases and
glycosidases in CHO supernatant after Robert et al. 2009 and Gramer & Goochee
1993), and what differs from ``plant_models.cho``:

- **cell size is a state**: viable biovolume and viable cell number are
  balanced separately. Biomass is made at one rate; cells divide at that rate
  only when warm and uncrowded. Otherwise the biomass goes into larger cells,
  up to a largest mean cell volume, as CHO cells do after a shift to 32–33 °C
  and in the stationary phase;
- growth ends at a **biovolume capacity** (a Hill decline in the viable
  biovolume), not at a culture age: large cells fill it with fewer cells;
- productivity, uptake and respiration are **per unit of biovolume**, not per
  cell: a larger cell makes more; the volume-specific productivity does not
  depend on temperature (Martínez et al. 2015);
- the **capacitance probe** reads the polarisable biovolume weighted by cell
  radius (Schwan's Δε ∝ P·r), including a part of the dead, not yet lysed
  cells: its ratio to the viable cell density rises as the cells grow;
- **proteases and glycosidases** released by lysed cells and secreted by
  viable ones accumulate in the supernatant and clip the product (the titer
  assay reports intact antibody only) and remove galactose from it.

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
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, Signal, logistic_decline, smooth_positive
from plant_models.config_loading import FrozenConfig
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_G_PER_L_H = 1e-4
PG_PER_PL_DAY_TO_G_PER_ML_H = 1e-3 / 24.0
"""pg product per pL of cells per day → g per mL of cells per hour (1 pL = 1e-9 mL, 1 pg = 1e-12 g)."""


class BiovolumeGrowth(FrozenConfig):
    """Biomass synthesis, division and hypertrophy."""

    mu_max_per_h: float = Field(default=0.045, gt=0.0, le=0.2, description="maximum specific biovolume synthesis rate at the reference temperature [1/h]")
    q10: float = Field(default=2.0, ge=1.0, description="synthesis rate ratio per 10 °C [-]")
    k_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for glutamine [mM]")
    ki_lactate_g_per_l: float = Field(default=6.0, gt=0.0, description="lactate that halves synthesis [g/L]")
    ki_ammonia_mm: float = Field(default=10.0, gt=0.0, description="ammonia that halves synthesis [mM]")
    osmolality_half_mosm_per_kg: float = Field(default=470.0, gt=200.0, description="osmolality that halves synthesis [mOsm/kg]")
    osmolality_width_mosm_per_kg: float = Field(default=20.0, gt=0.0, description="width of the osmotic inhibition [mOsm/kg]")
    capacity_half_ul_per_ml: float = Field(default=30.0, gt=0.0, description="viable biovolume at which division is halved [µL/mL]")
    capacity_hill: float = Field(default=4.0, ge=1.0, description="Hill exponent of the biovolume capacity [-]")
    cold_division_block: float = Field(default=0.7, ge=0.0, le=1.0, description="fraction of divisions blocked well below the cold-block temperature [-]")
    cold_half_degc: float = Field(default=34.0, ge=28.0, le=38.0, description="temperature at which half the cold block applies [°C]")
    cold_width_degc: float = Field(default=0.5, gt=0.0, description="width of the cold block [°C]")
    inoculum_cell_volume_pl: float = Field(default=1.45, gt=0.1, description="mean viable cell volume at inoculation (14 µm) [pL]")
    max_cell_volume_pl: float = Field(default=2.6, gt=0.1, description="largest mean viable cell volume (17.1 µm) [pL]")


class BiovolumeDeath(FrozenConfig):
    """Specific death rate, lysis, and what dead cells still show the probe."""

    kd_min_per_h: float = Field(default=0.0008, ge=0.0, description="basal death rate at the reference temperature [1/h]")
    q10: float = Field(default=2.5, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    kd_lactate_max_per_h: float = Field(default=0.003, ge=0.0, description="maximum lactate-induced death rate [1/h]")
    k_lactate_g_per_l: float = Field(default=6.0, gt=0.0, description="lactate at half the lactate-induced death [g/L]")
    kd_ammonia_max_per_h: float = Field(default=0.01, ge=0.0, description="maximum ammonia-induced death rate [1/h]")
    k_ammonia_mm: float = Field(default=14.0, gt=0.0, description="ammonia at half the ammonia-induced death [mM]")
    kd_starvation_max_per_h: float = Field(default=0.03, ge=0.0, description="death rate without glucose [1/h]")
    k_starvation_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="glucose below which starvation death sets in [g/L]")
    lysis_per_h: float = Field(default=0.006, ge=0.0, description="first-order lysis of dead cells [1/h]")
    dead_cell_volume_pl: float = Field(default=1.0, gt=0.0, description="mean volume of a dead, not yet lysed cell [pL]")


class BiovolumeMetabolism(FrozenConfig):
    """Uptake and by-products per mL of viable biovolume (1 mL of cells ≈ 0.69e9 cells of 14 µm)."""

    yield_biovolume_per_glucose_ml_per_g: float = Field(default=2.2, gt=0.0, description="biovolume formed per g glucose [mL/g]")
    glucose_maintenance_g_per_ml_h: float = Field(default=0.0026, ge=0.0, description="non-growth glucose uptake [g/(mL cells·h)]")
    k_glucose_uptake_g_per_l: float = Field(default=0.15, gt=0.0, description="Monod constant of maintenance glucose uptake [g/L]")
    yield_biovolume_per_glutamine_ml_per_mmol: float = Field(default=5.5, gt=0.0, description="biovolume formed per mmol glutamine [mL/mmol]")
    glutamine_maintenance_mmol_per_ml_h: float = Field(default=0.001, ge=0.0, description="non-growth glutamine uptake [mmol/(mL cells·h)]")
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of maintenance glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    lactate_yield_from_glucose_g_per_g: float = Field(default=0.3, ge=0.0, le=1.0, description="lactate per g of growth-associated glucose [g/g]")
    lactate_uptake_max_g_per_ml_h: float = Field(default=0.0035, ge=0.0, description="lactate consumption of non-dividing biovolume [g/(mL cells·h)]")
    k_lactate_uptake_g_per_l: float = Field(default=1.0, gt=0.0, description="Monod constant of lactate consumption [g/L]")
    q10: float = Field(default=2.0, ge=1.0, description="maintenance and lactate uptake ratio per 10 °C [-]")


class BiovolumeProduct(FrozenConfig):
    """Volume-specific productivity, its galactosylation, and degradation in the supernatant."""

    q_product_pg_per_pl_day: float = Field(default=15.0, ge=0.0, description="product per pL of viable cells per day (22 pg/(cell·day) at 1.45 pL) [pg/(pL·day)]")
    q10: float = Field(default=1.0, ge=1.0, description="volume-specific productivity ratio per 10 °C (1: independent of temperature) [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses [g/L]")
    galactosylated_max_fraction: float = Field(default=0.75, gt=0.0, le=1.0, description="galactosylated fraction of new product without stress [-]")
    galactosylation_ki_ammonia_mm: float = Field(default=20.0, gt=0.0, description="ammonia that halves galactosylation of new product [mM]")
    enzyme_per_lysed_cell: float = Field(default=1.0, ge=0.0, description="supernatant enzyme activity released per lysed cell [activity units per 1e6 cells/mL]")
    enzyme_secretion_per_1e6_cells_ml_h: float = Field(default=0.002, ge=0.0, description="enzyme activity secreted by viable cells [units per (1e6 cells/mL · h)]")
    enzyme_half_life_h: float = Field(default=57.0, gt=0.0, description="half-life of the supernatant enzyme activity at any temperature [h]")
    clipping_per_unit_h: float = Field(
        default=0.00025, ge=0.0, description="first-order clipping rate of intact product per unit of enzyme activity at the reference temperature [1/h]"
    )
    degalactosylation_per_unit_h: float = Field(default=0.00005, ge=0.0, description="galactose removal rate per unit of enzyme activity at the reference temperature [1/h]")
    enzyme_q10: float = Field(default=2.0, ge=1.0, description="clipping and galactose removal ratio per 10 °C [-]")


class BiovolumeMeasurement(FrozenConfig):
    """Probe physics: capacitance from radius-weighted biovolume; off-gas and base."""

    capacitance_pf_per_cm_per_ul_ml: float = Field(default=0.62, gt=0.0, description="permittivity per µL/mL of polarisable biovolume of inoculum-sized cells [pF/cm per µL/mL]")
    dead_polarisable_fraction: float = Field(default=0.25, ge=0.0, le=1.0, description="fraction of dead, not yet lysed cells whose membrane still polarises [-]")
    o2_per_biovolume_ml: float = Field(default=1.9, ge=0.0, description="oxygen per mL of biovolume formed [mmol/mL]")
    o2_maintenance_mmol_per_ml_h: float = Field(default=0.08, ge=0.0, description="maintenance oxygen uptake at the reference temperature [mmol/(mL cells·h)]")
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")


class BiovolumeTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 factor is 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class BiovolumeKinetics(FrozenConfig):
    """All parameters of the biovolume plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: BiovolumeGrowth = BiovolumeGrowth()
    death: BiovolumeDeath = BiovolumeDeath()
    metabolism: BiovolumeMetabolism = BiovolumeMetabolism()
    product: BiovolumeProduct = BiovolumeProduct()
    measurement: BiovolumeMeasurement = BiovolumeMeasurement()
    temperature: BiovolumeTemperature = BiovolumeTemperature()


_STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("viable_biovolume", "uL/mL", "volume of viable cells per culture volume (1 µL/mL = 0.1 % v/v)"),
    Signal("dead_cells", "1e6 cells/mL", "dead, not yet lysed, cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than glucose, lactate, glutamine and ammonia"),
    Signal("titer", "g/L", "intact product (what the titer assay reports)"),
    Signal("clipped_product", "g/L", "product clipped by proteases"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the intact product"),
    Signal("enzyme_activity", "units", "protease and glycosidase activity in the supernatant (1 unit: released by lysis of 1e6 cells/mL)"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)


class BiovolumePlant(KineticsPlant[BiovolumeKinetics]):
    """Cell size as a state, biovolume-specific rates and capacity, a radius-weighted capacitance probe, product clipping."""

    name = "biovolume"
    description = "cells enlarge when division stops, per-biovolume rates, capacitance from radius-weighted biovolume, proteases clip the product"
    states = _STATES
    kinetics_type = BiovolumeKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        viable = batch.inoculation.viable_cell_density_1e6_per_ml
        x = self.inoculated_state(batch)
        x[self.state_index("viable_cells")] = viable
        x[self.state_index("viable_biovolume")] = viable * self.kinetics.growth.inoculum_cell_volume_pl
        return x

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        xv, biovolume, xd = s["viable_cells"], s["viable_biovolume"], s["dead_cells"]
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        titer, galactosylated, enzyme = s["titer"], s["galactosylated_titer"], s["enzyme_activity"]
        volume, temperature = s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]

        cell_volume = biovolume / xv  # pL per cell: 1 µL/mL per 1e6 cells/mL
        osmolality = s["other_osmolytes"] + glc * 1000.0 / GLUCOSE_G_PER_MOL + lac * 1000.0 / LACTATE_G_PER_MOL + gln + amm

        synthesis = (
            k["growth.mu_max_per_h"]
            * q10_factor(k["growth.q10"], temperature, reference)
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * gln
            / (k["growth.k_glutamine_mm"] + gln)
            * k["growth.ki_lactate_g_per_l"]
            / (k["growth.ki_lactate_g_per_l"] + lac)
            * k["growth.ki_ammonia_mm"]
            / (k["growth.ki_ammonia_mm"] + amm)
            * logistic_decline(osmolality, k["growth.osmolality_half_mosm_per_kg"], k["growth.osmolality_width_mosm_per_kg"])
        )
        hill = k["growth.capacity_hill"]
        room = 1.0 / (1.0 + (biovolume / k["growth.capacity_half_ul_per_ml"]) ** hill)
        cold_block = k["growth.cold_division_block"] * logistic_decline(temperature, k["growth.cold_half_degc"], k["growth.cold_width_degc"])
        dividing = room * (1.0 - cold_block)
        division = synthesis * dividing
        inoculum_volume, max_volume = k["growth.inoculum_cell_volume_pl"], k["growth.max_cell_volume_pl"]
        enlargement = synthesis * (1.0 - dividing) * (max_volume - cell_volume) / (max_volume - inoculum_volume)

        k_lac_d, k_amm_d, k_starve = k["death.k_lactate_g_per_l"], k["death.k_ammonia_mm"], k["death.k_starvation_glucose_g_per_l"]
        kd = (
            k["death.kd_min_per_h"] * q10_factor(k["death.q10"], temperature, reference)
            + k["death.kd_lactate_max_per_h"] * lac**2 / (k_lac_d**2 + lac**2)
            + k["death.kd_ammonia_max_per_h"] * amm**2 / (k_amm_d**2 + amm**2)
            + k["death.kd_starvation_max_per_h"] * k_starve**2 / (k_starve**2 + glc**2)
        )

        # Rates per mL of cells; Bv [µL/mL] = [mL/L], so a rate per mL of cells times Bv is a rate per litre.
        metabolic = q10_factor(k["metabolism.q10"], temperature, reference)
        biovolume_growth = division + enlargement
        glucose_for_growth = biovolume_growth / k["metabolism.yield_biovolume_per_glucose_ml_per_g"]
        r_glucose = (glucose_for_growth + k["metabolism.glucose_maintenance_g_per_ml_h"] * metabolic * glc / (k["metabolism.k_glucose_uptake_g_per_l"] + glc)) * biovolume
        r_glutamine = (
            biovolume_growth / k["metabolism.yield_biovolume_per_glutamine_ml_per_mmol"]
            + k["metabolism.glutamine_maintenance_mmol_per_ml_h"] * metabolic * gln / (k["metabolism.k_glutamine_uptake_mm"] + gln)
        ) * biovolume
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln
        r_lactate = (
            k["metabolism.lactate_yield_from_glucose_g_per_g"] * glucose_for_growth
            - k["metabolism.lactate_uptake_max_g_per_ml_h"] * metabolic * lac / (k["metabolism.k_lactate_uptake_g_per_l"] + lac) * (1.0 - dividing)
        ) * biovolume
        r_ammonia = k["metabolism.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation

        r_product = (
            k["product.q_product_pg_per_pl_day"]
            * PG_PER_PL_DAY_TO_G_PER_ML_H
            * q10_factor(k["product.q10"], temperature, reference)
            * glc
            / (k["product.k_glucose_g_per_l"] + glc)
            * biovolume
        )
        k_gal_amm = k["product.galactosylation_ki_ammonia_mm"]
        new_galactosylated = k["product.galactosylated_max_fraction"] * k_gal_amm / (k_gal_amm + amm)
        enzyme_temperature = q10_factor(k["product.enzyme_q10"], temperature, reference)
        clipping = k["product.clipping_per_unit_h"] * enzyme_temperature * enzyme
        degalactosylation = k["product.degalactosylation_per_unit_h"] * enzyme_temperature * enzyme
        lysis = k["death.lysis_per_h"] * xd

        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume

        dx = [
            (division - kd - dilution) * xv,
            (biovolume_growth - kd - dilution) * biovolume,
            kd * xv - lysis - dilution * xd,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            r_ammonia - dilution * amm,
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            r_product - (clipping + dilution) * titer,
            clipping * titer - dilution * s["clipped_product"],
            new_galactosylated * r_product - (clipping + degalactosylation + dilution) * galactosylated,
            k["product.enzyme_per_lysed_cell"] * lysis
            + k["product.enzyme_secretion_per_1e6_cells_ml_h"] * xv
            - (np.log(2.0) / k["product.enzyme_half_life_h"] + dilution) * enzyme,
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        # Schwan: the β-dispersion increment is ∝ volume fraction × radius; radius ∝ cell volume^(1/3).
        dead_volume = k["death.dead_cell_volume_pl"]
        polarisable = biovolume * (cell_volume / inoculum_volume) ** (1.0 / 3.0) + k["measurement.dead_polarisable_fraction"] * xd * dead_volume * (
            dead_volume / inoculum_volume
        ) ** (1.0 / 3.0)
        our = (k["measurement.o2_per_biovolume_ml"] * biovolume_growth + k["measurement.o2_maintenance_mmol_per_ml_h"] * metabolic) * biovolume
        observed = {
            "viable_cells": xv,
            "viability": 100.0 * xv / (xv + xd),
            "glucose": glc,
            "glutamine": gln,
            "lactate": lac,
            "ammonia": amm,
            "titer": titer,
            "galactosylated_fraction": galactosylated / ca.fmax(titer, 1e-9),
            "osmolality": osmolality,
            "volume": volume,
            "temperature": temperature,
            "base_added": s["base_added"],
            "our": our,
            "cer": k["measurement.respiratory_quotient"] * our,
            "capacitance": k["measurement.capacitance_pf_per_cm_per_ul_ml"] * polarisable,
        }
        return dx, observed
