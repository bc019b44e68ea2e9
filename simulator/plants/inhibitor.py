"""A CHO plant whose growth is ended by inhibitors the cells make from the feed's amino acids, with overflow glycolysis and a cardinal-temperature growth law.

Written on 7 Dec 2026 as a **held-out** plant: after the controller's settings
had been fixed, with parameter values chosen only so that the platform recipe
gives a plausible batch (docs/plants.md §6 and §11), never by how a controller does on it.

Structure (after the amino-acid-derived growth inhibitors of CHO fed-batches
identified by Mulukutla et al. 2017 and reviewed by Pereira et al. 2018; the
cardinal temperature model with inflection of Rosso et al. 1993; overflow
glycolysis with an oxidative bottleneck as in the CHO models of Nolan & Lee
2011 and the glucose-dependent lactate formation of Xing et al. 2010; the
manganese and uridine feeding of Gramer et al. 2011), and what differs from
``plant_models.cho``:

- growth ends by an **unmeasured inhibitor** (the leucine, phenylalanine and
  tyrosine catabolites isovalerate, 3-phenyllactate, 4-hydroxyphenyllactate,
  lumped) that the cells make in proportion to their catabolism of those
  amino acids, which the nutrient feed supplies: **more feed, more inhibitor,
  less growth**. There is no culture-age term; too little feed starves the
  cells of the amino acids instead;
- growth follows a **cardinal temperature model** (zero at a minimum
  temperature, an asymmetric optimum at 37 °C, zero at a maximum) instead of a
  bell or a Q10; the other rates follow Arrhenius factors;
- **overflow metabolism**: glucose uptake runs at a glycolytic rate that
  saturates only at several g/L glucose and rises with growth; what the
  oxidative capacity cannot take becomes lactate, and lactate is consumed only
  when glycolysis falls below that capacity (low growth, low glucose). So the
  glucose level the controller holds sets the lactate made, and the oxygen
  uptake per cell follows the oxidative capacity, not growth;
- specific productivity **rises below 36.5 °C but saturates** (a sigmoid step,
  +50 % at most) and **falls with the cells' mean age** since division, a
  state that grows once the cells stop dividing;
- the galactosylated fraction of new product **rises with the manganese**
  (a trace supplement) the nutrient feed carries, not falls with ammonia
  and osmolality.

Equations, parameter tables and the behaviour under the platform recipe are in
``docs/plants.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import casadi as ca
import numpy as np
from pydantic import Field, model_validator

from controller.config import BatchConfig
from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H, Signal, logistic_decline, smooth_positive
from plant_models.config_loading import FieldError, FrozenConfig
from plant_models.errors import ConfigError
from simulator.plants.base import KineticsPlant

_SMOOTH_EPS_G_PER_L_H = 1e-4
_SMOOTH_EPS_G_PER_1E9_CELLS_H = 1e-4
_GAS_CONSTANT_KJ_PER_MOL_K = 8.314e-3
_KELVIN_AT_0_DEGC = 273.15
_O2_PER_GLUCOSE_MOL_PER_MOL = 6.0
_O2_PER_LACTATE_MOL_PER_MOL = 3.0


def cardinal_temperature_problem(minimum_degc: float, optimum_degc: float, maximum_degc: float) -> str | None:
    """Why three cardinal temperatures cannot make Rosso's model (it needs the optimum nearer the maximum than the minimum), or None."""
    if not minimum_degc < optimum_degc < maximum_degc:
        return f"must satisfy minimum < optimum < maximum ({minimum_degc:g}, {optimum_degc:g}, {maximum_degc:g} °C)"
    if optimum_degc - minimum_degc <= maximum_degc - optimum_degc:
        return f"must lie above the middle of the cardinal range ({(minimum_degc + maximum_degc) / 2.0:g} °C): the model is undefined otherwise"
    return None


