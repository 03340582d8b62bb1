"""Resolve a calculator name into a picklable factory of ASE calculators.

Kept free of training imports: the relaxer's ``--refine`` option reuses :func:`resolve_calculator`.

Names:

* ``emt``: ASE's EMT (Al, Cu, Ag, Au, Ni, Pd, Pt; H, C, N, O only roughly);
* ``sevennet``: SevenNet-0 (``sevenn``'s ``SevenNetCalculator(model="7net-0")``);
* ``chgnet``: CHGNet's pretrained ``CHGNetCalculator``;
* ``module:Class``: any importable callable returning a calculator (e.g.
  ``ase.calculators.emt:EMT``), called with no arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

BUILTIN = ("emt", "sevennet", "chgnet")
_EMT_ELEMENTS = (1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79)


@dataclass(frozen=True)
class CalculatorFactory:
    """A zero-argument, picklable callable that builds a fresh ASE calculator.

    Attributes:
        spec: the name it was resolved from.
        name: teacher name recorded in pair metadata (e.g. ``"SevenNet-0"``).
        elements: atomic numbers the calculator supports, or None for (nearly) all.
        kwargs: keyword arguments for the calculator's constructor.
    """

    spec: str
    name: str
    elements: tuple | None = None
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        spec = self.spec
        if spec == "emt":
            from ase.calculators.emt import EMT

            return EMT(**self.kwargs)
        if spec == "sevennet":
            from sevenn.calculator import SevenNetCalculator

            return SevenNetCalculator(**{"model": "7net-0", **self.kwargs})
        if spec == "chgnet":
            from chgnet.model.dynamics import CHGNetCalculator

            return CHGNetCalculator(**self.kwargs)
        module_name, attr = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), attr)(**self.kwargs)


def _require(module: str, spec: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"calculator {spec!r} needs the package {package!r}, which is not installed")


def resolve_calculator(spec: str, **kwargs) -> CalculatorFactory:
    """Turn a calculator name into a picklable factory, checking that it can be built.

    Args:
        spec: ``emt``, ``sevennet``, ``chgnet`` or ``module:Class``.
        **kwargs: passed to the calculator's constructor (e.g. ``device="cuda"`` for SevenNet).

    Returns:
        A :class:`CalculatorFactory`; calling it builds a new calculator.

    Raises:
        ImportError: if the package behind the name is not installed.
        ValueError: if the name is unknown or ``module:Class`` does not resolve.
    """
    spec = str(spec).strip()
    lowered = spec.lower()
    if lowered == "emt":
        return CalculatorFactory("emt", "EMT", _EMT_ELEMENTS, dict(kwargs))
    if lowered in ("sevennet", "7net-0", "sevennet-0"):
        _require("sevenn", spec, "sevenn")
        return CalculatorFactory("sevennet", "SevenNet-0", None, dict(kwargs))
    if lowered == "chgnet":
        _require("chgnet", spec, "chgnet")
        return CalculatorFactory("chgnet", "CHGNet", None, dict(kwargs))
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"calculator {spec!r}: cannot import module {module_name!r} ({exc})") from exc
        if not callable(getattr(module, attr, None)):
            raise ValueError(f"calculator {spec!r}: module {module_name!r} has no callable {attr!r}")
        return CalculatorFactory(spec, spec, None, dict(kwargs))
    raise ValueError(f"unknown calculator {spec!r}: use emt, sevennet, chgnet or module:Class")
