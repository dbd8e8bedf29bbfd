"""Shift pools: a named, ordered set of shifts of one method over one base (one LoRA or SSF per domain).

A pool is what per-input routing mixes (:func:`shiftkit.merging.routing.attach_router_`): member ``j`` is the
``j``-th row of the mixing weights ``α(x) ∈ R^{B×N}``. FedIns (Feng et al., ICCV 2023,
https://arxiv.org/abs/2308.06051) keeps an SSF pool and picks members per instance; PSEC (Liu et al.,
ICLR 2025, https://arxiv.org/abs/2502.05932) keeps a LoRA "skill library" and composes it per state.

Members must agree: the same method, the same targeted modules with the same shapes (``base``), the same
tensor keys and shapes — LoRA members may differ only in their rank ``r`` (and ``lora_alpha``), because
routing concatenates the factors along the rank axis. Anything else raises :class:`ShiftMismatchError`
naming the member and the key.

File: one safetensors file, tensors keyed ``<member>/<tensor key>``, metadata ``"shiftkit_pool"`` holding
JSON ``{"format_version", "shiftkit_version", "order": [names], "members": {name: {"method", "config",
"base"}}}``. Written atomically, never pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from shiftkit.core.attach import attach_, detach_
from shiftkit.core.config import config_to_dict
from shiftkit.core.delta import to_delta
from shiftkit.core.encoding import decoded
from shiftkit.core.io import atomic_save_tensors
from shiftkit.core.registry import config_from_dict
from shiftkit.core.shift import DELTA, Shift, split_key
from shiftkit.errors import CorruptFileError, ShiftkitError, ShiftMismatchError

__all__ = ["POOL_FORMAT_VERSION", "ShiftPool"]

POOL_FORMAT_VERSION = 1
POOL_META_KEY = "shiftkit_pool"
_SEP = "/"


def _shape_ok(method: str, key: str, ref: tuple[int, ...], got: tuple[int, ...]) -> bool:
    if ref == got:
        return True
    if method != "lora" or len(ref) != len(got):
        return False
    # LoRA ranks may differ: A is (r, in, ...), B is (out, r, ...); routing concatenates along r
    role = key.rsplit(".", 1)[-1]
    axis = {"lora_A": 0, "lora_B": 1}.get(role)
    return axis is not None and all(
        a == b for i, (a, b) in enumerate(zip(ref, got, strict=True)) if i != axis
    )


class ShiftPool:
    """An ordered, named set of compatible shifts over one base model.

    Args:
        members: ``{name: Shift}`` (insertion order is the pool order) or ``(name, Shift)`` pairs.

    Raises:
        ShiftMismatchError: members of different methods, target modules, keys or shapes.
        ShiftkitError: a bad or duplicate name (names are non-empty and contain no ``/``).

    Example:
        >>> pool = ShiftPool({"books": sk.load("books.safetensors"), "movies": sk.load("movies.safetensors")})
        >>> pool.names()
        ['books', 'movies']
    """

    def __init__(self, members: Mapping[str, Shift] | Iterable[tuple[str, Shift]] | None = None) -> None:
        self._members: dict[str, Shift] = {}
        items = members.items() if isinstance(members, Mapping) else (members or ())
        for name, shift in items:
            self.add(name, shift)

    # --- container ------------------------------------------------------------------------------
    @property
    def method(self) -> str | None:
        """The members' method (``"lora"``, ``"ssf"``, ``"delta"`` ...), ``None`` for an empty pool."""
        first = next(iter(self._members.values()), None)
        return None if first is None else first.method

    @property
    def base(self) -> dict[str, tuple[int, ...]]:
        """The targeted modules (or parameters, for deltas) and their shapes, shared by every member."""
        first = next(iter(self._members.values()), None)
        return {} if first is None else dict(first.base)

    def add(self, name: str, shift: Shift) -> None:
        """Append ``shift`` under ``name`` after checking it fits the pool.

        Args:
            name: member name, unique, non-empty, without ``/``.
            shift: a Shift of the pool's method over the same modules and shapes.

        Raises:
            ShiftMismatchError: the shift differs from the first member (method, modules, keys, shapes).
            ShiftkitError: a bad or duplicate name, or not a Shift.

        Example:
            >>> pool = ShiftPool()
            >>> pool.add("books", sk.load("books.safetensors"))
            >>> len(pool)
        """
        if not isinstance(name, str) or not name or _SEP in name:
            raise ShiftkitError(f"pool member names must be non-empty strings without '/', got {name!r}")
        if name in self._members:
            raise ShiftkitError(f"the pool already has a member {name!r}; remove it first")
        if not isinstance(shift, Shift):
            raise ShiftkitError(f"pool member {name!r} must be a Shift, got {type(shift).__name__}")
        shift = decoded(shift)  # a compressed member is decoded once, here
        if self._members:
            self._check(name, shift)
        self._members[name] = shift

    def _check(self, name: str, shift: Shift) -> None:
        ref_name, ref = next(iter(self._members.items()))
        if shift.method != ref.method:
            raise ShiftMismatchError(
                f"pool member {name!r} is a {shift.method!r} shift but {ref_name!r} is {ref.method!r}"
            )
        if shift.base != ref.base:
            diff = sorted(set(shift.base) ^ set(ref.base))
            diff += sorted(k for k in set(shift.base) & set(ref.base) if shift.base[k] != ref.base[k])
            raise ShiftMismatchError(
                f"pool member {name!r} targets different modules or shapes than {ref_name!r}: "
                f"first differing {diff[:5]}"
            )
        if set(shift.tensors) != set(ref.tensors):
            only_new = sorted(set(shift.tensors) - set(ref.tensors))[:5]
            only_ref = sorted(set(ref.tensors) - set(shift.tensors))[:5]
            raise ShiftMismatchError(
                f"pool member {name!r} has different tensors than {ref_name!r}: "
                f"only in {name!r} {only_new}, only in {ref_name!r} {only_ref}"
            )
        for key, t in shift.tensors.items():
            r = ref.tensors[key]
            if not _shape_ok(shift.method, key, tuple(r.shape), tuple(t.shape)):
                raise ShiftMismatchError(
                    f"pool member {name!r}: {key!r} is {tuple(t.shape)} but {tuple(r.shape)} in {ref_name!r}"
                )

    def remove(self, name: str) -> Shift:
        """Remove and return member ``name``.

        Example:
            >>> old = pool.remove("books")
            >>> "books" in pool
            False
        """
        self._require(name)
        return self._members.pop(name)

    def get(self, name: str) -> Shift:
        """Member ``name``.

        Raises:
            ShiftkitError: no such member (the known names are listed).

        Example:
            >>> pool.get("books").method
            'lora'
        """
        self._require(name)
        return self._members[name]

    def _require(self, name: str) -> None:
        if name not in self._members:
            raise ShiftkitError(f"the pool has no member {name!r}; members: {self.names()}")

    __getitem__ = get

    def names(self) -> list[str]:
        """Member names in pool order (column order of the routing weights ``α``).

        Example:
            >>> ShiftPool({"a": s1, "b": s2}).names()
            ['a', 'b']
        """
        return list(self._members)

    def shifts(self) -> list[Shift]:
        """Members in pool order."""
        return list(self._members.values())

    def items(self) -> list[tuple[str, Shift]]:
        """``(name, shift)`` pairs in pool order."""
        return list(self._members.items())

    def index(self, name: str) -> int:
        """Position of member ``name`` (its column in ``α``)."""
        self._require(name)
        return self.names().index(name)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __repr__(self) -> str:
        return f"ShiftPool(method={self.method!r}, members={self.names()})"

    # --- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the pool as one safetensors file, atomically (keys ``<member>/<tensor key>``).

        Example:
            >>> pool.save("pool.safetensors")
            >>> ShiftPool.load("pool.safetensors").names()
            ['books', 'movies']
        """
        from shiftkit._version import __version__

        tensors = {f"{n}{_SEP}{k}": t for n, s in self._members.items() for k, t in s.tensors.items()}
        meta = {
            "format_version": POOL_FORMAT_VERSION,
            "shiftkit_version": __version__,
            "order": self.names(),
            "members": {
                n: {
                    "method": s.method,
                    "config": None if s.config is None else config_to_dict(s.config),
                    "base": {k: list(v) for k, v in s.base.items()},
                }
                for n, s in self._members.items()
            },
        }
        atomic_save_tensors(tensors, path, {POOL_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShiftPool:
        """Read a pool written by :meth:`save`.

        Raises:
            CorruptFileError: unreadable, truncated or foreign file, or tensors/metadata that disagree.
            UnknownMethodError: a member's method is not registered in this shiftkit.

        Example:
            >>> pool = ShiftPool.load("pool.safetensors")
            >>> len(pool)
            2
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no pool file at {p}")
        try:
            with safe_open(str(p), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(POOL_META_KEY)
                tensors = {k: fh.get_tensor(k) for k in fh.keys()} if raw is not None else {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CorruptFileError(f"{p} is not a readable safetensors file ({err})") from None
        if raw is None:
            raise CorruptFileError(
                f"{p} has no shiftkit pool metadata: not a pool file (a shift? use sk.load)"
            )
        try:
            meta = json.loads(raw)
            version = meta["format_version"]
            order = [str(n) for n in meta["order"]]
            members = dict(meta["members"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{p}: malformed pool metadata ({err!r})") from None
        if not isinstance(version, int) or version > POOL_FORMAT_VERSION:
            raise CorruptFileError(f"{p}: pool format_version {version!r} is newer than this shiftkit reads")
        if sorted(order) != sorted(members) or len(set(order)) != len(order):
            raise CorruptFileError(f"{p}: pool order {order} does not list the members {sorted(members)}")
        by_member: dict[str, dict[str, Any]] = {n: {} for n in order}
        for key, t in tensors.items():
            name, sep, inner = key.partition(_SEP)
            if not sep or name not in by_member:
                raise CorruptFileError(f"{p}: tensor {key!r} belongs to no pool member")
            by_member[name][inner] = t
        pool = cls()
        for name in order:
            shift = _member(p, name, members[name], by_member[name])
            try:
                pool.add(name, shift)
            except ShiftkitError as err:
                raise CorruptFileError(f"{p}: {err}") from None
        return pool

    # --- static merging -------------------------------------------------------------------------
    def to_deltas(self, model: nn.Module | None = None) -> list[Shift]:
        """Every member as a dense delta (``Shift(method="delta")``), in pool order.

        Args:
            model: the base model the members were made for, without a shift attached; each member is
                attached, its delta read with ``sk.to_delta`` and detached again (the model is restored
                bit for bit). Not needed for a pool of deltas.

        Raises:
            ShiftkitError: a non-delta pool and no model.

        Example:
            >>> deltas = pool.to_deltas(base_model)
            >>> sk.apply_(base_model, deltas[0])
        """
        if self.method == DELTA:
            return self.shifts()
        if model is None:
            raise ShiftkitError(
                f"turning {self.method!r} pool members into deltas needs the base model: pass model=..."
            )
        out = []
        for shift in self.shifts():
            attach_(model, shift)
            try:
                out.append(to_delta(model))
            finally:
                detach_(model)
        return out

    def merge(
        self,
        method: str = "task_arithmetic",
        weights: Sequence[float] | Mapping[str, float] | None = None,
        *,
        model: nn.Module | None = None,
        **params: Any,
    ) -> Shift:
        """Statically merge the members with ``sk.merge`` (one shift for every input).

        Args:
            method: a merge method name (``sk.list_merge_methods()``).
            weights: one per member in pool order, or ``{name: weight}`` (missing names weigh 0).
            model: the base model; needed to turn non-delta members into deltas (:meth:`to_deltas`).
                Without it, LoRA members go to ``sk.merge`` as they are (it turns their factors into
                the exact ``ΔW = s·B A``; ``modules_to_save`` tensors then need ``model``).
            **params: the merge method's parameters (``density``, ``lambda_`` ...).

        Returns:
            The merged Shift (a delta when the members were converted); apply a delta with ``sk.apply_``.

        Example:
            >>> merged = pool.merge("ties", [1.0, 1.0], model=base, density=0.2)
            >>> sk.apply_(base, merged)
        """
        from shiftkit.merging.in_memory import merge

        if not self._members:
            raise ShiftkitError("cannot merge an empty pool")
        ws: list[float] | None
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self._members))
            if unknown:
                raise ShiftkitError(f"merge weights name unknown members {unknown}; members: {self.names()}")
            ws = [float(weights.get(n, 0.0)) for n in self._members]
        else:
            ws = None if weights is None else list(weights)
        if self.method == DELTA or model is not None:
            return merge(self.to_deltas(model), method, ws, **params)
        try:
            return merge(self.shifts(), method, ws, **params)
        except ShiftkitError as err:
            if type(err) is not ShiftkitError:
                raise
            raise ShiftkitError(
                f"{err}; pass model=<base model> to merge the members as dense deltas"
            ) from None


def _member(path: Path, name: str, meta: Any, tensors: dict[str, Any]) -> Shift:
    try:
        method = str(meta["method"])
        config = None if meta["config"] is None else config_from_dict(meta["config"])
        base = {str(k): tuple(int(s) for s in v) for k, v in dict(meta["base"]).items()}
    except ShiftkitError as err:
        if type(err) is ShiftkitError:
            raise CorruptFileError(f"{path}: member {name!r}: {err}") from None
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{path}: member {name!r} has malformed metadata ({err!r})") from None
    if method != DELTA and (config is None or type(config).method != method):
        raise CorruptFileError(
            f"{path}: member {name!r} says method {method!r} but its config does not match"
        )
    if method != DELTA:
        for key in tensors:
            try:
                split_key(key, base)
            except ShiftkitError:
                raise CorruptFileError(
                    f"{path}: member {name!r} tensor {key!r} belongs to no module"
                ) from None
    return Shift(method, config, tensors, base)