class InhibitorGrowth(FrozenConfig):
    """Specific growth rate: cardinal temperatures, Monod in the substrates, inhibition by the amino-acid catabolites."""

    mu_opt_per_h: float = Field(default=0.044, gt=0.0, le=0.2, description="specific growth rate at the optimum temperature without limitation or inhibition [1/h]")
    temperature_min_degc: float = Field(default=27.0, ge=15.0, le=33.0, description="temperature below which cells do not grow (cardinal minimum) [°C]")
    temperature_opt_degc: float = Field(default=37.0, ge=33.0, le=39.0, description="temperature of fastest growth (cardinal optimum) [°C]")
    temperature_max_degc: float = Field(default=40.5, ge=38.5, le=45.0, description="temperature above which cells do not grow (cardinal maximum) [°C]")
    k_glucose_g_per_l: float = Field(default=0.2, gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for glutamine [mM]")
    k_precursor_mm: float = Field(default=0.3, gt=0.0, description="Monod constant for the inhibitor-precursor amino acids [mM]")
    ki_inhibitor_mm: float = Field(default=2.0, gt=0.0, description="inhibitor concentration that halves growth [mM]")
    inhibitor_hill: float = Field(default=2.0, ge=1.0, le=4.0, description="Hill exponent of growth inhibition by the inhibitor [-]")
    ki_lactate_g_per_l: float = Field(default=8.0, gt=0.0, description="lactate that halves growth [g/L]")
    ki_ammonia_mm: float = Field(default=12.0, gt=0.0, description="ammonia that halves growth [mM]")
    osmolality_half_mosm_per_kg: float = Field(default=470.0, gt=200.0, description="osmolality that halves growth [mOsm/kg]")
    osmolality_width_mosm_per_kg: float = Field(default=20.0, gt=0.0, description="width of the osmotic inhibition [mOsm/kg]")

    @model_validator(mode="after")
    def _cardinal_temperatures(self) -> InhibitorGrowth:
        problem = cardinal_temperature_problem(self.temperature_min_degc, self.temperature_opt_degc, self.temperature_max_degc)
        if problem is not None:
            raise FieldError("temperature_opt_degc", self.temperature_opt_degc, problem)
        return self


class InhibitorDeath(FrozenConfig):
    """Specific death rate: basal (Arrhenius), inhibitor, ammonia, and starvation of glucose or of the precursor amino acids."""

    kd_min_per_h: float = Field(default=0.0008, ge=0.0, description="basal death rate at the reference temperature [1/h]")
    activation_energy_kj_per_mol: float = Field(default=70.0, ge=0.0, description="Arrhenius activation energy of the basal death rate [kJ/mol]")
    kd_inhibitor_max_per_h: float = Field(default=0.008, ge=0.0, description="maximum inhibitor-induced death rate [1/h]")
    k_inhibitor_mm: float = Field(default=6.0, gt=0.0, description="inhibitor at half the maximum inhibitor-induced death [mM]")
    kd_ammonia_max_per_h: float = Field(default=0.006, ge=0.0, description="maximum ammonia-induced death rate [1/h]")
    k_ammonia_mm: float = Field(default=15.0, gt=0.0, description="ammonia at half the maximum ammonia-induced death [mM]")
    kd_glucose_starvation_max_per_h: float = Field(default=0.03, ge=0.0, description="death rate without glucose [1/h]")
    k_glucose_starvation_g_per_l: float = Field(default=0.2, gt=0.0, description="glucose below which starvation death sets in [g/L]")
    kd_precursor_starvation_max_per_h: float = Field(default=0.004, ge=0.0, description="death rate without the precursor amino acids [1/h]")
    k_precursor_starvation_mm: float = Field(default=0.1, gt=0.0, description="precursor amino acids below which starvation death sets in [mM]")
    lysis_per_h: float = Field(default=0.006, ge=0.0, description="first-order lysis of dead cells [1/h]")


class InhibitorMetabolism(FrozenConfig):
    """Overflow glycolysis against an oxidative capacity, glutamine, ammonia."""

    glycolysis_basal_g_per_1e9_cells_h: float = Field(
        default=0.005, ge=0.0, description="glycolytic glucose uptake of non-dividing cells at saturating glucose and the reference temperature [g/(1e9 cells·h)]"
    )
    glycolysis_per_growth_g_per_1e9_cells: float = Field(
        default=0.4, ge=0.0, description="additional glycolytic uptake at saturating glucose per unit specific growth rate [g/1e9 cells = g/(1e9 cells·h) per 1/h]"
    )
    k_glycolysis_glucose_g_per_l: float = Field(default=1.5, gt=0.0, description="glucose at which glycolysis runs at half its capacity [g/L]")
    oxidative_capacity_g_per_1e9_cells_h: float = Field(
        default=0.0063,
        gt=0.0,
        description="pyruvate the mitochondria (and biosynthesis) can take, in glucose equivalents, at the reference temperature [g/(1e9 cells·h)]",
    )
    lactate_per_overflow_g_per_g: float = Field(default=0.9, ge=0.0, le=1.0, description="lactate formed per g glucose beyond the oxidative capacity [g/g]")
    lactate_per_spare_capacity_g_per_g: float = Field(
        default=1.0, ge=0.0, le=1.0, description="lactate taken up per g glucose equivalent of unused oxidative capacity, at saturating lactate [g/g]"
    )
    k_lactate_uptake_g_per_l: float = Field(default=0.5, gt=0.0, description="Monod constant of lactate uptake [g/L]")
    yield_cells_per_glutamine_1e9_per_mmol: float = Field(default=3.0, gt=0.0, description="cells formed per mmol glutamine [1e9 cells/mmol]")
    glutamine_maintenance_mmol_per_1e9_cells_h: float = Field(default=0.001, ge=0.0, description="non-growth glutamine uptake at the reference temperature [mmol/(1e9 cells·h)]")
    k_glutamine_uptake_mm: float = Field(default=0.3, gt=0.0, description="Monod constant of maintenance glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(default=0.0015, ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    ammonia_per_glutamine_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    activation_energy_kj_per_mol: float = Field(
        default=55.0, ge=0.0, description="Arrhenius activation energy of basal glycolysis, oxidative capacity, maintenance and catabolism [kJ/mol]"
    )


class InhibitorAminoAcids(FrozenConfig):
    """The inhibitor-precursor amino acids (leucine, phenylalanine, tyrosine, lumped): use for biomass and product, catabolism to the inhibitor."""

    yield_cells_per_precursor_1e9_per_mmol: float = Field(default=3.0, gt=0.0, description="cells formed per mmol of precursor amino acids [1e9 cells/mmol]")
    precursor_per_product_mmol_per_g: float = Field(default=1.2, ge=0.0, description="precursor amino acids built into a g of product [mmol/g]")
    catabolism_max_mmol_per_1e9_cells_h: float = Field(
        default=0.012, ge=0.0, description="catabolism of the precursor amino acids at saturating concentration and the reference temperature [mmol/(1e9 cells·h)]"
    )
    k_catabolism_mm: float = Field(default=6.0, gt=0.0, description="precursor concentration at half the maximum catabolism [mM]")
    inhibitor_per_catabolised_mol_per_mol: float = Field(default=0.5, ge=0.0, le=1.0, description="inhibitor secreted per precursor catabolised [mol/mol]")
    ammonia_per_catabolised_mol_per_mol: float = Field(default=0.3, ge=0.0, le=1.0, description="ammonia released per precursor catabolised [mol/mol]")


class InhibitorProduct(FrozenConfig):
    """Productivity: saturating rise below the reference temperature, decline with the cells' mean age; galactosylation by manganese."""

    q_product_pg_per_cell_day: float = Field(default=28.0, ge=0.0, le=200.0, description="productivity of new-born cells at the reference temperature [pg/(cell·day)]")
    cold_gain: float = Field(default=0.5, ge=0.0, le=3.0, description="relative productivity gain well below the cold-gain temperature [-]")
    cold_half_degc: float = Field(default=34.5, ge=28.0, le=38.0, description="temperature at which half the cold gain applies [°C]")
    cold_width_degc: float = Field(default=0.8, gt=0.0, description="width of the cold gain's sigmoid [°C]")
    age_half_h: float = Field(default=200.0, gt=0.0, description="mean cell age at which productivity is halved [h]")
    age_hill: float = Field(default=2.0, ge=1.0, le=6.0, description="Hill exponent of the productivity decline with age [-]")
    k_glucose_g_per_l: float = Field(default=0.05, gt=0.0, description="glucose below which productivity collapses [g/L]")
    k_precursor_mm: float = Field(default=0.05, gt=0.0, description="precursor amino acids below which productivity collapses [mM]")
    galactosylated_base_fraction: float = Field(default=0.45, ge=0.0, le=1.0, description="galactosylated fraction of new product without manganese [-]")
    galactosylated_max_fraction: float = Field(default=0.75, ge=0.0, le=1.0, description="galactosylated fraction of new product at saturating manganese [-]")
    k_manganese_um: float = Field(default=0.5, gt=0.0, description="manganese at half the galactosylation gain [µM]")


class InhibitorMeasurement(FrozenConfig):
    """Off-gas from the oxidative fluxes, base and capacitance."""

    o2_other_mmol_per_1e9_cells_h: float = Field(
        default=0.02, ge=0.0, description="oxygen for glutamine and amino-acid oxidation at the reference temperature [mmol/(1e9 cells·h)]"
    )
    respiratory_quotient: float = Field(default=0.95, gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(default=0.6, ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(default=0.9, gt=0.0, description="permittivity per viable cell density [pF/cm per 1e6 cells/mL]")


class InhibitorMedium(FrozenConfig):
    """What the batch file does not say: the precursor amino acids and the manganese of the medium and the feed, and the inoculum's age."""

    precursor_initial_mm: float = Field(default=5.0, ge=0.0, description="precursor amino acids (Leu + Phe + Tyr) after inoculation [mM]")
    feed_precursor_mm: float = Field(default=60.0, ge=0.0, description="precursor amino acids in the nutrient feed at strength 1, part of its other osmolytes [mM]")
    manganese_initial_um: float = Field(default=0.1, ge=0.0, description="manganese after inoculation [µM]")
    feed_manganese_um: float = Field(default=5.0, ge=0.0, description="manganese in the nutrient feed at strength 1 [µM]")
    inoculum_mean_cell_age_h: float = Field(default=30.0, ge=0.0, description="mean time since division of the inoculum's viable cells [h]")


class InhibitorTemperature(FrozenConfig):
    reference_degc: float = Field(default=36.5, ge=30.0, le=40.0, description="temperature at which the Arrhenius factors and the cold gain are 1 [°C]")
    lag_h: float = Field(default=2.0, gt=0.0, le=24.0, description="time constant of the culture temperature following its setpoint [h]")


class InhibitorKinetics(FrozenConfig):
    """All parameters of the inhibitor plant except the batch's media; defaults are the nominal values (sources in docs/plants.md)."""

    growth: InhibitorGrowth = InhibitorGrowth()
    death: InhibitorDeath = InhibitorDeath()
    metabolism: InhibitorMetabolism = InhibitorMetabolism()
    amino_acids: InhibitorAminoAcids = InhibitorAminoAcids()
    product: InhibitorProduct = InhibitorProduct()
    measurement: InhibitorMeasurement = InhibitorMeasurement()
    medium: InhibitorMedium = InhibitorMedium()
    temperature: InhibitorTemperature = InhibitorTemperature()


def cardinal_temperature_factor(temperature_degc: Any, minimum_degc: Any, optimum_degc: Any, maximum_degc: Any) -> Any:
    """Rosso's cardinal temperature model with inflection: 1 at the optimum, 0 at and beyond the cardinal minimum and maximum (numbers or CasADi).

    The temperature is clamped to the cardinal range; the factor meets 0 with a zero slope at the minimum,
    with a kink at the maximum (above every bioreactor's equipment limit).
    """
    t = ca.fmin(ca.fmax(temperature_degc, minimum_degc), maximum_degc)
    span = optimum_degc - minimum_degc
    return (t - maximum_degc) * (t - minimum_degc) ** 2 / (span * (span * (t - optimum_degc) - (optimum_degc - maximum_degc) * (optimum_degc + minimum_degc - 2.0 * t)))


def arrhenius_factor(activation_energy_kj_per_mol: Any, temperature_degc: Any, reference_degc: Any) -> Any:
    """Rate ratio at ``temperature_degc`` relative to ``reference_degc`` for an activation energy."""
    return ca.exp(-activation_energy_kj_per_mol / _GAS_CONSTANT_KJ_PER_MOL_K * (1.0 / (temperature_degc + _KELVIN_AT_0_DEGC) - 1.0 / (reference_degc + _KELVIN_AT_0_DEGC)))


def cold_productivity_factor(temperature_degc: Any, reference_degc: Any, gain: Any, half_degc: Any, width_degc: Any) -> Any:
    """Specific productivity relative to the reference temperature: a sigmoid rise of at most ``gain`` below ``half_degc``, 1 at the reference."""
    at_reference = logistic_decline(reference_degc, half_degc, width_degc)
    return 1.0 + gain * (logistic_decline(temperature_degc, half_degc, width_degc) - at_reference) / (1.0 - at_reference)


_STATES: tuple[Signal, ...] = (
    Signal("viable_cells", "1e6 cells/mL", "viable cell density"),
    Signal("dead_cells", "1e6 cells/mL", "dead, not yet lysed, cell density"),
    Signal("glucose", "g/L", "glucose"),
    Signal("glutamine", "mM", "glutamine"),
    Signal("lactate", "g/L", "lactate"),
    Signal("ammonia", "mM", "ammonia"),
    Signal("precursor_amino_acids", "mM", "leucine, phenylalanine and tyrosine, lumped"),
    Signal("inhibitor", "mM", "their secreted catabolites (isovalerate, 3-phenyllactate, 4-hydroxyphenyllactate), lumped"),
    Signal("manganese", "uM", "manganese, a trace supplement of the nutrient feed (not counted in the osmolality)"),
    Signal("mean_cell_age", "h", "mean time since division of the viable cells"),
    Signal("other_osmolytes", "mOsm/kg", "osmolytes other than the tracked solutes"),
    Signal("titer", "g/L", "product"),
    Signal("galactosylated_titer", "g/L", "galactosylated part of the product"),
    Signal("volume", "L", "working volume"),
    Signal("temperature", "degC", "culture temperature"),
    Signal("base_added", "L", "base added for pH control since inoculation"),
)


class InhibitorPlant(KineticsPlant[InhibitorKinetics]):
    """Growth ended by feed-derived inhibitors, cardinal-temperature growth, overflow glycolysis, productivity that ages."""

    name = "inhibitor"
    description = "amino-acid catabolites inhibit growth (more feed, more inhibitor), cardinal-temperature growth, overflow lactate, productivity falling with cell age"
    states = _STATES
    kinetics_type = InhibitorKinetics

    def initial_state(self, batch: BatchConfig) -> np.ndarray:
        inoculum = batch.inoculation
        medium = self.kinetics.medium
        x = self.inoculated_state(batch)
        index = self.state_index
        x[index("viable_cells")] = inoculum.viable_cell_density_1e6_per_ml
        x[index("precursor_amino_acids")] = medium.precursor_initial_mm
        x[index("inhibitor")] = 0.0
        x[index("manganese")] = medium.manganese_initial_um
        x[index("mean_cell_age")] = medium.inoculum_mean_cell_age_h
        other = inoculum.other_osmolytes_mosm_per_kg - medium.precursor_initial_mm
        if other < 0.0:
            raise ConfigError(
                f"inoculation.osmolality_mosm_per_kg: {inoculum.osmolality_mosm_per_kg} leaves {other:.0f} mOsm/kg for other osmolytes "
                f"after the precursor amino acids of plant {self.name!r}'s medium; expected a higher osmolality or a leaner medium"
            )
        x[index("other_osmolytes")] = other
        return x

    def true_parameters(self, batch: BatchConfig, factors: Mapping[str, float]) -> np.ndarray:
        """As for every plant; refused when the factors break the cardinal temperatures or the feed's precursor amino acids exceed the other osmolytes the batch file gives the feed."""
        vector = super().true_parameters(batch, factors)
        cardinal = [float(vector[self.parameter_index(f"growth.temperature_{which}_degc")]) for which in ("min", "opt", "max")]
        problem = cardinal_temperature_problem(*cardinal)
        if problem is not None:
            raise ConfigError(f"growth.temperature_opt_degc: {cardinal[1]:g} {problem}; expected other factors for plant {self.name!r}'s cardinal temperatures")
        precursor_mm = vector[self.parameter_index("medium.feed_precursor_mm")]
        other_mosm = vector[self.parameter_index("media.nutrient_feed_other_osmolytes_mosm_per_kg")]
        if precursor_mm > other_mosm:
            raise ConfigError(
                f"media.nutrient_feed_other_osmolytes_mosm_per_kg: {other_mosm:g} cannot hold the {precursor_mm:g} mM of precursor amino acids "
                f"plant {self.name!r} puts in the feed; expected a smaller medium.feed_precursor_mm factor"
            )
        return vector

    def equations(self, t: Any, x: Any, u: Any, p: Any) -> tuple[list[Any], Mapping[str, Any]]:
        s = {signal.name: x[i] for i, signal in enumerate(self.states)}
        k = {name: p[i] for i, name in enumerate(self.parameter_names)}
        xv, xd = s["viable_cells"], s["dead_cells"]
        glc, gln, lac, amm = s["glucose"], s["glutamine"], s["lactate"], s["ammonia"]
        precursor, inhibitor, manganese, age = s["precursor_amino_acids"], s["inhibitor"], s["manganese"], s["mean_cell_age"]
        volume, temperature = s["volume"], s["temperature"]
        feed, glucose_feed, setpoint = u[0], u[1], u[2]
        reference = k["temperature.reference_degc"]

        osmolality = s["other_osmolytes"] + glc * 1000.0 / GLUCOSE_G_PER_MOL + lac * 1000.0 / LACTATE_G_PER_MOL + gln + amm + precursor + inhibitor

        inhibitor_hill = k["growth.inhibitor_hill"]
        mu = (
            k["growth.mu_opt_per_h"]
            * cardinal_temperature_factor(temperature, k["growth.temperature_min_degc"], k["growth.temperature_opt_degc"], k["growth.temperature_max_degc"])
            * glc
            / (k["growth.k_glucose_g_per_l"] + glc)
            * gln
            / (k["growth.k_glutamine_mm"] + gln)
            * precursor
            / (k["growth.k_precursor_mm"] + precursor)
            / (1.0 + (inhibitor / k["growth.ki_inhibitor_mm"]) ** inhibitor_hill)
            * k["growth.ki_lactate_g_per_l"]
            / (k["growth.ki_lactate_g_per_l"] + lac)
            * k["growth.ki_ammonia_mm"]
            / (k["growth.ki_ammonia_mm"] + amm)
            * logistic_decline(osmolality, k["growth.osmolality_half_mosm_per_kg"], k["growth.osmolality_width_mosm_per_kg"])
        )

        k_inh_d, k_amm_d = k["death.k_inhibitor_mm"], k["death.k_ammonia_mm"]
        k_glc_starve, k_pre_starve = k["death.k_glucose_starvation_g_per_l"], k["death.k_precursor_starvation_mm"]
        kd = (
            k["death.kd_min_per_h"] * arrhenius_factor(k["death.activation_energy_kj_per_mol"], temperature, reference)
            + k["death.kd_inhibitor_max_per_h"] * inhibitor**2 / (k_inh_d**2 + inhibitor**2)
            + k["death.kd_ammonia_max_per_h"] * amm**2 / (k_amm_d**2 + amm**2)
            + k["death.kd_glucose_starvation_max_per_h"] * k_glc_starve**2 / (k_glc_starve**2 + glc**2)
            + k["death.kd_precursor_starvation_max_per_h"] * k_pre_starve**2 / (k_pre_starve**2 + precursor**2)
        )

        # Overflow: glycolysis (basal + growth-linked, saturating in glucose) against the oxidative capacity.
        metabolic = arrhenius_factor(k["metabolism.activation_energy_kj_per_mol"], temperature, reference)
        q_glucose = (
            (k["metabolism.glycolysis_basal_g_per_1e9_cells_h"] * metabolic + k["metabolism.glycolysis_per_growth_g_per_1e9_cells"] * mu)
            * glc
            / (k["metabolism.k_glycolysis_glucose_g_per_l"] + glc)
        )
        capacity = k["metabolism.oxidative_capacity_g_per_1e9_cells_h"] * metabolic
        overflow = smooth_positive(q_glucose - capacity, _SMOOTH_EPS_G_PER_1E9_CELLS_H)
        spare = smooth_positive(capacity - q_glucose, _SMOOTH_EPS_G_PER_1E9_CELLS_H)
        q_lactate_production = k["metabolism.lactate_per_overflow_g_per_g"] * overflow
        q_lactate_uptake = k["metabolism.lactate_per_spare_capacity_g_per_g"] * spare * lac / (k["metabolism.k_lactate_uptake_g_per_l"] + lac)

        q_glutamine = mu / k["metabolism.yield_cells_per_glutamine_1e9_per_mmol"] + k["metabolism.glutamine_maintenance_mmol_per_1e9_cells_h"] * metabolic * gln / (
            k["metabolism.k_glutamine_uptake_mm"] + gln
        )
        glutamine_degradation = k["metabolism.glutamine_degradation_per_h"] * gln

        q_product = (
            k["product.q_product_pg_per_cell_day"]
            * PG_PER_CELL_DAY_TO_G_PER_1E9_CELLS_H
            * cold_productivity_factor(temperature, reference, k["product.cold_gain"], k["product.cold_half_degc"], k["product.cold_width_degc"])
            / (1.0 + (age / k["product.age_half_h"]) ** k["product.age_hill"])
            * glc
            / (k["product.k_glucose_g_per_l"] + glc)
            * precursor
            / (k["product.k_precursor_mm"] + precursor)
        )
        new_galactosylated = k["product.galactosylated_base_fraction"] + (k["product.galactosylated_max_fraction"] - k["product.galactosylated_base_fraction"]) * manganese / (
            k["product.k_manganese_um"] + manganese
        )

        # Precursor amino acids: built into cells and product; catabolised (faster the more there is) to the inhibitor.
        q_catabolism = k["amino_acids.catabolism_max_mmol_per_1e9_cells_h"] * metabolic * precursor / (k["amino_acids.k_catabolism_mm"] + precursor)
        q_precursor = mu / k["amino_acids.yield_cells_per_precursor_1e9_per_mmol"] + k["amino_acids.precursor_per_product_mmol_per_g"] * q_product + q_catabolism
        q_inhibitor = k["amino_acids.inhibitor_per_catabolised_mol_per_mol"] * q_catabolism

        r_lactate = (q_lactate_production - q_lactate_uptake) * xv
        r_ammonia = (
            k["metabolism.ammonia_per_glutamine_mol_per_mol"] * q_glutamine + k["amino_acids.ammonia_per_catabolised_mol_per_mol"] * q_catabolism
        ) * xv + glutamine_degradation

        base_rate = k["measurement.base_per_lactate_mol_per_mol"] * smooth_positive(r_lactate, _SMOOTH_EPS_G_PER_L_H) * volume / LACTATE_G_PER_MOL / k["media.base_mol_per_l"]
        strength = k["media.nutrient_feed_strength"]
        inflow = feed + glucose_feed + base_rate
        dilution = inflow / volume
        feed_other_osmolytes = k["media.nutrient_feed_other_osmolytes_mosm_per_kg"] - k["medium.feed_precursor_mm"]

        dx = [
            (mu - kd - dilution) * xv,
            kd * xv - (k["death.lysis_per_h"] + dilution) * xd,
            (feed * strength * k["media.nutrient_feed_glucose_g_per_l"] + glucose_feed * k["media.glucose_feed_g_per_l"]) / volume - dilution * glc - q_glucose * xv,
            feed * strength * k["media.nutrient_feed_glutamine_mm"] / volume - dilution * gln - q_glutamine * xv - glutamine_degradation,
            r_lactate - dilution * lac,
            r_ammonia - dilution * amm,
            feed * strength * k["medium.feed_precursor_mm"] / volume - dilution * precursor - q_precursor * xv,
            q_inhibitor * xv - dilution * inhibitor,
            feed * strength * k["medium.feed_manganese_um"] / volume - dilution * manganese,
            1.0 - mu * age,
            (feed * strength * feed_other_osmolytes + base_rate * k["media.base_mol_per_l"] * k["media.base_osmoles_per_mol"] * 1000.0) / volume - dilution * s["other_osmolytes"],
            q_product * xv - dilution * s["titer"],
            new_galactosylated * q_product * xv - dilution * s["galactosylated_titer"],
            inflow,
            (setpoint - temperature) / k["temperature.lag_h"],
            base_rate,
        ]

        glucose_oxidised_mmol = (q_glucose - overflow) * 1000.0 / GLUCOSE_G_PER_MOL
        lactate_oxidised_mmol = q_lactate_uptake * 1000.0 / LACTATE_G_PER_MOL
        q_o2 = (
            _O2_PER_GLUCOSE_MOL_PER_MOL * glucose_oxidised_mmol + _O2_PER_LACTATE_MOL_PER_MOL * lactate_oxidised_mmol + k["measurement.o2_other_mmol_per_1e9_cells_h"] * metabolic
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
