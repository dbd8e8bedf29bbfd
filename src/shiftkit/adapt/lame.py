"""``lame``: Laplacian Adjusted Maximum-likelihood Estimation, an output-only test-time correction.

Nothing is trained: the model stays frozen in eval mode and every batch is processed independently. For a
batch of N samples with source softmax ``p_i ∈ Δ^K`` and L2-normalised penultimate features ``z_i``, LAME
finds assignments ``y_i ∈ Δ^K`` minimising

    E(Y) = Σ_i [ y_iᵀ log y_i − y_iᵀ log p_i ] − λ Σ_i y_iᵀ (W Y)_i,

a KL term keeping ``y_i`` near the model's prediction plus a Laplacian term making neighbours (affinity
``W``, N×N, built from ``z``) agree. The concave pairwise part is linearised (concave-convex procedure /
bound optimisation), giving the fixed-point iteration

    Y⁰ = p,   Y ← softmax_row(log(p + 1e-10) + λ W Y),

run for at most ``max_iter`` iterations and stopped (iteration index > 1) when
``|E − E_prev| ≤ 1e-8·|E_prev|``, ``E = Σ(unary·Y − λ (WY)·Y + Y·log clip(Y, 1e-20))``,
``unary = −log(p + 1e-10)``. Affinities: ``knn`` (W_ij = 1 for the k nearest neighbours of i, self
excluded), ``rbf`` (``exp(−‖z_i − z_j‖² / 2σ²)``, σ = mean distance to the k-th nearest point counting the
point itself, diagonal 1) and ``linear`` (``Z Zᵀ``).

LAME helps on label-correlated batches (few classes per batch: neighbours share a label) and *harms* i.i.d.
class-balanced batches (CIFAR10-C continual error 64.3 % vs 43.5 % for the source model,
mariodoebler/test-time-adaptation ``benchmark.md``).

Reference: Boudiaf, Mueller, Ben Ayed, Bertinetto, "Parameter-free Online Test-time Adaptation", CVPR 2022,
https://arxiv.org/abs/2201.05718 (implemented from the paper and a written description of fiveai/LAME only:
its code is CC BY-NC-SA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shiftkit.adapt.base import TTAMethod
from shiftkit.adapt.registry import register_method
from shiftkit.errors import ShiftkitError

__all__ = ["AFFINITIES", "Lame", "lame_affinity", "lame_energy", "lame_solve"]

#: The affinity kinds of :func:`lame_affinity`.
AFFINITIES = ("knn", "rbf", "linear")
_EPS_P = 1e-10  # added to p inside log: a probability of exactly 0 must not give −inf (spec)
_CLIP_Y = 1e-20  # entropy term: y·log y → 0 as y → 0, clip avoids 0·(−inf) = NaN (spec)
_REL_TOL = 1e-8  # relative energy change that stops the solver (spec)


def _pairwise_sq_dists(z: Tensor) -> Tensor:
    """``(N, D) -> (N, N)`` squared Euclidean distances, exactly 0 on the diagonal, never negative."""
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    return d2.fill_diagonal_(0.0)  # the matmul form leaves ~1e-7 of rounding where the distance is 0


def lame_affinity(z: Tensor, kind: str = "rbf", k: int = 5, *, force_symmetry: bool = False) -> Tensor:
    """The LAME affinity matrix of a batch of (already L2-normalised) features.

    ``knn``: ``W_ij = 1`` if j is among the ``min(k, N − 1)`` nearest neighbours of i (Euclidean, i itself
    excluded), else 0 — not symmetric. ``rbf``: ``W_ij = exp(−‖z_i − z_j‖² / (2σ²))`` with σ the mean over i
    of the distance to i's ``min(k, N)``-th nearest point *counting i itself* (so the (k−1)-th neighbour, as
    the reference fiveai/LAME ``src/adaptation/lame.py`` does); the diagonal is 1. σ = 0 (``k = 1``, or
    duplicate points) gives the σ → 0 limit ``W_ij = [z_i = z_j]`` instead of NaN. ``linear``: ``W = Z Zᵀ``
    (cosine similarities). ``force_symmetry`` returns ``(W + Wᵀ)/2``. A ``k`` larger than the batch is
    clamped, never an error.

    Args:
        z: ``(N, D)`` features, L2-normalised per row.
        kind: ``"knn"``, ``"rbf"`` or ``"linear"``.
        k: neighbours (≥ 1); unused by ``linear``.
        force_symmetry: symmetrise ``W``.

    Returns:
        ``(N, N)`` affinities in ``z``'s dtype.

    Raises:
        ShiftkitError: unknown ``kind`` or ``k < 1``.

    Example:
        >>> z = F.normalize(torch.randn(8, 16), dim=1)
        >>> lame_affinity(z, "knn", k=3).sum(1)
        tensor([3., 3., 3., 3., 3., 3., 3., 3.])
    """
    if kind not in AFFINITIES:
        raise ShiftkitError(f"lame: affinity must be one of {', '.join(AFFINITIES)}, got {kind!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ShiftkitError(f"lame: k must be an integer >= 1, got {k!r}")
    n = z.shape[0]
    if kind == "linear":
        w = z @ z.T
    elif kind == "knn":
        w = torch.zeros(n, n, dtype=z.dtype, device=z.device)
        kk = min(k, n - 1)
        if kk > 0:
            d2 = _pairwise_sq_dists(z)
            d2.fill_diagonal_(math.inf)  # self excluded
            idx = d2.topk(kk, dim=1, largest=False).indices
            w.scatter_(1, idx, 1.0)
    else:
        d2 = _pairwise_sq_dists(z)
        kth = d2.topk(min(k, n), dim=1, largest=False).values[:, -1]  # self (distance 0) is the first
        sigma = kth.sqrt().mean()
        if float(sigma) > 0.0:
            w = torch.exp(-d2 / (2.0 * sigma * sigma))
        else:
            w = (d2 <= 0.0).to(z.dtype)
    if force_symmetry:
        w = 0.5 * (w + w.T)
    return w


def lame_energy(y: Tensor, p: Tensor, w: Tensor, lam: float = 1.0) -> Tensor:
    """The LAME objective ``Σ(unary·Y − λ (WY)·Y + Y·log clip(Y, 1e-20))``, ``unary = −log(p + 1e-10)``.

    This is the energy the solver's stopping test watches (as in fiveai/LAME). For a symmetric W the update
    ``Y ← softmax(log p + λWY)`` is the concave-convex step of the same expression with λ/2 in place of λ
    (``lame_energy(y, p, w, lam / 2)``), which therefore never increases when W is also positive semi-definite
    (``rbf``, ``linear``); the λ version usually decreases too but is not guaranteed to.

    Args:
        y: ``(N, K)`` assignments (rows on the simplex).
        p: ``(N, K)`` source probabilities.
        w: ``(N, N)`` affinities.
        lam: weight λ of the Laplacian term.

    Returns:
        The scalar energy.

    Example:
        >>> p = torch.softmax(torch.randn(4, 3), 1)
        >>> lame_energy(p, p, torch.zeros(4, 4))   # KL(p‖p) = 0 (up to the 1e-10 offsets)
        tensor(...)
    """
    unary = -torch.log(p + _EPS_P)
    return (unary * y - lam * (w @ y) * y + y * torch.log(y.clamp_min(_CLIP_Y))).sum()


def lame_solve(p: Tensor, w: Tensor, lam: float = 1.0, max_iter: int = 100) -> tuple[Tensor, int]:
    """Run the LAME bound-optimisation iterations on one batch.

    ``Y⁰ = p``; repeat ``Y ← softmax_row(log(p + 1e-10) + λ W Y)`` at most ``max_iter`` times, stopping
    after iteration index ``i > 1`` (0-based) once ``|E − E_prev| ≤ 1e-8·|E_prev|`` (:func:`lame_energy`).

    Args:
        p: ``(N, K)`` source probabilities.
        w: ``(N, N)`` affinities (:func:`lame_affinity`).
        lam: weight λ of the Laplacian term.
        max_iter: maximum number of iterations (≥ 1).

    Returns:
        ``(log_y, iterations)``: ``(N, K)`` log-assignments (``log_y.exp()`` is Y, computed as a
        log-softmax so no entry is −inf) and the number of iterations run.

    Example:
        >>> p = torch.softmax(torch.randn(6, 3), 1); z = F.normalize(torch.randn(6, 4), dim=1)
        >>> log_y, iters = lame_solve(p, lame_affinity(z, "knn", 2))
        >>> log_y.exp().sum(1)   # ones
    """
    log_p = torch.log(p + _EPS_P)
    y = p
    log_y = log_p.log_softmax(1)
    e_prev = math.inf
    it = 0
    for it in range(max_iter):
        log_y = (log_p + lam * (w @ y)).log_softmax(1)
        y = log_y.exp()
        e = float(lame_energy(y, p, w, lam))
        if it > 1 and abs(e - e_prev) <= _REL_TOL * abs(e_prev):
            break
        e_prev = e
    return log_y, it + 1


@register_method("lame", adapts="outputs", needs_grad=False)
class Lame(TTAMethod):
    """Correct each batch's predictions so that neighbours in feature space agree (output-only, no training).

    The model is frozen (eval mode, no gradients, nothing updated, no state across batches). A forward
    pre-hook on ``feature_module`` captures its input — the penultimate features — which is flattened to
    ``(N, D)`` and L2-normalised; the model's outputs give ``p = softmax(outputs)``. The returned outputs are
    the **log-probabilities** ``log Y`` of the LAME solution, not logits: ``argmax`` is LAME's prediction and
    ``softmax(outputs) == exp(outputs) == Y``. A batch of one sample returns ``log p`` (nothing to propagate).

    Use it on label-correlated streams (batches holding few classes); on i.i.d. class-balanced batches it is
    known to hurt badly (CIFAR10-C in mariodoebler's ``benchmark.md``: 64.3 % vs 43.5 % error), so measure
    against ``source`` first.

    Args:
        model: a classifier ``(N, ...) -> (N, K)`` (frozen, not modified; a hook is registered on it).
        episodic: accepted for a uniform interface; every batch is independent anyway.
        steps: accepted for a uniform interface; unused.
        affinity: ``"rbf"`` (default of both references), ``"knn"`` or ``"linear"`` (see
            :func:`lame_affinity`).
        k: neighbours for ``knn`` / ``rbf`` (5, the references' "overall best"); clamped to the batch.
        force_symmetry: use ``(W + Wᵀ)/2``.
        lam: weight λ of the Laplacian term (1, as in the paper).
        max_iter: maximum solver iterations (100, as in the references).
        feature_module: qualified name (as in ``model.named_modules()``) of the module whose *input* is the
            feature; default: the last ``nn.Linear`` in module order (the classifier head).

    Raises:
        ShiftkitError: no ``nn.Linear`` / unknown ``feature_module``; bad ``affinity``, ``k``, ``lam``,
            ``max_iter``; outputs that are not ``(N, K)``; a feature module not called by the forward.

    Example:
        >>> tta = adapt.make("lame", model, affinity="knn", k=3)
        >>> log_probs = tta(x)           # (N, K) log Y; log_probs.argmax(1) are LAME's predictions
        >>> tta.last_iterations          # solver iterations used on x
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        episodic: bool = False,
        steps: int = 1,
        affinity: str = "rbf",
        k: int = 5,
        force_symmetry: bool = False,
        lam: float = 1.0,
        max_iter: int = 100,
        feature_module: str | None = None,
    ) -> None:
        if affinity not in AFFINITIES:
            raise ShiftkitError(
                f"adapt method 'lame': affinity must be one of {AFFINITIES}, got {affinity!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ShiftkitError(f"adapt method 'lame': k must be an integer >= 1, got {k!r}")
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
            raise ShiftkitError(f"adapt method 'lame': lam must be a finite number >= 0, got {lam!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ShiftkitError(f"adapt method 'lame': max_iter must be an integer >= 1, got {max_iter!r}")
        self.affinity, self.k, self.force_symmetry = affinity, k, bool(force_symmetry)
        self.lam, self.max_iter = float(lam), max_iter
        self.feature_module = feature_module
        self.last_iterations = 0
        self._capture: dict[str, Tensor] = {}  # filled by the hook only while forward runs
        self._capturing = False
        super().__init__(model, episodic=episodic, steps=steps)

    def configure_model(self) -> None:
        """Eval mode, no gradients, and a forward pre-hook capturing the feature module's input."""
        super().configure_model()
        modules = dict(self.model.named_modules())
        if self.feature_module is None:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise ShiftkitError(
                    f"adapt method 'lame' takes its features from the input of the last nn.Linear but "
                    f"{type(self.model).__name__} has none; pass feature_module='<module name>'"
                )
            self.feature_module = linears[-1]
        elif self.feature_module not in modules:
            known = ", ".join(repr(n) for n in modules if n) or "(no submodules)"
            raise ShiftkitError(
                f"adapt method 'lame': feature_module {self.feature_module!r} is not a module of "
                f"{type(self.model).__name__}; modules: {known}"
            )
        capture = self._capture

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._capturing and args and isinstance(args[0], Tensor):
                capture["z"] = args[0].detach()  # the last call wins if the module runs several times

        self._handles = [modules[self.feature_module].register_forward_pre_hook(hook)]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Return LAME's ``(N, K)`` log-probabilities for the batch ``x`` (nothing is updated).

        Example:
            >>> log_y = tta(x)
            >>> log_y.exp().sum(1)   # ones
        """
        self._capture.clear()
        self._capturing = True
        try:
            outputs = self.model(x)
        finally:
            self._capturing = False
        z = self._capture.pop("z", None)
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise ShiftkitError(f"adapt method 'lame' needs (N, K) class scores from the model, got {shape}")
        if z is None:
            raise ShiftkitError(
                f"adapt method 'lame': feature_module {self.feature_module!r} was not called by the "
                f"model's forward, so no features were captured"
            )
        n = outputs.shape[0]
        if z.shape[0] != n:
            raise ShiftkitError(
                f"adapt method 'lame': the input of {self.feature_module!r} has shape {tuple(z.shape)}, "
                f"expected a first dimension of {n} (one feature vector per sample)"
            )
        # Solve in float64: the reference's 1e-8 relative stopping test is below float32 resolution (it would
        # stop on rounding noise, or never); the N×N problem is small. MPS has no float64: float32 there.
        dtype = torch.float32 if outputs.device.type == "mps" else torch.float64
        log_p = outputs.to(dtype).log_softmax(1)
        if n == 1:
            self.last_iterations = 0
            return log_p.to(outputs.dtype)
        z = F.normalize(z.reshape(n, -1).to(dtype), dim=1)
        w = lame_affinity(z, self.affinity, self.k, force_symmetry=self.force_symmetry)
        log_y, self.last_iterations = lame_solve(log_p.exp(), w, self.lam, self.max_iter)
        return log_y.to(outputs.dtype)

    def reset_state(self) -> None:
        """Nothing accumulates between batches; clears the ``last_iterations`` diagnostic."""
        self.last_iterations = 0

    def extra_repr(self) -> str:
        return (
            f"affinity={self.affinity!r}, k={self.k}, lam={self.lam}, force_symmetry={self.force_symmetry}, "
            f"max_iter={self.max_iter}, feature_module={self.feature_module!r}"
        )
