"""A CHO plant that tracks asparagine and glutamate, fixes ammonia by glutamine synthetase and switches its lactate metabolism by phase.

Structure (after the amino-acid-resolved CHO models of Kontoravdi et al. 2010
and Kyriakopoulos & Kontoravdi 2014, the amino-acid uptake data of
Carrillo-Cocom et al. 2015, the Luedeking–Piret product kinetics fitted to
CHO by López-Meza et al. 2016 and the lactate shift of Mulukutla et al. 2012
and Zagari et al. 2013), and what differs from ``plant_models.cho``:

- growth needs **asparagine**, which neither the batch record, the lab nor
  the controller's model knows; the nutrient feed carries it, so the feed's
  asparagine (a plant parameter) ends growth rather than a culture-age term;
- glutamine can be replaced by **glutamate plus ammonia** (glutamine
  synthetase, as in GS-CHO lines), so ammonia is *consumed* once glutamine
  runs out;
- lactate production and consumption are switched by a **metabolic phase**
  state that follows the growth rate with a lag of a day, not by the glucose
  concentration: lactate is consumed at the 4 g/L glucose target;
- productivity is growth-associated (Luedeking–Piret) with Q10 temperature
  factors: a shift to 33 °C **lowers** the specific productivity instead of
  raising it;
- new product is galactosylated less when glutamine, the amide donor of the
  hexosamine pathway (Jedrzejewski et al. 2014), is exhausted.

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
from plant_models.errors import ConfigError
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_G_PER_L_H = 1e-4


class AminoAcidGrowth(FrozenConfig):
    """Specific growth rate: Monod in glucose, asparagine and nitrogen (glutamine + glutamate), metabolite and osmotic inhibition, Q10 in temperature."""

    mu_max_per_h: float = Field(default=0.046, gt=0.0, le=0.2, description="maximum specific growth rate at the reference temperature [1/h]")
    k_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="Monod constant for glucose [g/L]")
    k_asparagine_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for asparagine [mM]")
    k_nitrogen_mm: float = Field(default=0.4, gt=0.0, description="Monod constant for glutamine plus glutamate [mM]")
    ki_lactate_g_per_l: float = Field(default=6.0, gt=0.0, description="lactate that halves growth [g/L]")
    ki_ammonia_mm: float = Field(default=9.0, gt=0.0, description="ammonia that halves growth [mM]")
    osmolality_half_mosm_per_kg: float = Field(default=460.0, gt=200.0, description="osmolality that halves growth [mOsm/kg]")
    osmolality_width_mosm_per_kg: float = Field(default=25.0, gt=0.0, description="width of the osmotic inhibition [mOsm/kg]")
    q10: float = Field(default=3.0, ge=1.0, description="growth rate ratio per 10 °C [-]")


class AminoAcidDeath(FrozenConfig):
    """Specific death rate: basal (Q10), ammonia, and starvation of asparagine or glucose."""

    kd_min_per_h: float = Field(default=0.0008, ge=0.0, description="basal death rate at the reference temperature [1/h]")
    q10: float = Field(default=2.0, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    kd_ammonia_max_per_h: float = Field(default=0.006, ge=0.0, description="maximum ammonia-induced death rate [1/h]")
    k_ammonia_mm: float = Field(default=15.0, gt=0.0, description="ammonia at half the maximum ammonia-induced death [mM]")
    kd_asparagine_starvation_max_per_h: float = Field(default=0.003, ge=0.0, description="death rate without asparagine [1/h]")
    k_asparagine_starvation_mm: float = Field(default=0.1, gt=0.0, description="asparagine below which amino-acid starvation death sets in [mM]")
    kd_glucose_starvation_max_per_h: float = Field(default=0.03, ge=0.0, description="death rate without glucose [1/h]")
    k_glucose_starvation_g_per_l: float = Field(default=0.2, gt=0.0, description="glucose below which starvation death sets in [g/L]")
    lysis_per_h: float = Field(default=0.006, ge=0.0, description="first-order lysis of dead cells [1/h]")


class AminoAcidMetabolism(FrozenConfig):
    """Uptake of glucose, glutamine, glutamate and asparagine; glutamine synthetase; the phase-switched lactate metabolism."""

    yield_cells_per_glucose_1e9_per_g: float = Field(default=1.4, gt=0.0, description="cells formed per g glucose for growth [1e9 cells/g]")
    glucose_maintenance_g_per_1e9_cells_h: float = Field(default=0.0045, ge=0.0, description="non-growth glucose uptake [g/(1e9 cells·h)]")
    k_glucose_uptake_g_per_l: float = Field(default=0.15, gt=0.0, description="Monod constant of glucose uptake [g/L]")
    yield_cells_per_nitrogen_1e9_per_mmol: float = Field(default=3.0, gt=0.0, description="cells formed per mmol glutamine (or glutamate + NH4 via GS) [1e9 cells/mmol]")
    k_glutamine_preference_mm: float = Field(default=0.5, gt=0.0, description="glutamine at which half the growth nitrogen comes from glutamine, the rest via GS [mM]")
    k_glutamate_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of glutamate uptake for GS [mM]")
    k_ammonia_gs_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of ammonia fixation by GS [mM]")
    glutamine_catabolism_mmol_per_1e9_cells_h: float = Field(default=0.0015, ge=0.0, description="glutaminolysis beyond growth [mmol/(1e9 cells·h)]")
    k_glutamine_catabolism_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of glutaminolysis [mM]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.5, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    glutamate_per_glutamine_mol_per_mol: float = Field(default=0.15, ge=0.0, le=1.0, description="glutamate secreted per glutamine taken up [mol/mol]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine cyclisation to pyroglutamate + NH4 [1/h]")
    yield_cells_per_asparagine_1e9_per_mmol: float = Field(default=8.0, gt=0.0, description="cells formed per mmol asparagine [1e9 cells/mmol]")
    asparagine_catabolism_mmol_per_1e9_cells_h: float = Field(default=0.003, ge=0.0, description="asparagine catabolised (asparaginase → aspartate → TCA) [mmol/(1e9 cells·h)]")
    k_asparagine_catabolism_mm: float = Field(default=0.5, gt=0.0, description="Monod constant of asparagine catabolism [mM]")
    ammonia_per_asparagine_mol_per_mol: float = Field(default=0.8, ge=0.0, le=2.0, description="ammonia released per asparagine catabolised [mol/mol]")
    lactate_yield_glycolytic_g_per_g: float = Field(default=0.36, ge=0.0, le=1.0, description="lactate per g glucose taken up in the glycolytic phase [g/g]")
    lactate_uptake_max_g_per_1e9_cells_h: float = Field(default=0.0045, ge=0.0, description="lactate consumption in the oxidative phase [g/(1e9 cells·h)]")
    k_lactate_uptake_g_per_l: float = Field(default=0.6, gt=0.0, description="Monod constant of lactate consumption [g/L]")
    phase_switch_growth_rate_per_h: float = Field(default=0.014, gt=0.0, description="growth rate below which cells turn oxidative [1/h]")
    phase_switch_width_per_h: float = Field(default=0.003, gt=0.0, description="width of the phase switch in growth rate [1/h]")
    phase_lag_h: float = Field(default=24.0, gt=0.0, description="time constant of the metabolic phase following its target [h]")
    q10: float = Field(default=2.0, ge=1.0, description="maintenance, catabolism and lactate uptake ratio per 10 °C [-]")


class AminoAcidProduct(FrozenConfig):
    """Luedeking–Piret productivity and the glutamine- and ammonia-dependent galactosylation of new product."""

    growth_associated_pg_per_cell: float = Field(default=18.0, ge=0.0, description="product formed per new cell (Luedeking–Piret α) [pg/cell]")
    non_growth_pg_per_cell_day: float = Field(default=28.0, ge=0.0, description="non-growth-associated productivity at the reference temperature (β) [pg/(cell·day)]")
    q10: float = Field(default=2.0, ge=1.0, description="non-growth productivity ratio per 10 °C [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses [g/L]")
    galactosylated_max_fraction: float = Field(default=0.72, gt=0.0, le=1.0, description="galactosylated fraction of new product without stress [-]")
    galactosylation_ki_ammonia_mm: float = Field(default=18.0, gt=0.0, description="ammonia that halves galactosylation of new product [mM]")
    galactosylation_k_glutamine_mm: float = Field(default=0.15, gt=0.0, description="glutamine at which galactosylation of new product is halved by UDP-GlcNAc shortage [mM]")


class AminoAcidMeasurement(FrozenConfig):
    """Off-gas, base and capacitance links."""

    o2_per_growth_mmol_per_1e9_cells: float = Field(default=2.7, ge=0.0, description="oxygen per cell formed [mmol/1e9 cells]")
    o2_maintenance_mmol_per_1e9_cells_h: float = Field(default=0.10, ge=0.0, description="maintenance oxygen uptake at the reference temperature [mmol/(1e9 cells·h)]")
    respiratory_quotient: float = Field(default=1.0, gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per viable cell density [pF/cm per 1e6 cells/mL]")


class AminoAcidMedium(FrozenConfig):
    """What the batch file does not say: the basal medium's and the nutrient feed's amino acids beyond glutamine."""

    asparagine_initial_mm: float = Field(default=4.0, ge=0.0, description="asparagine after inoculation [mM]")
    glutamate_initial_mm: float = Field(default=1.0, ge=0.0, description="glutamate after inoculation [mM]")
    feed_asparagine_mm: float = Field(default=12.0, ge=0.0, description="asparagine in the nutrient feed at strength 1 [mM]")
    feed_glutamate_mm: float = Field(default=15.0, ge=0.0, description="glutamate in the nutrient feed at strength 1 [mM]")


class AminoAcidTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 factor is 1 [°C]")
    lag_h: float = Field(default=2.5, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class AminoAcidKinetics(FrozenConfig):
    """All parameters of the amino-acid plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: AminoAcidGrowth = AminoAcidGrowth()
    death: AminoAcidDeath = AminoAcidDeath()
    metabolism: AminoAcidMetabolism = AminoAcidMetabolism()
    product: AminoAcidProduct = AminoAcidProduct()
    measurement: AminoAcidMeasurement = AminoAcidMeasurement()
    medium: AminoAcidMedium = AminoAcidMedium()
    temperature: AminoAcidTemperature = AminoAcidTemperature()


_STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("dead_cells", "1e6 cells/mL", "dead, not yet lysed, cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("glutamate", "mM", "glutamate"),
    Signal("asparagine", "mM", "asparagine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("metabolic_phase", "-", "0 glycolytic (lactate-producing) … 1 oxidative (lactate-consuming)"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)


class AminoAcidPlant(KineticsPlant[AminoAcidKinetics]):
    """Asparagine-limited, GS-type nitrogen metabolism, phase-switched lactate, Luedeking–Piret product that falls with temperature."""

    name = "amino_acid"
    description = "asparagine and glutamate tracked, ammonia fixed by glutamine synthetase, lactate switched by metabolic phase, Luedeking–Piret productivity"
    states = _STATES
    kinetics_type = AminoAcidKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        inoculum = batch.inoculation
        medium = self.kinetics.medium
        x = self.inoculated_state(batch)
        index = self.state_index
        x[index("viable_cells")] = inoculum.viable_cell_density_1e6_per_ml
        x[index("glutamate")] = medium.glutamate_initial_mm
        x[index("asparagine")] = medium.asparagine_initial_mm
        x[index("metabolic_phase")] = 0.0
        other = inoculum.other_osmolytes_mosm_per_kg - medium.glutamate_initial_mm - medium.asparagine_initial_mm
        if other < 0.0:
            raise ConfigError(
                f"inoculation.osmolality_mosm_per_kg: {inoculum.osmolality_mosm_per_kg} leaves {other:.0f} mOsm/kg for other osmolytes "
                f"after the asparagine and glutamate of plant {self.name!r}'s medium; expected a higher osmolality or a leaner medium"
            )
        x[index("other_osmolytes")] = other
        return x

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        xv, xd = s["viable_cells"], s["dead_cells"]
        glc, gln, glu, asn = s["glucose"], s["glutamine"], s["glutamate"], s["asparagine"]
        lac, amm, phase = s["lactate"], s["ammonia"], s["metabolic_phase"]
        volume, temperature = s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]

        osmolality = s["other_osmolytes"] + glc * 1000.0 / GLUCOSE_G_PER_MOL + lac * 1000.0 / LACTATE_G_PER_MOL + gln + glu + asn + amm

        mu = (
            k["growth.mu_max_per_h"]
            * q10_factor(k["growth.q10"], temperature, reference)
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * asn
            / (k["growth.k_asparagine_mm"] + asn)
            * (gln + glu)
            / (k["growth.k_nitrogen_mm"] + gln + glu)
            * k["growth.ki_lactate_g_per_l"]
            / (k["growth.ki_lactate_g_per_l"] + lac)
            * k["growth.ki_ammonia_mm"]
            / (k["growth.ki_ammonia_mm"] + amm)
            * logistic_decline(osmolality, k["growth.osmolality_half_mosm_per_kg"], k["growth.osmolality_width_mosm_per_kg"])
        )

        k_asn_starve = k["death.k_asparagine_starvation_mm"]
        k_glc_starve = k["death.k_glucose_starvation_g_per_l"]
        k_amm_death = k["death.k_ammonia_mm"]
        kd = (
            k["death.kd_min_per_h"] * q10_factor(k["death.q10"], temperature, reference)
            + k["death.kd_ammonia_max_per_h"] * amm**2 / (k_amm_death**2 + amm**2)
            + k["death.kd_asparagine_starvation_max_per_h"] * k_asn_starve**2 / (k_asn_starve**2 + asn**2)
            + k["death.kd_glucose_starvation_max_per_h"] * k_glc_starve**2 / (k_glc_starve**2 + glc**2)
        )

        metabolic = q10_factor(k["metabolism.q10"], temperature, reference)
        q_glucose = mu / k["metabolism.yield_cells_per_glucose_1e9_per_g"] + k["metabolism.glucose_maintenance_g_per_1e9_cells_h"] * metabolic * glc / (
            k["metabolism.k_glucose_uptake_g_per_l"] + glc
        )
        # Nitrogen for growth: glutamine first; the rest by glutamine synthetase from glutamate and ammonia.
        nitrogen_for_growth = mu / k["metabolism.yield_cells_per_nitrogen_1e9_per_mmol"]
        from_glutamine = gln / (k["metabolism.k_glutamine_preference_mm"] + gln)
        q_gs = nitrogen_for_growth * (1.0 - from_glutamine) * glu / (k["metabolism.k_glutamate_mm"] + glu) * amm / (k["metabolism.k_ammonia_gs_mm"] + amm)
        q_glutamine = nitrogen_for_growth * from_glutamine + k["metabolism.glutamine_catabolism_mmol_per_1e9_cells_h"] * metabolic * gln / (
            k["metabolism.k_glutamine_catabolism_mm"] + gln
        )
        q_asparagine_catabolism = k["metabolism.asparagine_catabolism_mmol_per_1e9_cells_h"] * metabolic * asn / (k["metabolism.k_asparagine_catabolism_mm"] + asn)
        q_asparagine = mu / k["metabolism.yield_cells_per_asparagine_1e9_per_mmol"] + q_asparagine_catabolism
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln

        # Lactate: produced from all glucose taken up while glycolytic, consumed while oxidative.
        phase_target = logistic_decline(mu, k["metabolism.phase_switch_growth_rate_per_h"], k["metabolism.phase_switch_width_per_h"])
        q_lactate_production = (1.0 - phase) * k["metabolism.lactate_yield_glycolytic_g_per_g"] * q_glucose
        q_lactate_uptake = phase * k["metabolism.lactate_uptake_max_g_per_1e9_cells_h"] * metabolic * lac / (k["metabolism.k_lactate_uptake_g_per_l"] + lac)

        r_glucose = q_glucose * xv
        r_lactate = (q_lactate_production - q_lactate_uptake) * xv
        r_ammonia = (
            k["metabolism.ammonia_per_glutamine_mol_per_mol"] * q_glutamine + k["metabolism.ammonia_per_asparagine_mol_per_mol"] * q_asparagine_catabolism - q_gs
        ) * xv + glutamine_degradation
        r_glutamate = (k["metabolism.glutamate_per_glutamine_mol_per_mol"] * q_glutamine - q_gs) * xv

        q_product = (
            (
                k["product.growth_associated_pg_per_cell"] * 1e-3 * mu
                + k["product.non_growth_pg_per_cell_day"] * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H * q10_factor(k["product.q10"], temperature, reference)
            )
            * glc
            / (k["product.k_glucose_g_per_l"] + glc)
        )
        r_product = q_product * xv
        k_gal_amm = k["product.galactosylation_ki_ammonia_mm"]
        new_galactosylated = k["product.galactosylated_max_fraction"] * k_gal_amm / (k_gal_amm + amm) * gln / (k["product.galactosylation_k_glutamine_mm"] + gln)

        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume

        dx = [
            (mu - kd - dilution) * xv,
            kd * xv - (k["death.lysis_per_h"] + dilution) * xd,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - q_glutamine * xv - glutamine_degradation,
            feed * strength * k["medium.feed_glutamate_mm"] / volume - dilution * glu + r_glutamate,
            feed * strength * k["medium.feed_asparagine_mm"] / volume - dilution * asn - q_asparagine * xv,
            r_lactate - dilution * lac,
            r_ammonia - dilution * amm,
            (phase_target - phase) / k["metabolism.phase_lag_h"],
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            r_product - dilution * s["titer"],
            new_galactosylated * r_product - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        lactate_oxidised_mmol = q_lactate_uptake * 1000.0 / LACTATE_G_PER_MOL
        q_o2 = (
            k["measurement.o2_per_growth_mmol_per_1e9_cells"] * mu
            + k["measurement.o2_maintenance_mmol_per_1e9_cells_h"] * metabolic
            + 3.0 * lactate_oxidised_mmol  # C3H5O3- + 3 O2 -> 3 CO2: the oxidative phase breathes more per cell
        )
        our = q_o2 * xv
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
            "cer": k["measurement.respiratory_quotient"] * our,
            "capacitance": k["measurement.capacitance_pf_per_cm_per_1e6_cells_ml"] * xv,
        }
        return dx, observed
