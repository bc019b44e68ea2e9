"""A CHO plant in a vessel whose oxygen supply is capped: a DO cascade that runs out of headroom, the Pasteur effect and a lagging hypoxic program.

Written on 8 Dec 2026 as a **held-out** plant, blind: no controller, NMPC,
estimator or campaign was run on it while it was written. Parameter values come
from physiology and the literature cited in docs/plants.md §10 and §12.8; the
platform recipe (§11) was run only to check that the batch is plausible.

Structure (after the oxygen transfer limits of large cell-culture vessels and their
DO cascades, Pappenreiter et al. 2019, Martínez-Monge et al. 2019; the oxygen
dependence of animal-cell respiration and metabolism, Miller et al. 1987, Ozturk &
Palsson 1990; the HIF-1-mediated Pasteur effect and the down-regulation of
mitochondrial oxygen consumption, Seagroves et al. 2001, Papandreou et al. 2006;
hypoxic G1 arrest, Goda et al. 2003; translation under hypoxia, Wouters &
Koritzinsky 2008; low DO lowering glycan processing at scale, Lewis et al. 2016;
bubble damage in sparged vessels, Chisti 2000), and what differs from
``plant_models.cho``:

- **the vessel's oxygen transfer is capped**: a DO cascade (agitation, gas flow,
  oxygen enrichment) holds the dissolved oxygen at its setpoint (40 % of air
  saturation) as long as the culture's oxygen demand is below what the cascade
  can transfer at its top, ``kLa_max (C*_max - DO)``; beyond it the DO falls to
  where transfer meets uptake. The DO is quasi-steady (transfer acts within
  minutes) and not shown to the controller;
- **the OUR the off-gas analyser reads is the oxygen transferred**: it follows the
  cells until the cascade tops out, then stays at the cap however many cells
  there are;
- **the cells take up oxygen with a Michaelis constant of 0.6 % of air saturation**:
  above a few % DO respiration is what the cells want; below it, an **immediate
  Pasteur effect** raises glucose and glutamine uptake and the lactate made per
  glucose, slows division and kills (an energy shortfall); lactate consumption
  needs oxygen;
- **a hypoxic program** (HIF-1 and its targets) is induced within hours at a DO
  below about 5 % of air saturation and lost over a day or two once oxygen
  returns: it raises glycolysis, **lowers the cells' oxygen demand** (PDK1),
  arrests division, lowers specific productivity (translation) and the
  galactosylation of new product, and protects against hypoxic death;
- **the top of the cascade kills**: cell damage by bursting bubbles rises steeply
  with the cascade's load (gas flow) as it approaches its maximum;
- **temperature**: growth, glycolysis, respiration and basal death follow Q10
  laws; oxygen solubility rises 1.3 % per degree colder, so a cold shift lowers
  the demand and raises the cap; specific productivity rises only **3 % per degree**
  colder (×1.1 at 33 °C); no culture-age term (growth ends when the feed's amino
  acids run short or oxygen runs out);
- probes: CER is RQ times the oxygen transferred; capacitance per viable cell is
  constant.

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
from simulator.plants.base import KineticsPlant, q10_factor

_SMOOTH_EPS_G_PER_L_H = 1e-4
_SMOOTH_EPS_MOSM_PER_KG = 1.0
_SMOOTH_EPS_DEGC = 0.2
_DO_SMOOTH_MIN_EXPONENT = 6.0
_AIR_O2_FRACTION = 0.2095
_O2_PER_LACTATE_MOL_PER_MOL = 3.0
"""Lactate oxidised to CO2: 3 O2 per lactate."""


class OxygenTransfer(FrozenConfig):
    """The vessel: the DO setpoint its cascade holds, what the cascade can transfer at its top, and oxygen's solubility."""

    do_setpoint_pct: float = Field(default=40.0, gt=0.0, le=100.0, description="dissolved oxygen the cascade holds while it can [% of air saturation]")
    kla_max_per_h: float = Field(default=6.0, gt=0.0, le=50.0, description="oxygen transfer coefficient at the top of the cascade (agitation and gas flow at their limits) [1/h]")
    max_o2_fraction: float = Field(default=0.6, ge=_AIR_O2_FRACTION, le=1.0, description="largest oxygen fraction of the sparged gas the cascade's enrichment reaches [-]")
    air_saturation_mm: float = Field(default=0.19, gt=0.0, le=0.5, description="dissolved oxygen of medium in equilibrium with air at the reference temperature [mM]")
    solubility_per_degc: float = Field(default=0.013, ge=0.0, le=0.05, description="relative rise of oxygen's solubility per degree below the reference temperature [1/°C]")


