"""One steering spec for every face: ``SteerSpec`` names a steer by its SAE's key, so it is
plain data (JSON, a CLI word, a row of a saved experiment) and is validated before any model
runs. ``resolve`` turns specs into ``scope.steer.Steer`` objects against the loaded SAEs.

    SteerSpec(sae="L12.res.16k", feature=1234, strength=8)              # add 8 along the feature
    SteerSpec.parse("L12.res.16k/1234:4xmax")                             # 4x its recorded max
    SteerSpec.parse("L12.res.16k/1234:30:clamp@generated")                # clamp while generating
    SteerSpec.from_dict({"sae": "L12.res.16k", "feature": 1234, "mode": "ablate"})

The CLI form is ``KEY/FEATURE:STRENGTH[:MODE][@POSITIONS]``: the strength may end in ``xmax``
or ``xnorm`` for those units, and ablate needs none (``KEY/FEATURE:ablate``). Every error is a
``SpecError`` that names the field (``strength``, ``steer[0].feature`` ...) and the fix.

Unit max is resolved here and nowhere else: ``resolve`` (and ``with_maxes``, for steers built
in code) read each feature's recorded max from the store once and hand ``Steer`` the number;
steering and generation never see a store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from scope.errors import ScopeError, closest
from scope.identity import recorded_key, sae_info, sae_keys
from scope.steer import MODES, POSITIONS, STRENGTH_LIMITS, UNITS, Steer, missing_max

if TYPE_CHECKING:
    from scope.store import Store


class SpecError(ScopeError):
    """A steering spec that cannot run; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """The field at fault, e.g. ``strength`` or ``steer[1].sae``."""
        self.detail = message
        """The message without the field."""

    def at(self, prefix: str) -> SpecError:
        """The same error for a spec that sits at ``prefix`` (``steer[0]``) of a larger input."""
        return SpecError(f"{prefix}.{self.field}", self.detail)


