"""Random-subspace training: ``θ = θ0 + P d`` (Li et al., ICLR 2018, arXiv:1804.08838).

Every parameter (weights *and* biases) of the targeted modules is part of ``θ ∈ R^D``: the tensors are
flattened and concatenated in model order, and each takes the next slice of ``P d``. ``d ∈ R^{dim}`` is
the **only** trainable tensor, shared by all targeted modules and initialised to 0 (an exact no-op);
``P ∈ R^{D×dim}`` is fixed and regenerated from ``seed``, so a shift file stores just ``d`` (and the seed
in the config). Projections:

- ``"dense"``: ``P_ij ~ N(0, 1)``, then every column scaled to unit norm over all ``D`` rows. O(D·dim)
  memory, refused above ``max_dense_elements``.
- ``"sparse"``: per parameter tensor, a "very sparse" random projection (Li, Hastie & Church 2006) with
  density ``1/√D_t`` and ±1 entries; then every column of the concatenated ``P`` scaled to unit norm.
- ``"fastfood"`` (default): one padded Fastfood block (Le, Sarlós & Smola 2013), ``L = 2^⌈log₂ max(D,
  dim)⌉``: ``P d = [H (G ⊙ Π(H (B ⊙ pad(d))))]_{1..D} / (sqrt(L·‖G‖²) · sqrt(D/L))`` with ``H`` the
  unnormalised Walsh–Hadamard transform (an O(L log L) butterfly), ``B ∈ {±1}^L``, ``Π`` a permutation and
  ``G ~ N(0, 1)^L``. Each implicit column has expected unit norm; memory O(L).

``P d`` is computed once per forward of the model the shift is attached to (cached, and recomputed when
``d`` changes), and each wrapper runs its module with ``torch.func.functional_call`` on ``θ0 + slice``, so
any module that holds parameters works (Linear, Conv, Embedding, LayerNorm, BatchNorm...; running
statistics are buffers and are left alone). A module is targeted when it holds parameters and none of its
submodules does; parameters held next to parameterised submodules (``nn.MultiheadAttention``'s packed
``in_proj_weight``, a ViT's class token on the root) stay outside ``θ``.

Fold: materialise ``θ0 + P d`` (exact). :func:`shiftkit.recipes.intrinsic_dimension` measures the
smallest ``dim`` reaching 90 % of full training's accuracy (``d_int90``).

Example:
    >>> sk.attach_(model, sk.SubspaceConfig(dim=500, projection="fastfood", seed=0))
    >>> opt = torch.optim.Adam(sk.shift_parameters(model), lr=1e-2)   # one vector, d
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from shiftkit.core.config import ShiftConfig
from shiftkit.core.registry import register_method
from shiftkit.core.wrapper import ShiftWrapper
from shiftkit.errors import ShiftkitError

__all__ = ["PROJECTIONS", "SubspaceConfig", "SubspaceModule", "SubspaceProjector", "fwht"]

PROJECTIONS = ("dense", "sparse", "fastfood")


@dataclass(frozen=True, kw_only=True)
class SubspaceConfig(ShiftConfig):
    """Random-subspace settings.

    Attributes:
        dim: size of the trainable vector ``d``. 1000 is the order of the paper's MNIST intrinsic
            dimensions (d_int90 ≈ 750 for a 199k-parameter MLP) and of the pretrained-LM fine-tuning
            results of Aghajanyan et al. (2021): enough for small tasks, tiny to store.
        projection: ``"fastfood"`` (default: O(D) memory and O(D log D) time, so it scales to large
            models), ``"sparse"`` or ``"dense"``.
        seed: seeds the random projection; with ``d`` it defines the shift.
        max_dense_elements: the dense projection is refused when ``D·dim`` exceeds this (2e8 floats =
            800 MB in fp32).

    Example:
        >>> sk.attach_(model, SubspaceConfig(dim=200, projection="sparse", seed=1))
        >>> sk.extract(model).keys()   # one vector for the whole model, e.g. ['fc1.subspace.d']
    """

    dim: int = 1000
    projection: str = "fastfood"
    seed: int = 0
    max_dense_elements: int = 200_000_000

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("dim", 1), ("seed", 0), ("max_dense_elements", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ShiftkitError(f"SubspaceConfig.{name} must be an integer >= {low}, got {v!r}")
        if self.projection not in PROJECTIONS:
            raise ShiftkitError(
                f"SubspaceConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}"
            )


#: largest Hadamard factor applied as one matrix product: 64 = six butterfly stages per memory pass
_FACTOR = 64
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (n, dtype, device)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:  # Sylvester: H_2n = [[H, H], [H, -H]]
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _HADAMARD[key] = h
    return _HADAMARD[key]


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh–Hadamard transform ``H x`` on the last axis (Sylvester order, ±1 entries).

    ``H_L = H_{n_1} ⊗ … ⊗ H_{n_m}`` (``n_i ≤ 64``): each factor is one small matrix product on a view of
    ``x``, i.e. six butterfly stages per pass over memory, O(L log L) work in all; differentiable.
    ``H`` is symmetric and ``H H = L·I``.

    Args:
        x: ``(..., L)`` with ``L`` a power of two.

    Returns:
        ``(..., L)``.

    Example:
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
    """
    shape, length = x.shape, x.shape[-1]
    if length < 1 or length & (length - 1):
        raise ShiftkitError(f"fwht needs a power-of-two length, got {length}")
    y = x.reshape(-1, length)
    rows, left = y.shape[0], length
    while left > 1:
        n = min(left, _FACTOR)
        # apply H_n to the last index, then rotate that index to the front; after every factor has been
        # applied once, the indices are back in their original order
        y = (y.reshape(-1, n) @ _hadamard(n, y.dtype, y.device)).reshape(rows, length // n, n)
        y = y.transpose(1, 2).reshape(rows, length)
        left //= n
    return y.reshape(shape)


def _generate(sizes: list[int], config: SubspaceConfig) -> dict[str, Tensor]:
    """The fixed projection state, drawn in fp32 on the CPU from ``config.seed`` (reproducible anywhere)."""
    gen = torch.Generator().manual_seed(config.seed)
    total, dim = sum(sizes), config.dim
    if config.projection == "dense":
        p = torch.randn(total, dim, generator=gen)
        return {"P": p / p.norm(dim=0, keepdim=True).clamp_min(1e-30)}
    if config.projection == "sparse":
        rows, cols, offset = [], [], 0
        for size in sizes:
            # "very sparse" (Li, Hastie & Church): density 1/√D_t, drawn as positions in the D_t × dim block
            nnz = max(1, round(math.sqrt(size) * dim))
            flat = torch.unique(torch.randint(size * dim, (nnz,), generator=gen))  # sorted, no repeats
            rows.append(offset + flat // dim)
            cols.append(flat % dim)
            offset += size
        row, col = torch.cat(rows), torch.cat(cols)
        values = torch.randint(0, 2, (row.numel(),), generator=gen).float() * 2 - 1
        norms = torch.zeros(dim).index_add_(0, col, values.square()).sqrt().clamp_min(1e-30)
        with warnings.catch_warnings():  # some torch versions warn about invariant checks even when told
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            p = torch.sparse_coo_tensor(
                torch.stack((row, col)),
                values / norms[col],
                (total, dim),
                is_coalesced=True,  # sorted unique positions, block by block in row order
                check_invariants=False,
            )
        return {"P": p}
    length = 1 << (max(total, dim) - 1).bit_length()  # the next power of two
    signs = torch.randint(0, 2, (length,), generator=gen).float() * 2 - 1
    perm = torch.randperm(length, generator=gen)
    gauss = torch.randn(length, generator=gen)
    # sqrt(L·‖G‖²) makes the full L-vector unit norm; sqrt(D/L) corrects for keeping D of its L entries
    scale = 1.0 / (math.sqrt(length * float(gauss.square().sum())) * math.sqrt(total / length))
    return {"B": signs, "perm": perm, "G": gauss, "scale": torch.tensor(scale)}


class SubspaceProjector(nn.Module):
    """The shared trainable vector ``d (dim,)`` and the fixed projection ``P (D, dim)`` (from the seed).

    One projector is a child of every wrapper of an attach, so ``d`` is stored once. :meth:`vector` caches
    ``P d`` until ``d`` changes or the model the shift is attached to starts a new forward.

    Attributes:
        evaluations: how many times ``P d`` was computed (one per forward of the attached model).

    Example:
        >>> proj = SubspaceProjector([300, 20], SubspaceConfig(dim=50), torch.zeros(1))
        >>> proj.project(torch.eye(50)).T.shape   # P materialised column by column: (D, dim)
        torch.Size([320, 50])
    """

    def __init__(self, sizes: list[int], config: SubspaceConfig, like: Tensor) -> None:
        super().__init__()
        self.projection = config.projection
        self.dim = config.dim
        self.total = sum(sizes)
        self.d = nn.Parameter(torch.zeros(config.dim, dtype=like.dtype, device=like.device))
        self._state = {k: v.to(like.device) for k, v in _generate(sizes, config).items()}
        self._cache: Tensor | None = None
        self._cache_key: tuple[Any, ...] = ()
        self._hook_id: int | None = None
        self.evaluations = 0

    def __getstate__(self) -> dict[str, Any]:
        # the cached P d is part of an autograd graph, which cannot be (deep-)copied or pickled
        state = self.__dict__.copy()
        state["_cache"], state["_cache_key"] = None, ()
        return state

    def _tensor(self, key: str, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        t = self._state[key]
        if t.device != device:  # the model moved: move the projection state once
            self._state = {k: v.to(device) for k, v in self._state.items()}
            t = self._state[key]
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)

    def project(self, d: Tensor) -> Tensor:
        """``P d`` for a batch of vectors, computed in fp32 (fp64 for fp64 ``d``).

        Args:
            d: ``(..., dim)``.

        Returns:
            ``(..., D)``.
        """
        dtype = torch.float64 if d.dtype == torch.float64 else torch.float32
        lead, dev = d.shape[:-1], d.device
        x = d.to(dtype).reshape(-1, self.dim)
        if self.projection == "dense":
            out = x @ self._tensor("P", dev, dtype).t()
        elif self.projection == "sparse":
            out = torch.sparse.mm(self._tensor("P", dev, dtype), x.t()).t()
        else:
            signs, gauss = self._tensor("B", dev, dtype), self._tensor("G", dev, dtype)
            x = nn.functional.pad(x, (0, signs.numel() - self.dim)) * signs
            x = fwht(gauss * fwht(x)[:, self._tensor("perm", dev)])
            out = x[:, : self.total] * self._tensor("scale", dev, dtype)
        return out.reshape(*lead, self.total)

    def vector(self) -> Tensor:
        """``P d`` of shape ``(D,)``, computed once per forward of the attached model."""
        key = (self.d._version, self.d.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if self._cache is None or key != self._cache_key:
            self._cache = self.project(self.d)
            self._cache_key = key
            self.evaluations += 1
            if self._cache.requires_grad:  # its graph is freed by the backward pass: drop it then too
                self._cache.register_hook(self._on_backward)
        return self._cache

    def _on_backward(self, grad: Tensor) -> None:
        # also covers submodules called directly, without the forward of the model that has the hook
        self._cache = None

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        # a bound method (not a closure), so a deep copy of the model hooks the copied projector
        self._cache = None

    def install_hook(self, root: nn.Module) -> None:
        """Drop the cache at each forward of ``root`` (once, however many wrappers share the projector)."""
        if self._hook_id is None:
            self._hook_id = root.register_forward_pre_hook(self._on_root_forward).id

    def remove_hook(self, root: nn.Module) -> None:
        """Undo :meth:`install_hook`; a no-op when none is installed."""
        if self._hook_id is not None:
            root._forward_pre_hooks.pop(self._hook_id, None)
            self._hook_id = None
        self._cache = None

    def extra_repr(self) -> str:
        return f"D={self.total}, dim={self.dim}, projection={self.projection}"


class SubspaceModule(ShiftWrapper):
    """One targeted module computing with ``θ0 + (P d)[offset : offset + numel]``, reshaped per parameter.

    ``subspace`` is the projector shared by every wrapper of the attach (shift parameter ``subspace.d``).
    """

    def __init__(self, base: nn.Module, projector: SubspaceProjector, offset: int) -> None:
        super().__init__(base)
        self.subspace = projector
        self.offset = offset
        self._layout = [(n, tuple(p.shape), p.numel()) for n, p in base.named_parameters()]

    def effective_params(self) -> dict[str, Tensor]:
        """``{name: θ0 + slice}`` for every parameter of the base module, differentiable in ``d``."""
        vec = self.subspace.vector()
        out, start = {}, self.offset
        for name, shape, numel in self._layout:
            p = self.base.get_parameter(name)
            out[name] = p + vec[start : start + numel].view(shape).to(p.dtype)
            start += numel
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base module's own forward, run on the shifted parameters (buffers untouched)."""
        return functional_call(self.base, self.effective_params(), args, kwargs)

    def on_attach(self, root: nn.Module, name: str) -> None:
        """Install the projector's cache-reset hook on ``root`` (the first wrapper does it)."""
        self.subspace.install_hook(root)

    def on_detach(self, root: nn.Module, name: str) -> None:
        """Remove the hook (the first wrapper detached does it; the rest are no-ops)."""
        self.subspace.remove_hook(root)


def _holds_parameters(module: nn.Module) -> bool:
    # a leaf holder: its own parameters, none below it (so targets never nest)
    own = next(module.parameters(recurse=False), None) is not None
    return own and all(next(c.parameters(), None) is None for c in module.children())


@register_method(
    "subspace",
    config=SubspaceConfig,
    targets=(nn.Module,),
    foldable=True,
    zero_init={},
    default_targets="all",
    accepts=_holds_parameters,
    group=True,
)
def wrap_group(
    root: nn.Module, targets: list[tuple[str, nn.Module]], config: ShiftConfig
) -> list[ShiftWrapper]:
    """One shared projector over all targets' parameters (model order) and one wrapper per target."""
    assert isinstance(config, SubspaceConfig)
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in targets]
    total = sum(sizes)
    if config.projection == "dense" and total * config.dim > config.max_dense_elements:
        raise ShiftkitError(
            f"a dense projection for D={total:,} parameters and dim={config.dim} needs "
            f"{total * config.dim:,} floats ({total * config.dim * 4 / 2**30:.1f} GiB), over "
            f"max_dense_elements={config.max_dense_elements:,}; use projection='fastfood' or 'sparse'"
        )
    like = next(p for _, m in targets for p in m.parameters())
    projector = SubspaceProjector(sizes, config, like)
    wrappers: list[ShiftWrapper] = []
    offset = 0
    for (_, module), size in zip(targets, sizes, strict=True):
        wrappers.append(SubspaceModule(module, projector, offset))
        offset += size
    return wrappers