class OxygenRespiration(FrozenConfig):
    """The cells' oxygen demand and their affinity for oxygen; the probes."""

    o2_rest_mmol_per_1e9_cells_h: float = Field(default=0.11, ge=0.0, description="oxygen demand of cells that do not divide, at the reference temperature [mmol/(1e9 cells·h)]")
    o2_division_mmol_per_1e9_cells_h: float = Field(
        default=0.10, ge=0.0, description="oxygen demand added by division at the maximum division rate (in proportion below it) [mmol/(1e9 cells·h)]"
    )
    q10: float = Field(default=2.3, ge=1.0, description="oxygen demand ratio per 10 °C [-]")
    k_oxygen_pct: float = Field(default=0.6, gt=0.0, le=10.0, description="dissolved oxygen at which the cells respire half their demand (Michaelis) [% of air saturation]")
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 made per O2 respired [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per viable cell density [pF/cm per 1e6 cells/mL]")


class OxygenGrowth(FrozenConfig):
    """Division: Q10, Monod in glucose and glutamine, ammonia, osmolality, the oxygen supply and the hypoxic program's arrest."""

    mu_max_per_h: float = Field(default=0.035, gt=0.0, le=0.2, description="division rate at the reference temperature without limitation [1/h]")
    q10: float = Field(default=3.0, ge=1.0, description="division rate ratio per 10 °C [-]")
    k_glucose_g_per_l: float = Field(default=0.1, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.25, gt=0.0, description="Monod constant for glutamine (the feed's amino acids) [mM]")
    ammonia_scale_mm: float = Field(default=25.0, gt=0.0, description="ammonia that lowers division by a factor e [mM]")
    osmolality_threshold_mosm_per_kg: float = Field(default=340.0, ge=250.0, le=450.0, description="osmolality above which division slows [mOsm/kg]")
    osmolality_scale_mosm_per_kg: float = Field(default=150.0, gt=0.0, description="excess osmolality that lowers division by a factor e [mOsm/kg]")
    anaerobic_share: float = Field(
        default=0.4, ge=0.0, le=1.0, description="share of the division rate glycolysis alone sustains with no oxygen: division × (share + (1 − share)·supply) [-]"
    )
    program_arrest: float = Field(default=0.6, ge=0.0, le=1.0, description="fractional arrest of division with the hypoxic program fully on [-]")


class OxygenMetabolism(FrozenConfig):
    """Glucose and glutamine uptake (rest plus division, Q10, the Pasteur effect, the program), lactate, ammonia."""

    glucose_rest_g_per_1e9_cells_h: float = Field(
        default=0.004, ge=0.0, description="glucose uptake of non-dividing, oxygenated cells at the reference temperature and ample glucose [g/(1e9 cells·h)]"
    )
    glucose_division_g_per_1e9_cells_h: float = Field(
        default=0.011, ge=0.0, description="glucose uptake added by division at the maximum division rate (in proportion below it) [g/(1e9 cells·h)]"
    )
    k_glucose_uptake_g_per_l: float = Field(default=0.3, gt=0.0, description="Monod constant of glucose transport [g/L]")
    glycolysis_q10: float = Field(default=2.0, ge=1.0, description="glucose uptake ratio per 10 °C [-]")
    pasteur_gain: float = Field(default=1.5, ge=0.0, le=5.0, description="relative rise of glucose and glutamine uptake with no oxygen supply at all (immediate) [-]")
    program_glycolysis_gain: float = Field(default=0.5, ge=0.0, le=3.0, description="relative rise of glucose uptake with the hypoxic program fully on [-]")
    lactate_yield_division_g_per_g: float = Field(
        default=0.8, ge=0.0, le=1.0, description="lactate made per glucose of the division part of the uptake, fully oxygenated cells without the program [g/g]"
    )
    lactate_yield_rest_g_per_g: float = Field(
        default=0.1, ge=0.0, le=1.0, description="lactate made per glucose of the rest part of the uptake, fully oxygenated cells without the program [g/g]"
    )
    program_oxidation_block: float = Field(
        default=0.3, ge=0.0, le=1.0, description="fractional block of the cells' oxygen demand and pyruvate oxidation with the hypoxic program fully on (PDK1) [-]"
    )
    lactate_uptake_max_g_per_1e9_cells_h: float = Field(
        default=0.004, ge=0.0, description="lactate uptake of non-dividing, oxygenated cells without the program at the reference temperature [g/(1e9 cells·h)]"
    )
    k_lactate_uptake_g_per_l: float = Field(default=1.0, gt=0.0, description="Monod constant of lactate uptake [g/L]")
    lactate_uptake_half_growth_per_h: float = Field(default=0.012, gt=0.0, description="division rate that halves lactate uptake [1/h]")
    glutamine_rest_mmol_per_1e9_cells_h: float = Field(
        default=0.002, ge=0.0, description="glutamine uptake of non-dividing, oxygenated cells at the reference temperature [mmol/(1e9 cells·h)]"
    )
    glutamine_division_mmol_per_1e9_cells_h: float = Field(
        default=0.012, ge=0.0, description="glutamine uptake added by division at the maximum division rate [mmol/(1e9 cells·h)]"
    )
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.7, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.5, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")


class OxygenHypoxia(FrozenConfig):
    """The hypoxic program (HIF-1 and its targets): induced at low DO within hours, lost over a day or two."""

    half_do_pct: float = Field(default=5.0, gt=0.0, le=40.0, description="dissolved oxygen at which the hypoxia signal is half on [% of air saturation]")
    hill: float = Field(default=3.0, ge=1.0, le=8.0, description="steepness of the hypoxia signal in the dissolved oxygen [-]")
    induction_per_h: float = Field(default=0.1, gt=0.0, le=1.0, description="rate at which the program builds under full hypoxia [1/h]")
    loss_per_h: float = Field(default=0.03, gt=0.0, le=1.0, description="rate at which the program is lost with oxygen back [1/h]")


class OxygenProduct(FrozenConfig):
    """Specific productivity and the galactosylation of new product."""

    q_product_pg_per_cell_day: float = Field(default=24.0, ge=0.0, le=200.0, description="specific productivity at the reference temperature without the program [pg/(cell·day)]")
    cold_gain_per_degc: float = Field(default=0.03, ge=0.0, le=0.3, description="relative rise of specific productivity per degree below the reference temperature [1/°C]")
    program_loss: float = Field(default=0.5, ge=0.0, le=1.0, description="fractional loss of specific productivity with the hypoxic program fully on (translation) [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses (Monod) [g/L]")
    galactosylated_max_fraction: float = Field(default=0.75, ge=0.0, le=1.0, description="galactosylated fraction of new product without ammonia or the program [-]")
    galactosylation_ammonia_scale_mm: float = Field(default=40.0, gt=0.0, description="ammonia that lowers the galactosylated fraction of new product by a factor e [mM]")
    galactosylation_program_loss: float = Field(
        default=0.3, ge=0.0, le=1.0, description="fractional loss of the galactosylated fraction of new product with the hypoxic program fully on [-]"
    )


class OxygenDeath(FrozenConfig):
    """Death: basal, glucose and glutamine starvation, oxygen shortfall, bubble damage at the top of the cascade, osmolality; lysis."""

    basal_per_h: float = Field(default=0.0015, ge=0.0, description="death rate of fed, oxygenated cells at the reference temperature [1/h]")
    basal_q10: float = Field(default=2.0, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    glucose_starvation_per_h: float = Field(default=0.03, ge=0.0, description="death rate added with no glucose [1/h]")
    glucose_starvation_scale_g_per_l: float = Field(default=0.15, gt=0.0, description="glucose at which the starvation term has fallen to 1/e [g/L]")
    glutamine_starvation_per_h: float = Field(default=0.006, ge=0.0, description="death rate added with no glutamine (the feed's amino acids) [1/h]")
    glutamine_starvation_scale_mm: float = Field(default=0.15, gt=0.0, description="glutamine at which its starvation term has fallen to 1/e [mM]")
    hypoxic_per_h: float = Field(default=0.02, ge=0.0, description="death rate added with no oxygen supply and no program (quadratic in the shortfall) [1/h]")
    program_protection: float = Field(default=0.5, ge=0.0, le=1.0, description="fractional protection against hypoxic death with the program fully on [-]")
    bubble_per_h: float = Field(default=0.003, ge=0.0, description="death rate added by sparging with the cascade at its top [1/h]")
    bubble_hill: float = Field(default=4.0, ge=1.0, le=12.0, description="steepness of the bubble damage in the cascade's load [-]")
    osmotic_threshold_mosm_per_kg: float = Field(default=400.0, ge=300.0, le=600.0, description="osmolality above which it kills [mOsm/kg]")
    osmotic_per_100_mosm_per_kg_h: float = Field(default=0.01, ge=0.0, description="death rate added per 100 mOsm/kg above the threshold [1/h]")
    lysis_per_h: float = Field(default=0.005, ge=0.0, description="first-order lysis of dead cells [1/h]")


class OxygenTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 and the solubility factor are 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class OxygenKinetics(FrozenConfig):
    """All parameters of the oxygen plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    transfer: OxygenTransfer = OxygenTransfer()
    respiration: OxygenRespiration = OxygenRespiration()
    growth: OxygenGrowth = OxygenGrowth()
    metabolism: OxygenMetabolism = OxygenMetabolism()
    hypoxia: OxygenHypoxia = OxygenHypoxia()
    product: OxygenProduct = OxygenProduct()
    death: OxygenDeath = OxygenDeath()
    temperature: OxygenTemperature = OxygenTemperature()


def osmolality_of(other_osmolytes: Any, glucose: Any, lactate: Any, glutamine: Any, ammonia: Any) -> Any:
    """Culture osmolality [mOsm/kg] from the other osmolytes and the tracked solutes, one osmole per mole."""
    return other_osmolytes + glucose * 1000.0 / GLUCOSE_G_PER_MOL + lactate * 1000.0 / LACTATE_G_PER_MOL + glutamine + ammonia


def oxygen_balance_mm(demand_mm_per_h: Any, kla_per_h: Any, saturation_mm: Any, k_oxygen_mm: Any) -> Any:
    """The dissolved oxygen [mM] where transfer ``kLa (C* - C)`` meets Michaelis uptake ``demand · C / (K + C)``: the positive root, in a form without cancellation."""
    b = kla_per_h * (k_oxygen_mm - saturation_mm) + demand_mm_per_h
    return 2.0 * kla_per_h * saturation_mm * k_oxygen_mm / (b + ca.sqrt(b * b + 4.0 * kla_per_h**2 * saturation_mm * k_oxygen_mm))


def smooth_min_positive(a: Any, b: Any, exponent: float) -> Any:
    """A smooth minimum of two positive numbers, ``(a^-n + b^-n)^(-1/n)``: the smaller, a little less where they meet."""
    return (a ** (-exponent) + b ** (-exponent)) ** (-1.0 / exponent)


_STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("dead_cells", "1e6 cells/mL", "dead (not yet lysed) cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine (the feed's amino acids, lumped)"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes"),
    Signal("hypoxic_program", "-", "the hypoxic program (HIF-1 targets), 0 (off) to 1 (fully on)"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)

INTERNALS: tuple[Signal, ...] = (
    Signal("dissolved_oxygen_pct", "% of air saturation", "dissolved oxygen (quasi-steady), relative to air saturation at the culture temperature"),
    Signal("oxygen_supply_fraction", "-", "oxygen the cells take up over what they demand"),
    Signal("oxygen_demand", "mmol/L/h", "the culture's oxygen demand (what it would take up at ample oxygen)"),
    Signal("transfer_capacity", "mmol/L/h", "what the cascade transfers at its top with the DO at its setpoint"),
    Signal("cascade_load", "-", "oxygen transferred over what the cascade transfers at its top at the present DO"),
    Signal("hypoxia_signal", "-", "the signal that induces the hypoxic program, 0 (oxygenated) to 1 (hypoxic)"),
    Signal("division_per_h", "1/h", "division rate"),
    Signal("death_per_h", "1/h", "death rate"),
    Signal("qp_pg_per_cell_day", "pg/(cell·day)", "specific productivity"),
    Signal("lactate_yield_g_per_g", "g/g", "lactate made per glucose taken up"),
    Signal("glucose_uptake_g_per_1e9_cells_h", "g/(1e9 cells·h)", "glucose uptake per viable cell"),
)
"""Quantities of the oxygen plant that no probe of the PLC shows (for tests and documentation)."""


class OxygenPlant(KineticsPlant[OxygenKinetics]):
    """An oxygen supply capped by the vessel's DO cascade, the Pasteur effect, a lagging hypoxic program, bubble damage at the cascade's top."""

    name = "oxygen"
    description = (
        "oxygen transfer capped at the top of a DO cascade (OUR saturates), the Pasteur effect below a few % DO, "
        "a hypoxic program that lowers oxygen demand, division, productivity and galactosylation, bubble damage at the cascade's top"
    )
    states = _STATES
    kinetics_type = OxygenKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        x = self.inoculated_state(batch)
        x[self.state_index("viable_cells")] = batch.inoculation.viable_cell_density_1e6_per_ml
        x[self.state_index("hypoxic_program")] = 0.0  # a seed culture grown at its DO setpoint
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
        viable, dead = s["viable_cells"], s["dead_cells"]
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        program, volume, temperature = s["hypoxic_program"], s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]
        osmolality = osmolality_of(s["other_osmolytes"], glc, lac, gln, amm)
        mu_max = k["growth.mu_max_per_h"]

        # Division the cells would achieve with ample oxygen (the hypoxic program's arrest included).
        excess_osmolality = smooth_positive(osmolality - k["growth.osmolality_threshold_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)
        mu_oxygenated = (
            mu_max
            * q10_factor(k["growth.q10"], temperature, reference)
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * gln
            / (k["growth.k_glutamine_mm"] + gln)
            * ca.exp(-amm / k["growth.ammonia_scale_mm"])
            * ca.exp(-excess_osmolality / k["growth.osmolality_scale_mosm_per_kg"])
            * (1.0 - k["growth.program_arrest"] * program)
        )

        # Oxygen demand: rest and division (Q10), lactate oxidation; the program blocks part of it (PDK1).
        oxidation_open = 1.0 - k["metabolism.program_oxidation_block"] * program
        lactate_uptake_possible = (
            k["metabolism.lactate_uptake_max_g_per_1e9_cells_h"]
            * q10_factor(k["metabolism.glycolysis_q10"], temperature, reference)
            * lac
            / (k["metabolism.k_lactate_uptake_g_per_l"] + lac)
            * k["metabolism.lactate_uptake_half_growth_per_h"]
            / (k["metabolism.lactate_uptake_half_growth_per_h"] + mu_oxygenated)
            * oxidation_open
        )
        q_o2_demand = (k["respiration.o2_rest_mmol_per_1e9_cells_h"] + k["respiration.o2_division_mmol_per_1e9_cells_h"] * mu_oxygenated / mu_max) * q10_factor(
            k["respiration.q10"], temperature, reference
        ) * oxidation_open + _O2_PER_LACTATE_MOL_PER_MOL * 1000.0 * lactate_uptake_possible / LACTATE_G_PER_MOL
        demand = q_o2_demand * viable  # mmol/(L·h)

        # The cascade: the DO stays at its setpoint while the top of the cascade can transfer the demand; beyond, transfer meets uptake.
        air_saturation = k["transfer.air_saturation_mm"] * (1.0 + k["transfer.solubility_per_degc"] * (reference - temperature))
        saturation_max = air_saturation * k["transfer.max_o2_fraction"] / _AIR_O2_FRACTION
        kla = k["transfer.kla_max_per_h"]
        k_oxygen = k["respiration.k_oxygen_pct"] / 100.0 * air_saturation
        do_setpoint = k["transfer.do_setpoint_pct"] / 100.0 * air_saturation
        do_limited = oxygen_balance_mm(demand, kla, saturation_max, k_oxygen)
        dissolved = smooth_min_positive(do_setpoint, do_limited, _DO_SMOOTH_MIN_EXPONENT)
        supply = dissolved / (k_oxygen + dissolved)  # oxygen taken up over demanded
        oxygen_uptake = demand * supply
        transfer_at_top = kla * (saturation_max - dissolved)
        cascade_load = oxygen_uptake / transfer_at_top
        do_pct = 100.0 * dissolved / air_saturation
        hypoxia = 1.0 / (1.0 + (do_pct / k["hypoxia.half_do_pct"]) ** k["hypoxia.hill"])
        shortfall = 1.0 - supply

        # Division: glycolysis alone sustains part of it without oxygen.
        mu = mu_oxygenated * (k["growth.anaerobic_share"] + (1.0 - k["growth.anaerobic_share"]) * supply)

        # Glycolysis: rest and division, the immediate Pasteur effect and the program; lactate is the pyruvate not oxidised.
        pasteur = 1.0 + k["metabolism.pasteur_gain"] * shortfall
        glycolysis = (
            q10_factor(k["metabolism.glycolysis_q10"], temperature, reference)
            * glc
            / (k["metabolism.k_glucose_uptake_g_per_l"] + glc)
            * pasteur
            * (1.0 + k["metabolism.program_glycolysis_gain"] * program)
        )
        q_glucose_rest = k["metabolism.glucose_rest_g_per_1e9_cells_h"] * glycolysis
        q_glucose_division = k["metabolism.glucose_division_g_per_1e9_cells_h"] * mu / mu_max * glycolysis
        q_glucose = q_glucose_rest + q_glucose_division
        oxidisable = (1.0 - k["metabolism.lactate_yield_rest_g_per_g"]) * q_glucose_rest + (1.0 - k["metabolism.lactate_yield_division_g_per_g"]) * q_glucose_division
        lactate_made = q_glucose - oxidisable * supply * oxidation_open
        lactate_yield = lactate_made / (q_glucose + 1e-12)
        lactate_uptake = lactate_uptake_possible * supply
        r_lactate = (lactate_made - lactate_uptake) * viable
        q_glutamine = (
            (k["metabolism.glutamine_rest_mmol_per_1e9_cells_h"] + k["metabolism.glutamine_division_mmol_per_1e9_cells_h"] * mu / mu_max)
            * q10_factor(k["metabolism.glycolysis_q10"], temperature, reference)
            * gln
            / (k["metabolism.k_glutamine_uptake_mm"] + gln)
            * pasteur
        )

        # Product: a small cold gain; the program lowers translation and galactosylation.
        q_product_pg = (
            k["product.q_product_pg_per_cell_day"]
            * smooth_positive(1.0 + k["product.cold_gain_per_degc"] * (reference - temperature), 0.01)
            * (1.0 - k["product.program_loss"] * program)
        )
        r_product = q_product_pg * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H * glc / (k["product.k_glucose_g_per_l"] + glc) * viable
        galactosylated_new = (
            k["product.galactosylated_max_fraction"] * ca.exp(-amm / k["product.galactosylation_ammonia_scale_mm"]) * (1.0 - k["product.galactosylation_program_loss"] * program)
        )

        # Death: basal, starvation, oxygen shortfall (less with the program), bubbles at the cascade's top, osmolality.
        kd = (
            k["death.basal_per_h"] * q10_factor(k["death.basal_q10"], temperature, reference)
            + k["death.glucose_starvation_per_h"] * ca.exp(-glc / k["death.glucose_starvation_scale_g_per_l"])
            + k["death.glutamine_starvation_per_h"] * ca.exp(-gln / k["death.glutamine_starvation_scale_mm"])
            + k["death.hypoxic_per_h"] * shortfall**2 * (1.0 - k["death.program_protection"] * program)
            + k["death.bubble_per_h"] * cascade_load ** k["death.bubble_hill"]
            + k["death.osmotic_per_100_mosm_per_kg_h"] * smooth_positive(osmolality - k["death.osmotic_threshold_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG) / 100.0
        )

        r_glutamine = q_glutamine * viable
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln
        base_rate = k["metabolism.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume

        dx = [
            (mu - kd - dilution) * viable,
            kd * viable - (k["death.lysis_per_h"] + dilution) * dead,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - q_glucose * viable,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            k["metabolism.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation - dilution * amm,
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            k["hypoxia.induction_per_h"] * hypoxia * (1.0 - program) - k["hypoxia.loss_per_h"] * (1.0 - hypoxia) * program,
            r_product - dilution * s["titer"],
            galactosylated_new * r_product - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

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
            "our": oxygen_uptake,
            "cer": k["respiration.respiratory_quotient"] * oxygen_uptake,
            "capacitance": k["respiration.capacitance_pf_per_cm_per_1e6_cells_ml"] * viable,
            "dissolved_oxygen_pct": do_pct,
            "oxygen_supply_fraction": supply,
            "oxygen_demand": demand,
            "transfer_capacity": kla * (saturation_max - do_setpoint),
            "cascade_load": cascade_load,
            "hypoxia_signal": hypoxia,
            "division_per_h": mu,
            "death_per_h": kd,
            "qp_pg_per_cell_day": q_product_pg,
            "lactate_yield_g_per_g": lactate_yield,
            "glucose_uptake_g_per_1e9_cells_h": q_glucose,
        }
        return dx, observed
