"""Parameter sets of the CHO culture model: frozen pydantic models, loaded from YAML.

Every number carries its unit in its name. Magnitudes and their sources are in
``docs/model.md``. The model's CasADi parameter vector is the concatenation of
:class:`CultureParameters` (the cells' kinetics) and :class:`MediaComposition`
(what the feeds and the base contain), in :data:`PARAMETER_NAMES` order, so a
simulator, an estimator and an MPC can each hold a different set.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from plant_models.config_loading import FrozenConfig, load_yaml_model


class GrowthParameters(FrozenConfig):
    """Specific growth rate: Monod in glucose and glutamine, inhibited by metabolites, osmolality and age."""

    mu_max_per_h: float = Field(gt=0.0, le=0.2, description="maximum specific growth rate at the reference temperature [1/h]")
    k_glucose_g_per_l: float = Field(gt=0.0, description="Monod constant for glucose [g/L]")
    k_glutamine_mm: float = Field(gt=0.0, description="Monod constant for glutamine [mM]")
    ki_lactate_g_per_l: float = Field(gt=0.0, description="lactate concentration that halves growth [g/L]")
    ki_ammonia_mm: float = Field(gt=0.0, description="ammonia concentration that halves growth [mM]")
    osmolality_half_mosm_per_kg: float = Field(gt=200.0, lt=1000.0, description="osmolality that halves growth [mOsm/kg]")
    osmolality_width_mosm_per_kg: float = Field(gt=0.0, description="width of the osmolality inhibition step [mOsm/kg]")
    age_half_h: float = Field(gt=0.0, description="culture age at which the growth capacity has halved [h]")
    age_width_h: float = Field(gt=0.0, description="width of the age decline of growth capacity [h]")
    temperature_optimum_degc: float = Field(ge=30.0, le=40.0, description="culture temperature of fastest growth [°C]")
    temperature_curvature_per_degc2: float = Field(ge=0.0, description="growth falls by exp(-c*((T-Topt)^2-(Tref-Topt)^2)) away from the optimum [1/°C²]")


class DeathParameters(FrozenConfig):
    """Specific death rate: a basal rate plus lactate, ammonia and glucose-starvation terms."""

    kd_min_per_h: float = Field(ge=0.0, description="basal specific death rate at the reference temperature [1/h]")
    kd_lactate_max_per_h: float = Field(ge=0.0, description="maximum death rate caused by lactate [1/h]")
    k_lactate_g_per_l: float = Field(gt=0.0, description="lactate at half the maximum lactate-induced death [g/L]")
    kd_ammonia_max_per_h: float = Field(ge=0.0, description="maximum death rate caused by ammonia [1/h]")
    k_ammonia_mm: float = Field(gt=0.0, description="ammonia at half the maximum ammonia-induced death [mM]")
    kd_starvation_max_per_h: float = Field(ge=0.0, description="death rate under complete glucose starvation [1/h]")
    k_starvation_glucose_g_per_l: float = Field(gt=0.0, description="glucose below which starvation death sets in [g/L]")
    temperature_sensitivity_per_degc: float = Field(ge=0.0, description="basal death falls by exp(-s*(Tref-T)) below the reference [1/°C]")
    lysis_per_h: float = Field(ge=0.0, description="first-order lysis of dead cells [1/h]")


class MetabolismParameters(FrozenConfig):
    """Uptake of glucose and glutamine, lactate production and consumption, ammonia release."""

    yield_cells_per_glucose_1e9_per_g: float = Field(gt=0.0, description="cells formed per g glucose taken up for growth [1e9 cells/g]")
    glucose_maintenance_g_per_1e9_cells_h: float = Field(ge=0.0, description="non-growth glucose uptake [g/(1e9 cells·h)]")
    k_glucose_maintenance_g_per_l: float = Field(gt=0.0, description="Monod constant of maintenance glucose uptake [g/L]")
    yield_cells_per_glutamine_1e9_per_mmol: float = Field(gt=0.0, description="cells formed per mmol glutamine [1e9 cells/mmol]")
    glutamine_maintenance_mmol_per_1e9_cells_h: float = Field(ge=0.0, description="non-growth glutamine uptake [mmol/(1e9 cells·h)]")
    k_glutamine_maintenance_mm: float = Field(gt=0.0, description="Monod constant of maintenance glutamine uptake [mM]")
    glutamine_degradation_per_h: float = Field(ge=0.0, description="spontaneous glutamine degradation to ammonia [1/h]")
    lactate_yield_from_glucose_g_per_g: float = Field(ge=0.0, le=1.0, description="lactate formed per g of growth-associated glucose uptake [g/g]")
    lactate_uptake_max_g_per_1e9_cells_h: float = Field(ge=0.0, description="maximum specific lactate consumption [g/(1e9 cells·h)]")
    k_lactate_uptake_g_per_l: float = Field(gt=0.0, description="Monod constant of lactate consumption [g/L]")
    k_glucose_lactate_switch_g_per_l: float = Field(gt=0.0, description="glucose that halves lactate consumption (the metabolic shift) [g/L]")
    ammonia_yield_from_glutamine_mol_per_mol: float = Field(ge=0.0, le=2.0, description="ammonia released per glutamine taken up [mol/mol]")
    temperature_sensitivity_per_degc: float = Field(ge=0.0, description="maintenance and lactate uptake fall by exp(-s*(Tref-T)) [1/°C]")


class ProductParameters(FrozenConfig):
    """Specific productivity of the antibody and its quality attribute (galactosylated fraction)."""

    q_product_pg_per_cell_day: float = Field(ge=0.0, le=200.0, description="specific productivity at the reference temperature [pg/(cell·day)]")
    temperature_sensitivity_per_degc: float = Field(
        ge=-1.0, le=1.0, description="productivity changes by exp(s*(Tref-T)) below the reference: rises for s > 0, falls for s < 0 (cell-line specific) [1/°C]"
    )
    k_glucose_g_per_l: float = Field(gt=0.0, description="Monod constant of productivity in glucose [g/L]")
    galactosylated_max_fraction: float = Field(gt=0.0, le=1.0, description="galactosylated fraction of new product without stress [-]")
    galactosylation_ki_ammonia_mm: float = Field(gt=0.0, description="ammonia that halves galactosylation of new product [mM]")
    galactosylation_osmolality_half_mosm_per_kg: float = Field(gt=200.0, description="osmolality that halves galactosylation of new product [mOsm/kg]")
    galactosylation_osmolality_width_mosm_per_kg: float = Field(gt=0.0, description="width of the osmolality effect on galactosylation [mOsm/kg]")


class MeasurementParameters(FrozenConfig):
    """What links the states to the signals a plant measures online."""

    o2_per_growth_mmol_per_1e9_cells: float = Field(ge=0.0, description="oxygen taken up per cell formed [mmol/1e9 cells]")
    o2_maintenance_mmol_per_1e9_cells_h: float = Field(ge=0.0, description="maintenance oxygen uptake [mmol/(1e9 cells·h)]")
    respiratory_quotient: float = Field(gt=0.3, lt=2.0, description="CO2 evolved per O2 taken up [mol/mol]")
    base_per_lactate_mol_per_mol: float = Field(ge=0.0, le=2.0, description="base added per mol lactic acid formed [mol/mol]")
    capacitance_pf_per_cm_per_1e6_cells_ml: float = Field(gt=0.0, description="permittivity per viable cell density [pF/cm per 1e6 cells/mL]")


class TemperatureParameters(FrozenConfig):
    reference_degc: float = Field(ge=30.0, le=40.0, description="reference culture temperature of the kinetics [°C]")
    lag_h: float = Field(gt=0.0, le=24.0, description="time constant of culture temperature following its setpoint [h]")


CORRECTION_PREFIX = "culture.correction."
"""Parameter names of the corrections (:class:`CorrectionParameters`): zero in the mechanistic model, of either sign."""


def is_correction(name: str) -> bool:
    """Whether a parameter (``"culture.correction.product_age"``) is one of the model's corrections: zero in the mechanistic model."""
    return name.startswith(CORRECTION_PREFIX)


