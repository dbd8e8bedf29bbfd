"""The :class:`Shift` value: a method name, its config and named tensors. No model, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from shiftkit.core.config import ShiftConfig
from shiftkit.errors import ShiftkitError, ShiftMismatchError

__all__ = ["DELTA", "Shift"]

#: method name of dense parameter deltas (task vectors): tensors keyed by parameter name
DELTA = "delta"


@dataclass(frozen=True, eq=False)
class Shift:
    """A learned (or computed) parameter shift, as a value.

    Attributes:
        method: registry name (``"lora"``, ``"ssf"``, ...) or ``"delta"`` for dense parameter deltas.
        config: the method config; ``None`` for deltas.
        tensors: named tensors keyed ``<module name>.<role>`` (methods) or ``<parameter name>`` (deltas).
        base: what the shift was made for: module name (methods) or parameter name (deltas) → shape.
        encoding: ``None`` for an ordinary shift. For a compressed one (``sk.compress``): how its
            ``tensors`` (the encoded payload) decode to the shift that ``method``, ``config`` and ``base``
            describe: ``{"method": <compressor>, "params": {...}, "tensors": {name: {"shape", "dtype"}}}``.
            ``sk.apply_``, ``sk.attach_``, ``sk.merge`` and ``ShiftPool`` decode it on their own;
            ``sk.decompress`` does it explicitly.

    Deltas support ``+``, ``-``, unary ``-`` and ``* scalar``; other methods must be turned into a
    delta first (``sk.to_delta(model)``), because their tensors do not add linearly.

    Example:
        >>> tv = sk.task_vector(base, tuned)
        >>> half = 0.5 * tv
        >>> both = tv + other_tv
    """

    method: str
    config: ShiftConfig | None
    tensors: dict[str, Tensor]
    base: dict[str, tuple[int, ...]] = field(default_factory=dict)
    encoding: dict[str, Any] | None = None

    # --- container ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, key: str) -> Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise ShiftMismatchError(f"shift ({self.method}) has no tensor {key!r}") from None

    def keys(self) -> list[str]:
        """Tensor names in insertion order."""
        return list(self.tensors)

    def _unique(self) -> list[Tensor]:
        # a tensor under several names (a tied embedding and head) is stored and counted once
        return list({id(t): t for t in self.tensors.values()}.values())

    @property
    def compressed(self) -> bool:
        """Whether the tensors are an encoded payload (see ``encoding``)."""
        return self.encoding is not None

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors (a tensor held under several names counts once).

        For a compressed shift this is the encoded payload, which is what its file stores.
        """
        return sum(t.numel() * t.element_size() for t in self._unique())

    @property
    def numel(self) -> int:
        """Total number of elements of the tensors (a tensor held under several names counts once)."""
        return sum(t.numel() for t in self._unique())

    def aliases(self) -> dict[str, str]:
        """Names that hold the same tensor object as an earlier name: ``{alias: first name}``.

        A task vector of two models with tied weights names the shared tensor under every module that uses
        it (``model.embed_tokens.weight`` and ``lm_head.weight``); the file stores it once.
        """
        first: dict[int, str] = {}
        out: dict[str, str] = {}
        for k, t in self.tensors.items():
            head = first.setdefault(id(t), k)
            if head != k:
                out[k] = head
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Shift:
        """A copy with floating tensors moved to ``device`` and/or cast to ``dtype``."""
        if self.encoding is not None:
            if dtype is not None:
                raise ShiftkitError(
                    f"cannot cast a compressed ({self.encoding.get('method')}) shift: its tensors are an "
                    "encoded payload; sk.decompress(shift) first"
                )
            return Shift(
                self.method,
                self.config,
                _map(self.tensors, lambda t: t.to(device=device)),
                dict(self.base),
                self.encoding,
            )
        return Shift(
            self.method,
            self.config,
            _map(self.tensors, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)),
            dict(self.base),
        )

    def __repr__(self) -> str:
        enc = f", compressed={self.encoding.get('method')!r}, nbytes={self.nbytes:,}" if self.encoding else ""
        return (
            f"Shift(method={self.method!r}, tensors={len(self.tensors)}, numel={self.numel:,}, "
            f"modules={len(self.base)}{enc})"
        )

    # --- arithmetic on deltas -------------------------------------------------------------------
    def _require_delta(self, op: str) -> None:
        if self.encoding is not None:
            raise ShiftkitError(
                f"'{op}' needs dense tensors, but this shift is compressed ({self.encoding.get('method')}): "
                "sk.decompress(shift) first"
            )
        if self.method != DELTA:
            raise ShiftkitError(
                f"'{op}' needs dense deltas, but this shift is {self.method!r}; "
                "convert it first with sk.to_delta(model) on a model it is attached to"
            )

    def _aligned(self, other: Any, op: str) -> Shift:
        self._require_delta(op)
        if not isinstance(other, Shift):
            raise ShiftkitError(f"cannot {op} a Shift and a {type(other).__name__}")
        other._require_delta(op)
        mine, theirs = set(self.tensors), set(other.tensors)
        if mine != theirs:
            only_a = sorted(mine - theirs)[:5]
            only_b = sorted(theirs - mine)[:5]
            raise ShiftMismatchError(
                f"cannot {op} deltas with different keys: only in left {only_a}, only in right {only_b}"
            )
        for k in self.tensors:
            a, b = self.tensors[k], other.tensors[k]
            if a.shape != b.shape:
                raise ShiftMismatchError(f"cannot {op} deltas: {k!r} is {tuple(a.shape)} vs {tuple(b.shape)}")
        return other

    def __add__(self, other: Any) -> Shift:
        o = self._aligned(other, "add")
        return Shift(DELTA, None, _map2(self.tensors, o.tensors, lambda a, b: a + b), dict(self.base))

    def __sub__(self, other: Any) -> Shift:
        o = self._aligned(other, "subtract")
        return Shift(DELTA, None, _map2(self.tensors, o.tensors, lambda a, b: a - b), dict(self.base))

    def __mul__(self, scalar: Any) -> Shift:
        self._require_delta("multiply")
        if not isinstance(scalar, int | float) or isinstance(scalar, bool):
            raise ShiftkitError(f"a delta can only be multiplied by a number, not {type(scalar).__name__}")
        return Shift(DELTA, None, _map(self.tensors, lambda t: t * scalar), dict(self.base))

    __rmul__ = __mul__

    def __neg__(self) -> Shift:
        return self * -1.0

    def allclose(self, other: Shift, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """True if ``other`` has the same method, encoding, keys and shapes and close tensors."""
        if self.method != other.method or set(self.tensors) != set(other.tensors):
            return False
        if self.encoding != other.encoding:
            return False
        return all(
            self.tensors[k].shape == other.tensors[k].shape
            and torch.allclose(self.tensors[k], other.tensors[k].to(self.tensors[k].dtype), rtol, atol)
            for k in self.tensors
        )


def _map(tensors: Mapping[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``fn`` of every tensor, computed once per tensor object: names that shared one still do."""
    done: dict[int, Tensor] = {}
    out = {}
    for k, t in tensors.items():
        if id(t) not in done:
            done[id(t)] = fn(t)
        out[k] = done[id(t)]
    return out


def _map2(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], fn: Callable[[Tensor, Tensor], Tensor]
) -> dict[str, Tensor]:
    """``fn(a[k], b[k])`` for every key, computed once per pair of tensor objects."""
    done: dict[tuple[int, int], Tensor] = {}
    out = {}
    for k, t in a.items():
        pair = (id(t), id(b[k]))
        if pair not in done:
            done[pair] = fn(t, b[k])
        out[k] = done[pair]
    return out


def split_key(key: str, modules: Mapping[str, Any]) -> tuple[str, str]:
    """Split ``<module name>.<role>`` using the known module names (the longest prefix wins)."""
    best = ""
    for name in modules:
        if (key.startswith(name + ".") or name == "") and len(name) >= len(best):
            best = name
    if not best and "" not in modules:
        raise ShiftMismatchError(f"tensor {key!r} belongs to none of the shift's modules")
    return best, key[len(best) + 1 :] if best else key
