"""The source image classifiers of test-time adaptation (``shiftkit bench tta-fmnist-c``, ``shiftkit adapt``,
the demo): Fashion-MNIST / MNIST-5k / digits as 32×32 RGB, and EfficientNet-Lite0 fine-tuned on them
(trained once, cached).

Images: 28×28 grey Fashion-MNIST and MNIST are padded by 2 pixels to 32×32 (the CIFAR size the CIFAR-10-C
corruption constants were made for) and repeated to 3 channels; sklearn's 8×8 digits (values 0–16) are
resized bilinearly to 28×28, scaled to [0, 1] and padded the same way. The natural MNIST → digits shift is
thus a change of writers, scanner and down-sampling, not of framing code.

Source model: ImageNet EfficientNet-Lite0 from the zoo with a fresh 10-class head, fine-tuned end to end
(AdamW, lr 1e-3, batch 128 by default, one-cycle schedule, random 2-pixel shifts) on 32×32 inputs normalised
as the zoo says, ``(x − 0.5)/0.5`` inside the model. Trained weights are cached under
``<cache>/tta-fmnist-c/<key>.safetensors`` with a JSON record (key = hash of the training settings).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shiftkit.data.images import grey28_to_rgb32
from shiftkit.recipes.models import ImageClassifier

__all__ = ["IMAGE_DATA", "SourceSettings", "clean_error", "digits_images", "image_data", "source_model"]

#: the image sets :func:`image_data` loads (32×32 RGB in [0, 1], int64 labels)
IMAGE_DATA = ("fashion-mnist", "fashion-mnist-train", "mnist5k", "digits")


def digits_images() -> tuple[Tensor, Tensor]:
    """sklearn digits as ``(1797, 3, 32, 32)`` float32 in ``[0, 1]`` and ``(1797,)`` int64 labels.

    Example:
        >>> x, y = digits_images(); x.shape
        torch.Size([1797, 3, 32, 32])
    """
    from shiftkit.zoo import load_dataset

    images, labels = load_dataset("digits")
    x = torch.as_tensor(images)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    x = nn.functional.pad(x[:, 0], (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(labels)


def image_data(name: str) -> tuple[Tensor, Tensor]:
    """A zoo image set as ``(N, 3, 32, 32)`` float32 in ``[0, 1]`` and ``(N,)`` int64 labels.

    Args:
        name: ``"fashion-mnist"`` (the test split), ``"fashion-mnist-train"``, ``"mnist5k"`` or ``"digits"``.

    Raises:
        ValueError: an unknown name. AssetNotFoundError: the dataset is not installed.

    Example:
        >>> x, y = image_data("fashion-mnist"); x.shape
        torch.Size([10000, 3, 32, 32])
    """
    from shiftkit.zoo import load_dataset

    if name in ("fashion-mnist", "fashion-mnist-train"):
        xtr, ytr, xte, yte = load_dataset("fashion-mnist")
        xa, ya = (xte, yte) if name == "fashion-mnist" else (xtr, ytr)
        return grey28_to_rgb32(xa), torch.as_tensor(ya)
    if name == "mnist5k":
        xa, ya = load_dataset("mnist5k")
        return grey28_to_rgb32(xa), torch.as_tensor(ya)
    if name == "digits":
        return digits_images()
    raise ValueError(f"unknown image data {name!r}; use one of {IMAGE_DATA}")


@dataclass(frozen=True)
class SourceSettings:
    """What a source model is trained on (every field is part of the cache key).

    Attributes:
        data: ``"fashion-mnist"`` (train split but its last 1,000 images) or ``"mnist5k"`` (all but a seeded
            random 500).
        n_train: training images used (the first ``n_train`` of a seeded permutation).
        epochs: passes over them.
        seed: permutation, head initialisation, shuffling and augmentation.
        batch_size: images per step.
        lr: AdamW's peak rate (one-cycle schedule, 10 % warm-up).
        precise_bn: after training, re-estimate every BatchNorm's running mean and variance as plain
            averages over this many training images (0: keep the running averages of training). The zoo's
            EfficientNet keeps ImageNet statistics with momentum 0.01, so after a short fine-tune (under
            ~300 steps) its eval-mode statistics still mix in ImageNet's; "precise BN" (Wu & Johnson 2021,
            "Rethinking 'Batch' in BatchNorm") replaces them with the new data's.
    """

    data: str = "fashion-mnist"
    n_train: int = 30000
    epochs: int = 2
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    precise_bn: int = 0

    def key(self) -> str:
        """A short hash of the settings (the cache file name).

        ``batch_size``, ``lr`` and ``precise_bn`` enter it only when they differ from their defaults, so
        models cached before those fields existed keep their names.
        """
        fields = asdict(self)
        for name, default in (("batch_size", 128), ("lr", 1e-3), ("precise_bn", 0)):
            if fields[name] == default:
                del fields[name]
        # version 2: training seeds the global RNG (dropout); version-1 models depended on the process's state
        blob = json.dumps({**fields, "version": 2}, sort_keys=True).encode()
        return f"{self.data}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _train_data(s: SourceSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from shiftkit.zoo import load_dataset

    if s.data == "fashion-mnist":
        xtr, ytr, _, _ = load_dataset("fashion-mnist")
        val_x, val_y = xtr[-1000:], ytr[-1000:]  # a held-out clean check, never trained on
        xtr, ytr = xtr[:-1000], ytr[:-1000]
    elif s.data == "mnist5k":
        xtr, ytr = load_dataset("mnist5k")
        # the file is ordered by class: hold out a seeded random 500 (about 50 per class), not the tail
        order = np.random.default_rng(s.seed + 1).permutation(len(ytr))
        val_x, val_y = xtr[order[:500]], ytr[order[:500]]
        xtr, ytr = xtr[order[500:]], ytr[order[500:]]
    else:
        raise ValueError(f"unknown source data {s.data!r}")
    perm = np.random.default_rng(s.seed).permutation(len(xtr))[: s.n_train]
    return (
        grey28_to_rgb32(xtr[perm]),
        torch.as_tensor(ytr[perm]),
        grey28_to_rgb32(val_x),
        torch.as_tensor(val_y),
    )


@torch.no_grad()
def clean_error(model: nn.Module, x: Tensor, y: Tensor, batch: int = 250) -> float:
    """Error % of ``model`` (eval mode) on ``(x, y)``.

    Example:
        >>> clean_error(model, x, y)
        8.9
    """
    model.eval()
    wrong = sum(
        int((model(x[i : i + batch]).argmax(-1) != y[i : i + batch]).sum()) for i in range(0, len(y), batch)
    )
    return 100.0 * wrong / len(y)


def _train(
    s: SourceSettings, progress: bool | None, say: Callable[[str], None]
) -> tuple[nn.Module, dict[str, Any]]:
    with torch.random.fork_rng(devices=[]):
        # dropout and drop-path draw from the global RNG: seeded here, the model is the same in every process
        torch.manual_seed(s.seed)
        return _train_seeded(s, progress, say)


def _train_seeded(
    s: SourceSettings, progress: bool | None, say: Callable[[str], None]
) -> tuple[nn.Module, dict[str, Any]]:
    from tqdm.auto import tqdm

    from shiftkit.zoo import load_model

    x, y, vx, vy = _train_data(s)
    net, _ = load_model("efficientnet-lite0", num_classes=10, seed=s.seed)
    model = ImageClassifier(net)
    gen = torch.Generator().manual_seed(s.seed)
    batch = s.batch_size
    steps = s.epochs * ((len(y) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    bar = tqdm(
        total=steps,
        desc=f"train source ({s.data})",
        disable=(not progress) if progress is not None else None,
        leave=False,
    )
    for _ in range(s.epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            xb = x[idx]
            # random shifts of up to 2 pixels (the pad width): cheap augmentation for a 1-epoch fine-tune
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if s.precise_bn > 0:
        from torch.optim.swa_utils import update_bn

        update_bn([xb for xb in x[: s.precise_bn].split(batch)], model)  # cumulative means, train mode
    seconds = time.perf_counter() - start
    err = clean_error(model, vx, vy)
    say(
        f"trained the {s.data} source model: {steps} steps in {seconds:.0f} s, "
        f"clean held-out error {err:.1f} %"
    )
    return model.eval(), {"settings": asdict(s), "train_seconds": seconds, "clean_error": err, "steps": steps}


def source_model(
    s: SourceSettings,
    cache_root: Path | None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or read from the cache) the EfficientNet-Lite0 source classifier for ``s``.

    Args:
        s: the training settings.
        cache_root: cache folder (``<root>/tta-fmnist-c/``); ``None``: train and keep nothing.
        progress: tqdm bar while training (``None``: on a terminal only).
        log: receives one line per stage.

    Returns:
        ``(model, info)``: the model in eval mode and ``{"clean_error", "train_seconds", "cached", ...}``.

    Example:
        >>> model, info = source_model(SourceSettings(), Path(".cache/shiftkit"))
        >>> info["clean_error"] < 15
        True
    """
    from safetensors.torch import load_file

    from shiftkit.core.io import atomic_save_tensors
    from shiftkit.zoo import load_model

    say = log or (lambda _m: None)
    path = None if cache_root is None else cache_root / "tta-fmnist-c" / f"{s.key()}.safetensors"
    if path is not None and path.exists() and path.with_suffix(".json").exists():
        net, _ = load_model("efficientnet-lite0", num_classes=10, seed=s.seed)
        cached = ImageClassifier(net)
        cached.load_state_dict(load_file(path))
        info = json.loads(path.with_suffix(".json").read_text())
        say(f"{s.data} source model read from the cache {path}")
        return cached.eval(), {**info, "cached": True}
    model, info = _train(s, progress, say)
    if path is not None:
        from shiftkit._fileio import atomic_write_text

        atomic_save_tensors(model.state_dict(), path, {"format": "shiftkit-tta-source"})
        atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return model, {**info, "cached": False}
