"""The TTA source models: reproducible in any process, cache keys, precise BatchNorm statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import need_asset
from shiftkit.recipes.image_source import SourceSettings, source_model


def test_cache_key_names_only_the_settings_that_differ_from_the_defaults() -> None:
    base = SourceSettings()
    assert base.key() == SourceSettings(batch_size=128, lr=1e-3, precise_bn=0).key()
    keys = {base.key(), SourceSettings(batch_size=64).key(), SourceSettings(lr=6e-3).key()}
    keys |= {SourceSettings(precise_bn=256).key(), SourceSettings(n_train=100).key()}
    assert len(keys) == 5 and all(k.startswith("fashion-mnist-") for k in keys)


@pytest.mark.assets
def test_source_model_is_the_same_whatever_the_global_rng(tmp_path: Path) -> None:
    """Dropout draws from the global RNG: training seeds it, so two processes train the same model."""
    need_asset("efficientnet-lite0")
    need_asset("fashion-mnist")
    s = SourceSettings("fashion-mnist", 128, 1, 0, batch_size=64, precise_bn=64)
    torch.manual_seed(1)
    a, info = source_model(s, tmp_path)
    torch.manual_seed(2)
    b, _ = source_model(s, None)
    assert not info["cached"] and info["steps"] == 2
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    c, again = source_model(s, tmp_path)  # read back from the cache
    assert again["cached"] and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values())
    )


@pytest.mark.assets
def test_precise_bn_replaces_the_running_statistics_with_the_training_data_averages() -> None:
    need_asset("efficientnet-lite0")
    need_asset("fashion-mnist")
    s = SourceSettings("fashion-mnist", 128, 1, 0, batch_size=64)
    plain, _ = source_model(s, None)
    precise, _ = source_model(SourceSettings("fashion-mnist", 128, 1, 0, batch_size=64, precise_bn=128), None)
    from shiftkit.recipes.image_source import _train_data

    x = _train_data(s)[0][:128]
    bn_p = next(m for m in precise.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_0 = next(m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the first BatchNorm's input: the stem convolution of the normalised images
    first_conv = next(m for m in precise.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        feats = first_conv((x - 0.5) / 0.5)
    mean = feats.mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn_p.running_mean, mean, atol=1e-4, rtol=1e-4)
    assert (bn_0.running_mean - mean).abs().max() > 10 * (bn_p.running_mean - mean).abs().max()
