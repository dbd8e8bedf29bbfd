"""ZSCL's weight ensemble (Zheng et al., ICCV 2023; spec: adapt-continual.md §6.14, ``--we``): the uniform
average of the task-start weights and snapshots taken along training, written back for evaluation and as
the next task's start.

``θ_WE`` starts as the task-start weights (n = 1); each :meth:`WeightEnsemble.update` adds a snapshot,
``θ_WE ← (n·θ_WE + θ)/(n + 1)``, so after k updates ``θ_WE`` is the plain mean of k + 1 weight sets (the
reference snapshots every 100 steps). With a shift attached, only the shift's parameters are averaged (the
frozen base never changes); otherwise every floating parameter of the model is. The running mean is kept
in float32 whatever the parameters' dtype.

Example:
    >>> we = WeightEnsemble(model)
    >>> for step, batch in enumerate(batches):
    ...     train_step(batch)
    ...     if step % 100 == 0:
    ...         we.update(model)
    >>> we.apply_(model)      # evaluate and continue from the average
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftkit.core.attach import attached_method, named_shift_parameters
from shiftkit.errors import ShiftkitError

__all__ = ["WeightEnsemble"]


def _tracked(model: nn.Module) -> dict[str, nn.Parameter]:
    if attached_method(model) is not None:
        return named_shift_parameters(model)
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


class WeightEnsemble:
    """The running uniform average of a model's weights (its shift's, when one is attached).

    Args:
        model: the model at the start of the task; its current weights are the first member.

    Raises:
        ShiftkitError: the model has no floating parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        params = _tracked(model)
        if not params:
            raise ShiftkitError("WeightEnsemble: the model has no floating parameters to average")
        self.names = sorted(params)
        self.shift = attached_method(model) is not None
        self.average: dict[str, Tensor] = {
            n: params[n].detach().to(torch.float32).clone() for n in self.names
        }
        self.count = 1

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = _tracked(model)
        if sorted(params) != self.names:
            missing = sorted(set(self.names) - set(params))[:3]
            extra = sorted(set(params) - set(self.names))[:3]
            raise ShiftkitError(
                "WeightEnsemble: the model's parameters changed since the ensemble began "
                f"(missing {missing}, new {extra}); start a new ensemble per task and per attached shift"
            )
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Add the model's current weights: ``θ_WE ← (n·θ_WE + θ)/(n + 1)``."""
        params = self._params(model)
        n = self.count
        for name in self.names:
            avg = self.average[name]
            avg.mul_(n / (n + 1)).add_(params[name].detach().to(torch.float32), alpha=1.0 / (n + 1))
        self.count = n + 1

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Write the average into the model's parameters (in their own dtype); returns ``model``."""
        params = self._params(model)
        for name in self.names:
            params[name].copy_(self.average[name])
        return model