TEMPERATURE_SENSITIVITY_SUFFIX = ".temperature_sensitivity_per_degc"
"""Parameters ``s`` of a rate's ``exp(±s·(Tref − T))``: the coefficient of a temperature difference in an exponent."""


def is_additive(name: str) -> bool:
    """Whether ``calibrate`` fits a parameter additively (nominal + θ · scale) rather than as a multiplier of its nominal.

    The corrections, which are zero in the model, and the temperature sensitivities: "no temperature effect" (0) is a
    finite step from any nominal for them, where a multiplier puts it infinitely far (ln 0), so that records saying
    "no effect" looked as if they could not determine the parameter, and the fit put back the nominal they contradict.
    """
    return is_correction(name) or name.endswith(TEMPERATURE_SENSITIVITY_SUFFIX)


CORRECTION_AGE_REFERENCE_H = 168.0
"""Culture age at which the age terms of :class:`CorrectionParameters` are zero, and their unit of age [h]."""


class CorrectionParameters(FrozenConfig):
    """Data-driven corrections of four specific rates, learned from a site's batch records (all zero: the mechanistic model as written).

    Each rate r (growth, death, glucose uptake, productivity) is multiplied by
    ``exp(a·ΔT + b·ΔT² + c·age)`` with ΔT = T − T_ref [°C] and
    age = (t − 168 h) / 168 h. These are the shapes in which cell lines are
    known to differ from any one mechanistic model (the sign and curvature of a
    temperature effect, a rate that rises or falls with culture age); the
    mechanistic terms stay, and ``calibrate`` fits these about zero with a prior
    and drops any the records cannot determine (docs/model.md, "Corrections").
    """

    growth_temperature_per_degc: float = Field(default=0.0, ge=-1.0, le=1.0)
    growth_temperature2_per_degc2: float = Field(default=0.0, ge=-0.2, le=0.2)
    growth_age: float = Field(default=0.0, ge=-3.0, le=3.0)
    death_temperature_per_degc: float = Field(default=0.0, ge=-1.0, le=1.0)
    death_temperature2_per_degc2: float = Field(default=0.0, ge=-0.2, le=0.2)
    death_age: float = Field(default=0.0, ge=-3.0, le=3.0)
    glucose_uptake_temperature_per_degc: float = Field(default=0.0, ge=-1.0, le=1.0)
    glucose_uptake_temperature2_per_degc2: float = Field(default=0.0, ge=-0.2, le=0.2)
    glucose_uptake_age: float = Field(default=0.0, ge=-3.0, le=3.0)
    product_temperature_per_degc: float = Field(default=0.0, ge=-1.0, le=1.0)
    product_temperature2_per_degc2: float = Field(default=0.0, ge=-0.2, le=0.2)
    product_age: float = Field(default=0.0, ge=-3.0, le=3.0)


