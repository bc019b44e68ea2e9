"""A CHO plant of two subpopulations, producers that revert to non-producers as they divide, with a secretory (ER) capacity that limits what producers make.

Written on 8 Dec 2026 as a **held-out** plant, blind: no controller, NMPC,
estimator or campaign was run on it while it was written. Parameter values come
from physiology and the literature cited in docs/plants.md §9 and §12.7; the
platform recipe (§11) was run only to check that the batch is plausible (the first
parameter set was not, and seven values were revised once, for the reasons in §9).

Structure (after the clonal variation and production instability of CHO lines,
Kim et al. 1998, Barnes et al. 2003, Chusainow et al. 2009; the growth–production
trade-off of arrested CHO cells, Bi et al. 2004; the secretory bottleneck and the
unfolded-protein response, Schröder & Kaufman 2005; mild
hypothermia, Fox et al. 2004, Kumar et al. 2007; glycolytic and mitochondrial
control of the lactate switch, Zagari et al. 2013, Templeton et al. 2013), and what
differs from ``plant_models.cho``:

- **two viable subpopulations**: producers and low/non-producers. Non-producers
  carry no secretory burden and divide faster; producers revert to non-producers
  at a fixed probability **per division**, so a colder, slower culture loses fewer;
  the titer falls behind the viable cell density as the non-producers take over;
- **specific productivity saturates with a secretory (ER) capacity**: producers
  make a smooth minimum of the synthesis demand (transgene translation, higher
  when cold, lower while cells divide fast: the growth–production trade-off) and
  the capacity of their ER, which expands under unfolded-protein load over days,
  slower when cold, and is damaged below about 32 °C; a larger ER also slows the
  producers' division (burden);
- **quality**: the galactosylated fraction of new product falls with the
  unfolded load (producers pushed past their ER capacity);
- **glucose uptake is not proportional to the viable cell density**: a
  high-affinity transporter whose capacity per cell follows a **glycolytic program**
  that is switched off as **mitochondrial capacity** accumulates; division needs
  glycolytic flux above a threshold, so growth stops through the program, not
  through a culture-age term;
- **mitochondrial capacity** is made at a temperature-dependent rate and diluted by
  division, so it builds up when division slows (stationary phase, cold); lactate is
  the glycolytic pyruvate beyond the oxidative capacity, and spare capacity takes
  lactate back (the lactate switch);
- **temperature**: a linear thermal-time law of division (zero at 28 °C), separate
  Q10s for glycolysis, mitochondrial biogenesis, oxidation and ER expansion;
- **death** from an energy deficit (ATP from glycolysis and oxidation against a
  maintenance demand), ER stress of overloaded producers, osmolality above 400
  mOsm/kg and a basal rate; no culture-age or lactate term;
- probes: OUR and CER from pyruvate (and lactate) oxidation and a basal
  respiration of other substrates; capacitance per producer rises with its ER.

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
_SMOOTH_EPS_MMOL_PER_1E9_CELLS_H = 0.005
_SMOOTH_EPS_DEGC = 0.2
_SMOOTH_EPS_MOSM_PER_KG = 1.0
_SMOOTH_MIN_EXPONENT = 4.0
_PYRUVATE_PER_GLUCOSE_MOL_PER_MOL = 2.0
_O2_PER_PYRUVATE_OXIDISED_MOL_PER_MOL = 3.0
"""A pyruvate oxidised with the glycolytic NADH that made it (or a lactate oxidised): 3 O2, 3 CO2."""
_CO2_PER_PYRUVATE_OXIDISED_MOL_PER_MOL = 3.0


class ClonalGrowth(FrozenConfig):
    """Division: a linear thermal-time law, a threshold on glycolytic flux and a smooth minimum with glutamine, ammonia and osmolality; the producers' burden."""

    mu_max_per_h: float = Field(default=0.045, gt=0.0, le=0.2, description="division rate of non-producers at the reference temperature without limitation [1/h]")
    thermal_zero_degc: float = Field(default=28.0, ge=15.0, le=33.0, description="temperature at which the linear thermal-time law reaches zero division [°C]")
    glycolytic_half_flux: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="glycolytic flux (relative to the transporter's full capacity) at which division is half its unlimited rate (Hill 4) [-]"
    )
    k_glutamine_mm: float = Field(default=0.2, gt=0.0, description="Monod constant for glutamine (the feed's amino acids) [mM]")
    ammonia_scale_mm: float = Field(default=25.0, gt=0.0, description="ammonia that lowers division by a factor e [mM]")
    osmolality_threshold_mosm_per_kg: float = Field(default=320.0, ge=250.0, le=450.0, description="osmolality above which division slows [mOsm/kg]")
    osmolality_scale_mosm_per_kg: float = Field(default=150.0, gt=0.0, description="excess osmolality that lowers division by a factor e [mOsm/kg]")
    burden_per_er_capacity: float = Field(default=0.12, ge=0.0, le=1.0, description="slowing of the producers' division per unit of ER capacity: division × 1/(1 + b·E) [-]")


