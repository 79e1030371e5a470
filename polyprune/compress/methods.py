"""The compression methods: one record each, the one place that names them.

Everything else asks this registry: the CLI's ``--method`` choices, help and its check that a
calibrating method was given ``--calib``; ``polyprune.prune`` / ``polyprune.quantize``
validation and the settings the manifest records; the matrix config's method check; and the
engine's dispatch (``polyprune.compress.engine``), which imports each record's ``solver`` by
its name. No torch here, so ``polyprune --help`` and config checks stay fast.

Adding a method: its solver file (with an engine entry point ``solve(W, stats, cfg, name,
segments) -> SolverResult``), one :func:`register` call below, its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from polyprune.errors import InputError

__all__ = [
    "Kind",
    "MethodSpec",
    "Statistic",
    "allowed",
    "get_method",
    "method_names",
    "methods",
    "register",
]

Kind = Literal["prune", "quantize"]
Statistic = Literal["hessian", "colsq"]  # as polyprune.compress.stats.StatKind
KINDS: tuple[Kind, ...] = ("prune", "quantize")


@dataclass(frozen=True)
class MethodSpec:
    """One compression method as every layer sees it.

    ``solver`` is ``"module:function"`` of the engine entry point, imported only when the
    engine runs. ``stacked``: Linears that read the same input are solved as one stacked
    weight (one Hessian factorisation for q/k/v). ``joint_quant``: a pruning method that also
    takes a quantisation grid (``--bits``) in the same pass. ``settings``: the keys it records
    under the manifest's ``settings``, in order.
    """

    name: str
    kind: Kind
    statistic: Statistic | None  # None: data-free, no calibration text
    solver: str
    help: str
    stacked: bool = False
    joint_quant: bool = False
    settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.joint_quant and self.kind != "prune":
            raise ValueError(f"method {self.name}: only a pruning method quantises jointly")

    @property
    def data_free(self) -> bool:
        return self.statistic is None

    @property
    def takes_quant(self) -> bool:
        """Whether a quantisation config (bits, grid) applies: quantisers and joint pruners."""
        return self.kind == "quantize" or self.joint_quant


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def methods(kind: Kind | None = None) -> tuple[MethodSpec, ...]:
    """The registered methods (of ``kind``), in registration order."""
    return tuple(s for s in _REGISTRY.values() if kind is None or s.kind == kind)


def method_names(kind: Kind | None = None) -> tuple[str, ...]:
    return tuple(s.name for s in methods(kind))


def allowed(names: tuple[str, ...] | list[str], last: str = ", ") -> str:
    """``"a, b, c"``, or with ``last=" or "`` ``"a, b or c"``."""
    names = list(names)
    return ", ".join(names[:-1]) + last + names[-1] if len(names) > 1 else "".join(names)


def get_method(name: str, kind: Kind | None = None) -> MethodSpec:
    """The method called ``name`` (of ``kind``); InputError naming the allowed ones if none."""
    spec = _REGISTRY.get(name)
    if spec is None or (kind is not None and spec.kind != kind):
        raise InputError(f"unknown method {name!r}; allowed: {allowed(method_names(kind))}")
    return spec


_PRUNE_SETTINGS = ("sparsity", "pattern")
_HESSIAN_SETTINGS = ("blocksize", "percdamp")

register(MethodSpec(
    "magnitude", "prune", None, "polyprune.compress.solve:magnitude",
    help="smallest |W| per row (data-free)", settings=_PRUNE_SETTINGS,
))  # fmt: skip
register(MethodSpec(
    "wanda", "prune", "colsq", "polyprune.compress.solve:wanda",
    help="smallest |W| x input norm per row (Sun et al. 2023)", settings=_PRUNE_SETTINGS,
))  # fmt: skip
register(MethodSpec(
    "sparsegpt", "prune", "hessian", "polyprune.compress.solve:sparsegpt",
    help="OBS pruning with weight updates (Frantar & Alistarh 2023); --bits also quantises",
    stacked=True, joint_quant=True, settings=_PRUNE_SETTINGS + _HESSIAN_SETTINGS,
))  # fmt: skip
register(MethodSpec(
    "gptq", "quantize", "hessian", "polyprune.compress.solve:gptq",
    help="OBS quantisation with weight updates (Frantar et al. 2023)",
    stacked=True, settings=_HESSIAN_SETTINGS,
))  # fmt: skip
register(MethodSpec(
    "rtn", "quantize", None, "polyprune.compress.solve:rtn",
    help="round to nearest on the grid (data-free)",
))  # fmt: skip