class ValueRange(FrozenConfig):
    low: float
    high: float


class PhaseEnvelope(FrozenConfig):
    """What the calibration data covered in one process phase: the model has been checked only inside this."""

    phase: str = Field(min_length=1)
    start_h: float = Field(ge=0.0, description="phase start [h]")
    end_h: float = Field(gt=0.0, description="phase end [h]")
    temperature_degc: ValueRange = Field(description="culture temperature setpoints seen [°C]")
    feed_per_volume_per_day: ValueRange = Field(description="nutrient feed delivered per culture volume [L/(L·day)]")
    glucose_feed_per_volume_per_day: ValueRange = Field(description="glucose feed delivered per culture volume [L/(L·day)]")
    glucose_g_per_l: ValueRange = Field(description="glucose measured by the lab [g/L]")
    batches: int = Field(ge=0, description="batches with data in this phase")


class ParameterEstimate(FrozenConfig):
    """One calibrated parameter: its nominal and fitted value and the 95 % confidence interval of the fit."""

    nominal: float
    value: float
    ci95_low: float | None = Field(description="lower end of the 95 % interval; none when not identifiable")
    ci95_high: float | None = Field(description="upper end of the 95 % interval; none when not identifiable")
    identifiable: bool = Field(description="false: the data could not determine it, and it stays at nominal")