@dataclass(frozen=True, kw_only=True)
class SteerSpec:
    """One intervention on one feature, named by the SAE's key: plain, serialisable data."""

    sae: str
    """The SAE's key, e.g. ``L12.res.16k`` (``scope saes`` and a store's ``saes`` list them)."""
    feature: int
    """The feature's index in that SAE."""
    strength: float = 0.0
    """add: how far along the feature's unit decoder direction (unit max: a multiple of its
    recorded max; unit norm: a fraction of the activation's norm); clamp: the activation to
    set; ablate: 0."""
    mode: str = "add"
    """add, clamp or ablate."""
    unit: str = "absolute"
    """add only: absolute, max (the feature's recorded max, from a store) or norm."""
    positions: str = "all"
    """prompt, generated or all. BOS is never steered."""

    def __post_init__(self) -> None:
        if not isinstance(self.sae, str) or not self.sae.strip():
            raise SpecError("sae", f"{self.sae!r} is not an SAE key: give one like 'L12.res.16k'")
        if isinstance(self.feature, bool) or not isinstance(self.feature, int):
            raise SpecError("feature", f"{self.feature!r} is not a whole number: give e.g. 1234")
        if self.feature < 0:
            raise SpecError("feature", f"{self.feature} is negative: features count from 0")
        for name, allowed in (("mode", MODES), ("unit", UNITS), ("positions", POSITIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise SpecError(name, f"{value!r} is not one of {', '.join(allowed)}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, int | float):
            raise SpecError("strength", f"{self.strength!r} is not a number: give e.g. 8 or -4")
        if not math.isfinite(self.strength):
            raise SpecError(
                "strength", f"{self.strength} is not a finite number: give e.g. 8 or -4"
            )
        limit = STRENGTH_LIMITS[self.unit]
        if abs(self.strength) > limit:
            raise SpecError(
                "strength",
                f"{self.strength:g} is absurd for unit {self.unit!r} (limit ±{limit:g}); typical "
                "values are a few times the feature's max activation",
            )
        if self.unit != "absolute" and self.mode != "add":
            raise SpecError(
                "unit", f"{self.unit!r} applies to mode 'add' only; clamp values are activations"
            )
        if self.mode == "ablate" and self.strength != 0:
            raise SpecError(
                "strength",
                f"{self.strength:g} with mode 'ablate', which sets the feature to 0: leave the "
                "strength out, or clamp to a value",
            )

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data; ``from_dict`` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SteerSpec:
        """A spec from JSON-like data (a request's ``steer`` item, a saved row). Unknown keys
        are refused, with the closest known one named."""
        if not isinstance(data, Mapping):
            raise SpecError(
                "steer", f"{data!r} is not an object: give {{'sae': KEY, 'feature': N, ...}}"
            )
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                near = closest(str(key), names, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(names)}"
                raise SpecError(str(key), f"is not a steering field ({hint})")
        for key in ("sae", "feature"):
            if key not in data:
                raise SpecError(key, "is missing: every steer names its SAE key and feature")
        return cls(**dict(data))

    @classmethod
    def parse(cls, text: str) -> SteerSpec:
        """A spec from its CLI form ``KEY/FEATURE:STRENGTH[:MODE][@POSITIONS]`` (strength
        ``4xmax`` or ``0.5xnorm`` for those units; ``KEY/FEATURE:ablate`` needs none)."""
        form = "KEY/FEATURE:STRENGTH[:MODE][@POSITIONS], e.g. L12.res.16k/1234:8"
        key, slash, rest = text.strip().rpartition("/")
        rest, at, positions = rest.partition("@")
        parts = rest.split(":")
        if not slash or not key or len(parts) not in (2, 3):
            raise SpecError("steer", f"{text!r} is not {form}")
        if not re.fullmatch(r"\d+", parts[0]):
            raise SpecError("feature", f"{parts[0]!r} in {text!r} is not a feature index ({form})")
        kw: dict[str, Any] = {"positions": positions} if at else {}
        if len(parts) == 2 and parts[1] in MODES:  # KEY/FEATURE:ablate
            kw["mode"] = parts[1]
        else:
            strength = re.fullmatch(r"(.+?)(?:x(max|norm))?", parts[1])
            try:
                kw["strength"] = float(strength.group(1)) if strength else math.nan
            except ValueError:
                kw["strength"] = math.nan
            if not strength or math.isnan(kw["strength"]):
                raise SpecError(
                    "strength", f"{parts[1]!r} in {text!r} is not a number (8, -4, 4xmax, 0.5xnorm)"
                )
            if strength.group(2):
                kw["unit"] = strength.group(2)
            if len(parts) == 3:
                kw["mode"] = parts[2]
        return cls(sae=key, feature=int(parts[0]), **kw)

    def __str__(self) -> str:
        """The CLI form, which ``parse`` reads back."""
        if self.mode == "ablate":
            head = f"{self.sae}/{self.feature}:ablate"
        else:
            unit = {"absolute": "", "max": "xmax", "norm": "xnorm"}[self.unit]
            mode = "" if self.mode == "add" else f":{self.mode}"
            head = f"{self.sae}/{self.feature}:{self.strength:g}{unit}{mode}"
        return head if self.positions == "all" else f"{head}@{self.positions}"

    @classmethod
    def of(cls, steer: Steer, key: str | None = None) -> SteerSpec:
        """The spec of a ``Steer``, under ``key`` (default: its SAE's short key)."""
        return cls(sae=key or steer.key, feature=steer.feature, strength=steer.strength,
                   mode=steer.mode, unit=steer.unit, positions=steer.positions)  # fmt: skip


def sae_map(saes: Sequence[Any], store: Store | None = None) -> dict[str, Any]:
    """The keys a spec may name each of ``saes`` by: its key among them (``L12.res.16k``, or
    ``L12.res.16k.l0_71`` when several share a layer, site and width) and, when ``store``
    recorded it, the store's key for it."""
    found: dict[str, Any] = {}
    for key, sae in zip(sae_keys([sae_info(s) for s in saes]), saes, strict=True):
        found[key] = sae
        if store is not None:
            found.setdefault(recorded_key(sae, store.saes) or key, sae)
    return found


def feature_max(store: Store, sae: Any, feature: int) -> float:
    """The feature's recorded max activation in ``store`` (its SAE with the same weights): the
    number ``Steer(..., unit="max", max_act=...)`` takes. Refuses an SAE the store did not
    record and a feature that never fired."""
    key = recorded_key(sae, store.saes)
    if key is None:
        raise ScopeError(
            f"the store {store.root} did not record this SAE ({sae_info(sae).key}; it has "
            f"{', '.join(store.saes)}): record it, or steer with unit 'absolute'"
        )
    rows = store.sql(
        "select max from features where sae = ? and feature = ?", [key, feature]
    ).fetchall()
    top = float(rows[0][0]) if rows else 0.0
    if top <= 0:
        raise ScopeError(
            f"{key}/{feature} never fired in {store.root}: its max is 0, so unit 'max' means nothing"
        )
    return top


def with_maxes(steers: Sequence[Steer], store: Store | None) -> list[Steer]:
    """``steers`` with every unit-max steer's ``max_act`` filled in from ``store`` (looked up
    once per feature); steers that have it, or need none, are kept as they are. Refuses a
    unit-max steer without its max when there is no store."""
    found: dict[tuple[int, int], float] = {}
    out = []
    for s in steers:
        if s.unit != "max" or s.max_act is not None:
            out.append(s)
            continue
        if store is None:
            raise missing_max(s)
        at = (id(s.sae), s.feature)
        if at not in found:
            found[at] = feature_max(store, s.sae, s.feature)
        out.append(replace(s, max_act=found[at]))
    return out


def resolve(
    specs: Sequence[SteerSpec],
    saes: Mapping[str, Any],
    store: Store | None = None,
    where: str = "steer",
) -> list[Steer]:
    """``Steer`` objects for ``specs`` against ``saes`` (key -> SAE, e.g. ``sae_map``), unit
    max given its recorded max from ``store`` once per feature. Errors name the spec as
    ``where[i]`` and the field: an unknown key, a feature out of range, a max not recorded."""
    steers = []
    for i, spec in enumerate(specs):
        sae = saes.get(spec.sae)
        if sae is None:
            near = closest(spec.sae, saes, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SpecError(
                f"{where}[{i}].sae",
                f"{spec.sae!r} is not loaded{hint}: the SAE keys here are {', '.join(saes)}",
            )
        d_sae = sae.cfg.d_sae
        if spec.feature >= d_sae:
            raise SpecError(
                f"{where}[{i}].feature",
                f"{spec.feature} is out of range: {spec.sae} has features 0..{d_sae - 1}",
            )
        steer = Steer(sae, spec.feature, spec.strength, mode=spec.mode, unit=spec.unit,
                      positions=spec.positions)  # fmt: skip
        try:
            steers.extend(with_maxes([steer], store))
        except ScopeError as e:
            raise SpecError(f"{where}[{i}].unit", str(e)) from None
    return steers


__all__ = ["SpecError", "SteerSpec", "feature_max", "resolve", "sae_map", "with_maxes"]