class ClonalInstability(FrozenConfig):
    """Loss of production: reversion per division and the inoculum's non-producers."""

    reversion_per_division: float = Field(default=0.01, ge=0.0, le=0.2, description="probability that a producer's division gives a non-producer [-]")
    inoculum_nonproducer_fraction: float = Field(default=0.05, ge=0.0, lt=1.0, description="non-producer share of the inoculum's viable cells [-]")


class ClonalTransport(FrozenConfig):
    """Glucose and glutamine transport, whose capacity per cell follows the glycolytic program."""

    glucose_uptake_max_g_per_1e9_cells_h: float = Field(
        default=0.018, gt=0.0, description="glucose uptake per cell with the glycolytic program fully on, at the reference temperature and saturating glucose [g/(1e9 cells·h)]"
    )
    k_glucose_transport_g_per_l: float = Field(default=0.25, gt=0.0, description="affinity (Km) of the high-affinity glucose transporter [g/L]")
    glycolysis_q10: float = Field(default=2.2, ge=1.0, description="glucose uptake ratio per 10 °C [-]")
    glutamine_uptake_max_mmol_per_1e9_cells_h: float = Field(
        default=0.015, gt=0.0, description="glutamine uptake per cell with the glycolytic program fully on, at the reference temperature [mmol/(1e9 cells·h)]"
    )
    k_glutamine_transport_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of glutamine transport [mM]")
    glutamine_q10: float = Field(default=2.0, ge=1.0, description="glutamine uptake ratio per 10 °C [-]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.7, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    program_floor: float = Field(default=0.3, ge=0.0, lt=1.0, description="transport capacity left with the glycolytic program switched off [-]")
    program_half_mitochondria: float = Field(default=1.6, gt=0.0, description="mitochondrial capacity at which the program is half switched off [-]")
    program_hill: float = Field(default=4.0, ge=1.0, le=8.0, description="steepness of the program's switch in mitochondrial capacity [-]")
    program_lag_h: float = Field(default=24.0, gt=0.0, le=96.0, description="time constant of the program following its target [h]")


class ClonalMitochondria(FrozenConfig):
    """Mitochondrial capacity per cell (1 in the seed culture): made at a steady rate, diluted by division, turned over; it oxidises pyruvate and takes lactate back."""

    biogenesis_per_h: float = Field(default=0.05, gt=0.0, description="mitochondrial capacity made per cell per hour at the reference temperature [1/h]")
    biogenesis_q10: float = Field(default=1.5, ge=1.0, description="biogenesis ratio per 10 °C [-]")
    turnover_per_h: float = Field(default=0.02, ge=0.0, description="first-order turnover (mitophagy) of mitochondrial capacity [1/h]")
    pyruvate_oxidation_mmol_per_1e9_cells_h: float = Field(
        default=0.07, gt=0.0, description="pyruvate one unit of mitochondrial capacity oxidises per cell at the reference temperature [mmol/(1e9 cells·h)]"
    )
    oxidation_q10: float = Field(default=1.5, ge=1.0, description="oxidative capacity ratio per 10 °C [-]")
    k_lactate_uptake_g_per_l: float = Field(default=1.0, gt=0.0, description="lactate at which half the spare oxidative capacity takes lactate back [g/L]")


class ClonalSecretion(FrozenConfig):
    """Producers' synthesis demand and the ER capacity that limits secretion; the unfolded-protein response that expands it."""

    demand_pg_per_cell_day: float = Field(
        default=45.0, ge=0.0, le=200.0, description="producers' synthesis demand of non-dividing cells at the reference temperature [pg/(cell·day)]"
    )
    demand_gain_per_degc: float = Field(default=0.1, ge=0.0, le=0.5, description="relative rise of the demand per degree below the reference temperature [1/°C]")
    demand_half_growth_per_h: float = Field(default=0.03, gt=0.0, description="producers' division rate that halves the demand (growth–production trade-off) [1/h]")
    capacity_pg_per_cell_day: float = Field(default=20.0, gt=0.0, description="secretion one unit of ER capacity allows [pg/(cell·day)]")
    er_max: float = Field(default=3.0, gt=1.0, le=10.0, description="largest ER capacity the unfolded-protein response builds [-]")
    expansion_per_h: float = Field(default=0.02, ge=0.0, description="ER expansion rate per unit of unfolded load at the reference temperature [1/h]")
    expansion_q10: float = Field(default=2.0, ge=1.0, description="ER expansion ratio per 10 °C [-]")
    relaxation_per_h: float = Field(default=0.004, ge=0.0, description="return of the ER capacity towards the seed culture's 1 [1/h]")
    cold_damage_threshold_degc: float = Field(default=32.0, ge=25.0, le=36.0, description="temperature below which the cold damages the ER capacity [°C]")
    cold_damage_per_degc_h: float = Field(default=0.004, ge=0.0, description="loss of ER capacity per degree below the threshold [1/(°C·h)]")
    nonproducer_ratio: float = Field(default=0.05, ge=0.0, lt=1.0, description="specific productivity of non-producers relative to producers [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses (Monod) [g/L]")
    galactosylated_max_fraction: float = Field(default=0.8, ge=0.0, le=1.0, description="galactosylated fraction of new product with no unfolded load and no ammonia [-]")
    galactosylation_load_scale: float = Field(
        default=1.0, gt=0.0, description="unfolded load that lowers the galactosylated fraction of the producers' new product by a factor e [-]"
    )
    galactosylation_ammonia_scale_mm: float = Field(default=40.0, gt=0.0, description="ammonia that lowers the galactosylated fraction of new product by a factor e [mM]")


class ClonalDeath(FrozenConfig):
    """Death: basal, energy deficit, ER stress of overloaded producers, osmolality; lysis."""

    basal_per_h: float = Field(default=0.0015, ge=0.0, description="death rate of fed cells at the reference temperature [1/h]")
    basal_q10: float = Field(default=2.0, ge=1.0, description="basal death rate ratio per 10 °C [-]")
    atp_per_pyruvate_oxidised: float = Field(default=14.0, gt=0.0, description="ATP per pyruvate (or lactate) oxidised, the glycolytic NADH included [mol/mol]")
    atp_demand_mmol_per_1e9_cells_h: float = Field(default=0.8, gt=0.0, description="maintenance ATP demand per cell at the reference temperature [mmol/(1e9 cells·h)]")
    atp_demand_q10: float = Field(default=2.0, ge=1.0, description="ATP demand ratio per 10 °C [-]")
    energy_death_max_per_h: float = Field(default=0.02, ge=0.0, description="death rate added with no ATP supply [1/h]")
    energy_half_ratio: float = Field(default=0.7, gt=0.0, description="ATP supply / demand at half the added death rate [-]")
    energy_hill: float = Field(default=6.0, ge=1.0, le=12.0, description="steepness of the energy-deficit death in the supply / demand ratio [-]")
    er_stress_per_h: float = Field(default=0.01, ge=0.0, description="death rate of producers added at an unfolded load of 1 (quadratic in the load) [1/h]")
    osmotic_threshold_mosm_per_kg: float = Field(default=400.0, ge=300.0, le=600.0, description="osmolality above which it kills [mOsm/kg]")
    osmotic_per_100_mosm_per_kg_h: float = Field(default=0.01, ge=0.0, description="death rate added per 100 mOsm/kg above the threshold [1/h]")
    lysis_per_h: float = Field(default=0.005, ge=0.0, description="first-order lysis of dead cells [1/h]")


class ClonalMeasurement(FrozenConfig):
    """Off-gas, base and capacitance."""

    o2_basal_mmol_per_1e9_cells_h: float = Field(
        default=0.03, ge=0.0, description="oxygen uptake of other substrates (amino acids, lipids) at the reference temperature [mmol/(1e9 cells·h)]"
    )
    basal_respiratory_quotient: float = Field(default=0.75, gt=0.3, lt=2.0, description="CO2 per O2 of the other substrates [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.5, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per non-producer (and producer at ER capacity 1) [pF/cm per 1e6 cells/mL]")
    capacitance_per_er_capacity: float = Field(default=0.08, ge=0.0, le=1.0, description="relative rise of a producer's permittivity per unit of ER capacity above 1 [-]")


class ClonalTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which every Q10 and the thermal-time law are 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class ClonalKinetics(FrozenConfig):
    """All parameters of the clonal plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: ClonalGrowth = ClonalGrowth()
    instability: ClonalInstability = ClonalInstability()
    transport: ClonalTransport = ClonalTransport()
    mitochondria: ClonalMitochondria = ClonalMitochondria()
    secretion: ClonalSecretion = ClonalSecretion()
    death: ClonalDeath = ClonalDeath()
    measurement: ClonalMeasurement = ClonalMeasurement()
    temperature: ClonalTemperature = ClonalTemperature()


def osmolality_of(other_osmolytes: Any, glucose: Any, lactate: Any, glutamine: Any, ammonia: Any) -> Any:
    """Culture osmolality [mOsm/kg] from the other osmolytes and the tracked solutes, one osmole per mole."""
    return other_osmolytes + glucose * 1000.0 / GLUCOSE_G_PER_MOL + lactate * 1000.0 / LACTATE_G_PER_MOL + glutamine + ammonia


def program_target(mitochondria: Any, floor: Any, half: Any, hill: Any) -> Any:
    """The glycolytic program the cells tend to: 1 with few mitochondria, the floor with many (numbers or CasADi)."""
    return floor + (1.0 - floor) / (1.0 + (mitochondria / half) ** hill)


def smooth_minimum(a: Any, b: Any) -> Any:
    """A smooth minimum of two factors in [0, 1] (a p-norm of their reciprocals): the scarcer one limits (Liebig), not their product."""
    return a * b / (a**_SMOOTH_MIN_EXPONENT + b**_SMOOTH_MIN_EXPONENT + 1e-12) ** (1.0 / _SMOOTH_MIN_EXPONENT)


def secreted_pg_per_cell_day(demand: Any, capacity: Any) -> Any:
    """What a producer secretes: a smooth minimum of its synthesis demand and its ER capacity (both pg/(cell·day)); it saturates in either."""
    return demand * capacity / ca.sqrt(demand**2 + capacity**2 + 1e-9)


_STATES: tuple[Signal, ...] = (
    Signal("producer_cells", "1e6 cells/mL", "viable producers"),
    Signal("nonproducer_cells", "1e6 cells/mL", "viable low/non-producers (revertants and those of the inoculum)"),
    Signal("dead_cells", "1e6 cells/mL", "dead (not yet lysed) cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine (the feed's amino acids, lumped)"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes"),
    Signal("er_capacity", "-", "the producers' secretory (ER) capacity, 1 in the seed culture"),
    Signal("mitochondrial_capacity", "-", "oxidative capacity per cell, 1 in the seed culture"),
    Signal("glycolytic_program", "-", "glucose and glutamine transport capacity per cell, 1 fully on"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)

INTERNALS: tuple[Signal, ...] = (
    Signal("nonproducer_fraction", "-", "non-producer share of the viable cells"),
    Signal("producer_division_per_h", "1/h", "division rate of the producers"),
    Signal("nonproducer_division_per_h", "1/h", "division rate of the non-producers"),
    Signal("producer_demand_pg_per_cell_day", "pg/(cell·day)", "producers' synthesis demand"),
    Signal("producer_qp_pg_per_cell_day", "pg/(cell·day)", "producers' specific productivity (before the glucose factor)"),
    Signal("unfolded_load", "-", "share of the demand the ER cannot fold and secrete"),
    Signal("glucose_uptake_g_per_1e9_cells_h", "g/(1e9 cells·h)", "glucose uptake per viable cell"),
    Signal("atp_supply_ratio", "-", "ATP supply over maintenance demand"),
)
"""Quantities of the clonal plant that no probe of the PLC shows (for tests and documentation)."""


class ClonalPlant(KineticsPlant[ClonalKinetics]):
    """Producers reverting to faster-growing non-producers, ER-capacity-limited productivity, a glycolytic program switched off by mitochondrial capacity."""

    name = "clonal"
    description = (
        "producers and faster non-producers (reversion per division), productivity saturating in an ER capacity that the unfolded-protein response builds, "
        "glucose transport following a glycolytic program that mitochondrial capacity switches off"
    )
    states = _STATES
    kinetics_type = ClonalKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        x = self.inoculated_state(batch)
        index = self.state_index
        kinetics = self.kinetics
        viable = batch.inoculation.viable_cell_density_1e6_per_ml
        nonproducers = kinetics.instability.inoculum_nonproducer_fraction
        x[index("producer_cells")] = viable * (1.0 - nonproducers)
        x[index("nonproducer_cells")] = viable * nonproducers
        x[index("er_capacity")] = 1.0
        x[index("mitochondrial_capacity")] = 1.0
        transport = kinetics.transport
        x[index("glycolytic_program")] = float(program_target(1.0, transport.program_floor, transport.program_half_mitochondria, transport.program_hill))
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
        producers, nonproducers, dead = s["producer_cells"], s["nonproducer_cells"], s["dead_cells"]
        viable = producers + nonproducers
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        er, mito, program = s["er_capacity"], s["mitochondrial_capacity"], s["glycolytic_program"]
        volume, temperature = s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]
        osmolality = osmolality_of(s["other_osmolytes"], glc, lac, gln, amm)

        # Transport: capacity per cell follows the glycolytic program; the transporter is high-affinity.
        glycolytic_flux = program * glc / (k["transport.k_glucose_transport_g_per_l"] + glc)
        q_glucose = k["transport.glucose_uptake_max_g_per_1e9_cells_h"] * q10_factor(k["transport.glycolysis_q10"], temperature, reference) * glycolytic_flux
        q_glutamine = (
            k["transport.glutamine_uptake_max_mmol_per_1e9_cells_h"]
            * q10_factor(k["transport.glutamine_q10"], temperature, reference)
            * program
            * gln
            / (k["transport.k_glutamine_transport_mm"] + gln)
        )

        # Division: thermal time; glycolytic flux above a threshold (Hill 4, 1 at full flux) and glutamine, the scarcer limits; ammonia and osmolality.
        half = k["growth.glycolytic_half_flux"]
        glycolytic_factor = (1.0 + half**4) * glycolytic_flux**4 / (half**4 + glycolytic_flux**4)
        glutamine_factor = gln / (k["growth.k_glutamine_mm"] + gln)
        thermal = smooth_positive(temperature - k["growth.thermal_zero_degc"], _SMOOTH_EPS_DEGC) / (reference - k["growth.thermal_zero_degc"])
        excess_osmolality = smooth_positive(osmolality - k["growth.osmolality_threshold_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG)
        mu_nonproducer = (
            k["growth.mu_max_per_h"]
            * thermal
            * smooth_minimum(glycolytic_factor, glutamine_factor)
            * ca.exp(-amm / k["growth.ammonia_scale_mm"])
            * ca.exp(-excess_osmolality / k["growth.osmolality_scale_mosm_per_kg"])
        )
        mu_producer = mu_nonproducer / (1.0 + k["growth.burden_per_er_capacity"] * er)
        mu_mean = (mu_producer * producers + mu_nonproducer * nonproducers) / viable
        reversion = k["instability.reversion_per_division"] * mu_producer * producers

        # Pyruvate: glycolysis beyond the oxidative capacity becomes lactate; spare capacity takes lactate back.
        pyruvate = _PYRUVATE_PER_GLUCOSE_MOL_PER_MOL * 1000.0 * q_glucose / GLUCOSE_G_PER_MOL
        oxidative_capacity = k["mitochondria.pyruvate_oxidation_mmol_per_1e9_cells_h"] * mito * q10_factor(k["mitochondria.oxidation_q10"], temperature, reference)
        lactate_made = smooth_positive(pyruvate - oxidative_capacity, _SMOOTH_EPS_MMOL_PER_1E9_CELLS_H)
        lactate_taken = smooth_positive(oxidative_capacity - pyruvate, _SMOOTH_EPS_MMOL_PER_1E9_CELLS_H) * lac / (k["mitochondria.k_lactate_uptake_g_per_l"] + lac)
        oxidised = pyruvate - lactate_made + lactate_taken  # mmol pyruvate/(1e9 cells·h)
        r_lactate = (lactate_made - lactate_taken) * viable * LACTATE_G_PER_MOL / 1000.0

        # Secretion: demand (cold raises it, division lowers it) against the ER capacity; the unfolded load expands the ER.
        below_reference = reference - temperature
        demand = (
            k["secretion.demand_pg_per_cell_day"]
            * smooth_positive(1.0 + k["secretion.demand_gain_per_degc"] * below_reference, 0.01)
            / (1.0 + mu_producer / k["secretion.demand_half_growth_per_h"])
        )
        capacity = k["secretion.capacity_pg_per_cell_day"] * er
        q_producer_pg = secreted_pg_per_cell_day(demand, capacity)
        load = 1.0 - capacity / ca.sqrt(demand**2 + capacity**2 + 1e-9)
        glucose_for_product = glc / (k["secretion.k_glucose_g_per_l"] + glc)
        r_product_producers = q_producer_pg * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H * glucose_for_product * producers
        r_product_nonproducers = k["secretion.nonproducer_ratio"] * q_producer_pg * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H * glucose_for_product * nonproducers
        ammonia_quality = ca.exp(-amm / k["secretion.galactosylation_ammonia_scale_mm"])
        galactosylated_rate = (
            k["secretion.galactosylated_max_fraction"]
            * ammonia_quality
            * (ca.exp(-load / k["secretion.galactosylation_load_scale"]) * r_product_producers + r_product_nonproducers)
        )
        cold_damage = k["secretion.cold_damage_per_degc_h"] * smooth_positive(k["secretion.cold_damage_threshold_degc"] - temperature, _SMOOTH_EPS_DEGC)
        d_er = (
            k["secretion.expansion_per_h"] * q10_factor(k["secretion.expansion_q10"], temperature, reference) * load * (k["secretion.er_max"] - er)
            - k["secretion.relaxation_per_h"] * (er - 1.0)
            - cold_damage * er
        )

        # Death: basal, energy deficit, ER stress of producers, osmolality.
        atp_supply = pyruvate + k["death.atp_per_pyruvate_oxidised"] * oxidised
        atp_ratio = atp_supply / (k["death.atp_demand_mmol_per_1e9_cells_h"] * q10_factor(k["death.atp_demand_q10"], temperature, reference))
        kd = (
            k["death.basal_per_h"] * q10_factor(k["death.basal_q10"], temperature, reference)
            + k["death.energy_death_max_per_h"] / (1.0 + (atp_ratio / k["death.energy_half_ratio"]) ** k["death.energy_hill"])
            + k["death.osmotic_per_100_mosm_per_kg_h"] * smooth_positive(osmolality - k["death.osmotic_threshold_mosm_per_kg"], _SMOOTH_EPS_MOSM_PER_KG) / 100.0
        )
        kd_producer = kd + k["death.er_stress_per_h"] * load**2

        r_glucose = q_glucose * viable
        r_glutamine = q_glutamine * viable
        glutamine_degradation = k["transport.glutamine_degradation_per_h"] * gln
        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume
        program_goal = program_target(mito, k["transport.program_floor"], k["transport.program_half_mitochondria"], k["transport.program_hill"])

        dx = [
            (mu_producer - kd_producer - dilution) * producers - reversion,
            (mu_nonproducer - kd - dilution) * nonproducers + reversion,
            kd_producer * producers + kd * nonproducers - (k["death.lysis_per_h"] + dilution) * dead,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - r_glucose,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - r_glutamine - glutamine_degradation,
            r_lactate - dilution * lac,
            k["transport.ammonia_per_glutamine_mol_per_mol"] * r_glutamine + glutamine_degradation - dilution * amm,
            (feed * strength * k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume
            - dilution * s["other_osmolytes"],
            d_er,
            k["mitochondria.biogenesis_per_h"] * q10_factor(k["mitochondria.biogenesis_q10"], temperature, reference) - (mu_mean + k["mitochondria.turnover_per_h"]) * mito,
            (program_goal - program) / k["transport.program_lag_h"],
            r_product_producers + r_product_nonproducers - dilution * s["titer"],
            galactosylated_rate - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        o2_basal = k["measurement.o2_basal_mmol_per_1e9_cells_h"] * q10_factor(k["death.atp_demand_q10"], temperature, reference)
        our = (_O2_PER_PYRUVATE_OXIDISED_MOL_PER_MOL * oxidised + o2_basal) * viable
        cer = (_CO2_PER_PYRUVATE_OXIDISED_MOL_PER_MOL * oxidised + k["measurement.basal_respiratory_quotient"] * o2_basal) * viable
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
            "cer": cer,
            "capacitance": k["measurement.capacitance_pf_per_cm_per_1e6_cells_ml"] * (nonproducers + producers * (1.0 + k["measurement.capacitance_per_er_capacity"] * (er - 1.0))),
            "nonproducer_fraction": nonproducers / viable,
            "producer_division_per_h": mu_producer,
            "nonproducer_division_per_h": mu_nonproducer,
            "producer_demand_pg_per_cell_day": demand,
            "producer_qp_pg_per_cell_day": q_producer_pg,
            "unfolded_load": load,
            "glucose_uptake_g_per_1e9_cells_h": q_glucose,
            "atp_supply_ratio": atp_ratio,
        }
        return dx, observed