class ModelProvenance(FrozenConfig):
    """Where a calibrated parameter set came from; written by ``bioreactor-mpc calibrate``, read by people and auditors."""

    created_utc: str
    tool: str
    tool_version: str = Field(default="", description="the installed bioreactor-mpc that made it (empty: a file written before 8 Dec 2026, which did not say)")
    based_on: str = Field(description="the parameter file the fit started from")
    inputs: tuple[tuple[str, str], ...] = Field(description="(file, sha-256) of every batch record read")
    batches: tuple[str, ...]
    parameters: dict[str, ParameterEstimate]
    not_identifiable: tuple[str, ...] = Field(description="parameters the data could not determine: kept at nominal")
    fit_statistics: dict[str, float]
    cross_validation: dict[str, float] = Field(default_factory=dict, description="relative RMSE on batches left out, nominal vs calibrated")
    batch_statistics: dict[str, dict[str, float]] = Field(default_factory=dict, description="per batch: reduced χ² and relative RMSE of VCD, titer and glucose")
    warnings: tuple[str, ...] = Field(default=(), description="what a reviewer must look at before deploying this model")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "the calibration settings the fit ran with, whole (which parameters and corrections were fitted, the priors, bounds,"
            " measurement sds, grid and phases): what a reviewer needs to fit the same records again the same way. Empty: a file"
            " written before 8 Dec 2026, which did not say"
        ),
    )


METADATA_FIELDS = frozenset({"provenance", "envelope"})
"""Fields of a parameter file that describe it rather than parameterise the model (not in the parameter vector)."""


class CultureParameters(FrozenConfig):
    """The kinetics of one cell line: what the simulator calls 'true' and the MPC calls 'nominal'.

    A calibrated set also carries its ``provenance`` and the ``envelope`` its
    data covered; neither enters the model's parameter vector.
    """

    growth: GrowthParameters
    death: DeathParameters
    metabolism: MetabolismParameters
    product: ProductParameters
    measurement: MeasurementParameters
    temperature: TemperatureParameters
    correction: CorrectionParameters = CorrectionParameters()
    provenance: ModelProvenance | None = None
    envelope: tuple[PhaseEnvelope, ...] = ()

    @property
    def calibrated(self) -> bool:
        """Fitted to a plant's records (it carries a calibration's provenance): it needs an engineer's approval to run, and without an
        envelope its trust region is the recipe band held at its start (controller.trust.TrustRegion)."""
        return self.provenance is not None

    @classmethod
    def from_yaml(cls, path: str | Path) -> CultureParameters:
        return load_yaml_model(path, cls)


class MediaComposition(FrozenConfig):
    """What the feeds and the base carry into the reactor."""

    nutrient_feed_glucose_g_per_l: float = Field(ge=0.0, le=700.0, description="glucose in the nutrient feed [g/L]")
    nutrient_feed_glutamine_mm: float = Field(ge=0.0, le=500.0, description="glutamine (and amino-acid nitrogen, as glutamine equivalents) in the nutrient feed [mM]")
    nutrient_feed_other_osmolytes_mosm_per_kg: float = Field(ge=0.0, le=3000.0, description="osmolytes of the nutrient feed other than glucose and glutamine [mOsm/kg]")
    nutrient_feed_strength: float = Field(default=1.0, gt=0.0, le=2.0, description="concentration of this feed lot relative to its specification [-]")
    glucose_feed_g_per_l: float = Field(gt=0.0, le=700.0, description="glucose in the glucose feed [g/L]")
    base_mol_per_l: float = Field(gt=0.0, le=10.0, description="base concentration [mol/L]")
    base_osmoles_per_mol: float = Field(ge=0.0, le=3.0, description="osmoles the base leaves in the culture per mol [osmol/mol]")

    def glucose_delivered_g(self, feed_total_l: float, glucose_feed_total_l: float) -> float:
        """Glucose the two feeds have delivered, from their totalisers [g] (what the recipe's glucose arithmetic needs)."""
        return feed_total_l * self.nutrient_feed_glucose_g_per_l + glucose_feed_total_l * self.glucose_feed_g_per_l


