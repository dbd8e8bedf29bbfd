"""SAR's frozen top layers: the reference's rule per architecture family, explicit and documented.

The SAR reference (mr-eggplant/SAR ``sar.py``, ``collect_params``) skips every module whose name contains
``layer4``, ``blocks.9``, ``blocks.10``, ``blocks.11`` or ``norm.``, or is ``norm``: ResNet's last stage and
ViT-Base's last three blocks and final norm. Before the fix shiftkit adapted them. The oracle below is the
reference's test written out (``reference_excluded``); on ResNet- and ViT-shaped models the default
``exclude="auto"`` must adapt exactly the parameters the reference adapts, and on a model of another family
(EfficientNet's names) every norm layer, where the reference's substrings would match by accident.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftkit import adapt
from shiftkit.adapt.sar import detect_family, reference_excluded


class _Block(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(8)
        self.fc = nn.Linear(8, 8)
        self.norm2 = norm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.fc(self.norm1(x)))


class TinyResNetNames(nn.Module):
    """torchvision's ResNet names: bn1, layer1..layer4 (with their own bn layers), fc."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm1d(8)
        for i in range(1, 5):
            setattr(self, f"layer{i}", nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(x)
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return self.fc(h)


class TinyViTNames(nn.Module):
    """timm's ViT names: blocks.0..11 (norm1, norm2), a final norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(nn.LayerNorm) for _ in range(12)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


class TinyEffNetNames(nn.Module):
    """efficientnet_lite_pytorch's names: _bn0, _blocks.0..15._bn0/_bn1, _bn1 (another family)."""

    def __init__(self) -> None:
        super().__init__()
        self._bn0 = nn.BatchNorm1d(8)
        self._blocks = nn.ModuleList(
            [nn.ModuleDict({"_fc": nn.Linear(8, 8), "_bn0": nn.BatchNorm1d(8)}) for _ in range(16)]
        )
        self._bn1 = nn.BatchNorm1d(8)
        self._fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._bn0(x)
        for b in self._blocks:
            h = b["_bn0"](b["_fc"](h))
        return self._fc(self._bn1(h))


def _reference_adapted(model: nn.Module) -> list[str]:
    """Names of the parameters the SAR reference's collect_params returns (its rule, written out)."""
    out = []
    for nm, m in model.named_modules():
        if reference_excluded(nm):
            continue
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
            out += [f"{nm}.{n}" for n, _ in m.named_parameters(recurse=False) if n in ("weight", "bias")]
    return out


def _adapted(model: nn.Module, **kw: object) -> list[str]:
    tta = adapt.make("sar", model, **kw)
    ids = {id(p) for p in tta.adapted_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize(("cls", "family"), [(TinyResNetNames, "resnet"), (TinyViTNames, "vit")])
def test_auto_adapts_exactly_what_the_reference_adapts(cls: type[nn.Module], family: str) -> None:
    model = cls()
    assert detect_family(model) == family
    got = _adapted(model)
    assert got == _reference_adapted(cls())
    assert len(got) < len(_adapted(cls(), exclude="none"))  # something is really frozen
    tta = adapt.make("sar", cls())
    assert tta.exclude_rule == family and tta.excluded
    frozen = {
        "resnet": ["layer4.1"],
        "vit": [*(f"blocks.{i}.norm{j}" for i in (9, 10, 11) for j in (1, 2)), "norm"],
    }
    assert tta.excluded == frozen[family]


def test_another_family_adapts_every_norm_and_reference_matches_by_accident() -> None:
    model = TinyEffNetNames()
    assert detect_family(model) is None
    tta = adapt.make("sar", model)
    assert tta.exclude_rule is None and tta.excluded == []
    assert len(tta.adapted_parameters()) == 2 * 18
    # the reference's substrings freeze EfficientNet's _blocks.9-11 ("blocks.9" is in "_blocks.9._bn0")
    literal = adapt.make("sar", TinyEffNetNames(), exclude="reference")
    assert literal.excluded == [f"_blocks.{i}._bn0" for i in (9, 10, 11)]
    assert _adapted(TinyEffNetNames(), exclude="reference") == _reference_adapted(TinyEffNetNames())


def test_named_rules_and_custom_patterns() -> None:
    vit = adapt.make("sar", TinyViTNames(), exclude="resnet")  # a ViT has no layer4: nothing frozen
    assert vit.excluded == []
    res = adapt.make("sar", TinyResNetNames(), exclude="vit")
    assert res.excluded == []
    custom = adapt.make("sar", TinyResNetNames(), exclude=[r"layer[34]"])
    assert custom.exclude_rule == "custom" and custom.excluded == ["layer3.1", "layer4.1"]
    wrapped = nn.Sequential(TinyViTNames())  # a wrapped model: names start with "0."
    assert adapt.make("sar", wrapped).excluded[-1] == "0.norm"
