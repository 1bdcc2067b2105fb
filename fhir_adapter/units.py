"""UCUM unit conversion for lab values, through ``ucumvert`` (a UCUM grammar on top of ``pint``).

Why ucumvert: it parses UCUM itself (``10*3/uL``, ``[lb_av]``, ``mg/dL``, annotations such as
``{Base}``), which plain ``pint`` does not, and hands the result to pint, a maintained units
library, for the arithmetic. Mass and substance concentrations (mg/dL vs mmol/L) convert only
with the analyte's molar mass, which the study definition gives; nothing is guessed.

Factors are cached per (unit, canonical unit, molar mass): converting a resource's value is
then one multiplication, which keeps the adapter's cost per resource where it was.
"""

from __future__ import annotations

from functools import lru_cache


class UnitError(ValueError):
    """A unit is not UCUM, or does not convert to the canonical unit."""


@lru_cache(maxsize=1)
def _registry():
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


@lru_cache(maxsize=4096)
def parse_ucum(code: str):
    """The pint quantity of one UCUM unit code; raises :class:`UnitError` if it is not UCUM."""
    try:
        return _registry().from_ucum(code)
    # ucumvert raises its own error types (and lark's) for codes outside the grammar.
    except Exception as exc:  # noqa: BLE001
        raise UnitError(f"{code!r} is not a UCUM unit") from exc


@lru_cache(maxsize=4096)
def conversion_factor(unit: str, canonical: str, molar_mass_g_per_mol: float | None = None) -> float:
    """Factor f with value_in_canonical = value_in_unit * f.

    Raises:
        UnitError: when either is not UCUM or the dimensions differ (a mass and a substance
            concentration convert only with ``molar_mass_g_per_mol``).
    """
    source, target = parse_ucum(unit), parse_ucum(canonical)
    registry = source._REGISTRY
    try:
        return float((1.0 * source).to(target.units).magnitude / target.magnitude)
    except Exception:  # noqa: BLE001  (pint's DimensionalityError; tried with the molar mass below)
        pass
    if molar_mass_g_per_mol:
        mass = registry.Quantity(float(molar_mass_g_per_mol), "g/mol")
        for quantity in ((1.0 * source) / mass, (1.0 * source) * mass):
            try:
                return float(quantity.to(target.units).magnitude / target.magnitude)
            except Exception:  # noqa: BLE001
                continue
    with_mass = f" (even with molar mass {molar_mass_g_per_mol:g} g/mol)" if molar_mass_g_per_mol else ""
    raise UnitError(f"{unit!r} does not convert to {canonical!r}{with_mass}")


def normalise_printed_unit(unit: str) -> str:
    """A printed unit (``Quantity.unit``) as UCUM would spell it: micro sign and Greek mu as u."""
    return unit.strip().replace("\u00b5", "u").replace("\u03bc", "u")