def flat_values(model: FrozenConfig, prefix: str = "") -> list[tuple[str, float]]:
    items: list[tuple[str, float]] = []
    for name in type(model).model_fields:
        if name in METADATA_FIELDS:
            continue
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, FrozenConfig):
            items.extend(flat_values(value, prefix=f"{key}."))
        else:
            items.append((key, float(value)))
    return items


def _field_names(model_cls: type[FrozenConfig], prefix: str = "") -> list[str]:
    names: list[str] = []
    for name, info in model_cls.model_fields.items():
        if name in METADATA_FIELDS:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, FrozenConfig):
            names.extend(_field_names(annotation, prefix=f"{prefix}{name}."))
        else:
            names.append(f"{prefix}{name}")
    return names


PARAMETER_NAMES: tuple[str, ...] = tuple([f"culture.{name}" for name in _field_names(CultureParameters)] + [f"media.{name}" for name in _field_names(MediaComposition)])
"""Names of the model's parameter vector entries, in order."""


def parameter_vector(culture: CultureParameters, media: MediaComposition) -> np.ndarray:
    """The numeric parameter vector the CasADi model takes, in :data:`PARAMETER_NAMES` order."""
    values = [value for _, value in flat_values(culture)] + [value for _, value in flat_values(media)]
    return np.asarray(values, dtype=float)


def parameter_bounds(name: str) -> tuple[float, float]:
    """The range a culture parameter (``"culture.growth.mu_max_per_h"``) may take by its schema; strict bounds as the closed range inside them."""
    group, _, field = name.removeprefix("culture.").partition(".")
    info = CultureParameters.model_fields.get(group) if name.startswith("culture.") and group not in METADATA_FIELDS else None
    owner = info.annotation if info is not None else None
    if not (isinstance(owner, type) and issubclass(owner, FrozenConfig)) or field not in owner.model_fields:
        raise KeyError(f"unknown culture parameter {name!r}; names look like 'culture.growth.mu_max_per_h'")
    low, high = -math.inf, math.inf
    for rule in owner.model_fields[field].metadata:
        if (ge := getattr(rule, "ge", None)) is not None:
            low = max(low, float(ge))
        if (gt := getattr(rule, "gt", None)) is not None:
            low = max(low, math.nextafter(float(gt), math.inf))
        if (le := getattr(rule, "le", None)) is not None:
            high = min(high, float(le))
        if (lt := getattr(rule, "lt", None)) is not None:
            high = min(high, math.nextafter(float(lt), -math.inf))
    return low, high


def replaced_parameters(culture: CultureParameters, values: dict[str, float]) -> CultureParameters:
    """A copy of ``culture`` with named entries (``"growth.mu_max_per_h"``) set to new values, validated again."""
    data = culture.model_dump(exclude=set(METADATA_FIELDS))
    for dotted, value in values.items():
        group, _, field = dotted.partition(".")
        if group not in data or field not in data[group]:
            raise KeyError(f"unknown culture parameter {dotted!r}; names look like 'growth.mu_max_per_h'")
        data[group][field] = value
    return CultureParameters.model_validate(data)


def scaled_parameters(culture: CultureParameters, factors: dict[str, float]) -> CultureParameters:
    """A copy of ``culture`` with named entries (``"growth.mu_max_per_h"``) multiplied by factors.

    Validation runs again on the result, so a perturbation cannot produce an
    invalid parameter set silently.
    """
    current = dict(flat_values(culture))
    zero = [dotted for dotted, factor in factors.items() if current.get(dotted) == 0.0 and factor != 1.0]
    if zero:
        raise ValueError(f"{zero} {'is' if len(zero) == 1 else 'are'} zero, and a factor cannot change that (a correction is set, not scaled)")
    return replaced_parameters(culture, {dotted: current.get(dotted, math.nan) * factor for dotted, factor in factors.items()})
