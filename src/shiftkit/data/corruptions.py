"""The 15 ImageNet-C corruptions at 5 severities, seeded and deterministic.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019, https://arxiv.org/abs/1903.12261. Each corruption maps an image x in [0, 1] to clip(f_c(x)),
e.g. Gaussian noise f_c(x) = x + c·ε with ε ~ N(0, 1), contrast f_c(x) = (x − mean) · c + mean; the
constants c per severity are those of the reference scripts (see the tables below) and the functions are
re-implemented with numpy, scipy.ndimage and PIL (no OpenCV, scikit-image or ImageMagick):

* ``preset="imagenet"``: ``make_imagenet_c.py`` (designed for 224 × 224 images);
* ``preset="cifar"``: ``make_cifar_c.py`` (CIFAR-10-C, designed for 32 × 32 images).

Differences from the reference scripts, all deliberate:

* Motion blur (and the snow layer's motion blur) used ImageMagick's ``MotionBlurImage`` through Wand; we
  apply the same one-sided line kernel (2·ceil(radius)+1 taps, weights exp(−i²/2σ²), edge pixels
  repeated) with numpy.
* Glass blur reproduces what the original loop really does: ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``
  on numpy views copies pixel (h', w') onto (h, w) instead of swapping them.
* No intermediate 8-bit rounding (the reference works on uint8 PIL images and stores uint8 / JPEG-85
  files); only JPEG compression quantises, because JPEG needs 8-bit input. Pixelate resizes float images.
* Any image size is accepted: loops and crops use H and W. Pixel constants (elastic transform, blur radii)
  are *not* rescaled, as in the reference, so use the preset designed for your resolution. Fog grows its
  plasma map to the next power of two ≥ max(H, W); frost upscales a photo smaller than the image.
* Frost needs the frost photos shipped in the ``imagecorruptions`` wheel (Apache-2.0): install them with
  ``pip install --no-deps imagecorruptions``; the package is only read as data, never imported.

Randomness: image i of a call (position ``index_offset + i``) draws everything from
``np.random.default_rng(np.random.SeedSequence([seed, corruption_index, severity, index_offset + i]))``,
so the result of an image never depends on the rest of the batch, and ``corrupt(x[a:b], ...,
index_offset=a)`` equals ``corrupt(x, ...)[a:b]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from shiftkit.errors import ShiftkitError

__all__ = ["CORRUPTIONS", "PRESETS", "CorruptionError", "corrupt", "corrupted_domains"]

# The standard order of the ImageNet-C / CIFAR-10-C tables (and of the anchors' result tables).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
PRESETS: tuple[str, ...] = ("imagenet", "cifar")

# Constants per severity 1..5, from hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py (commit
# e0377d4). Tuples: defocus (radius, alias_blur); glass (sigma, max_delta, iterations); motion (radius,
# sigma); zoom = np.arange arguments of the zoom factors; snow (loc, scale, zoom, threshold, blur radius,
# blur sigma, blend); frost (image weight, frost weight, photo rescale); fog (amount, wibbledecay,
# mapsize); elastic (alpha, sigma, affine jitter) in pixels ("244 should have been 224", as written there).
_IMAGENET: dict[str, tuple[object, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)),
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "frost": ((1, 0.4, 1.0), (0.8, 0.6, 1.0), (0.7, 0.7, 1.0), (0.65, 0.7, 1.0), (0.6, 0.75, 1.0)),
    "fog": ((1.5, 2, 256), (2, 2, 256), (2.5, 1.7, 256), (2.5, 1.5, 256), (3, 1.4, 256)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "elastic_transform": (
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    ),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}

# CIFAR-10-C constants, from hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py (commit ca36008):
# frost photos are resized by 0.2 before the random crop, the plasma map is 32 x 32 and elastic constants
# are multiples of IMSIZE = 32.
_CIFAR: dict[str, tuple[object, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)),
    "fog": ((0.2, 3, 32), (0.5, 3, 32), (0.75, 2.5, 32), (1, 2, 32), (1.5, 1.75, 32)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": (
        (32 * 0, 32 * 0, 32 * 0.08),
        (32 * 0.05, 32 * 0.2, 32 * 0.07),
        (32 * 0.08, 32 * 0.06, 32 * 0.06),
        (32 * 0.1, 32 * 0.04, 32 * 0.05),
        (32 * 0.1, 32 * 0.03, 32 * 0.03),
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}
_TABLES = {"imagenet": _IMAGENET, "cifar": _CIFAR}
# corruptions whose output does not depend on random draws: no generators are built for them
_DETERMINISTIC = frozenset(
    {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
)
_RANGE_TOL = 1e-5  # float round-off of an upstream normalisation is tolerated (and clipped away)


class CorruptionError(ShiftkitError):
    """An invalid corruption name, severity, preset, seed or image batch was passed to :func:`corrupt`."""


def _check(images: object, corruption: str, severity: int, seed: int, preset: str, index_offset: int) -> None:
    if corruption not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise CorruptionError(f"severity must be an int in 1..5, got {severity!r}")
    if preset not in PRESETS:
        raise CorruptionError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    for name, v in (("seed", seed), ("index_offset", index_offset)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CorruptionError(f"{name} must be a non-negative int, got {v!r}")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise CorruptionError(f"images must be a floating-point torch.Tensor in [0, 1], got {kind}")
    if images.ndim not in (3, 4) or images.shape[-3] not in (1, 3) or min(images.shape[-2:]) < 1:
        raise CorruptionError(
            f"images must have shape (N, C, H, W) or (C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}"
        )


def corrupt(
    images: torch.Tensor,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    preset: str = "imagenet",
    index_offset: int = 0,
) -> torch.Tensor:
    """Apply one ImageNet-C corruption at one severity to a batch of images.

    Grayscale images (C = 1) are replicated to RGB, corrupted, and averaged back over the channels.

    Args:
        images: (N, C, H, W) or (C, H, W) floats in [0, 1], C in {1, 3}; any device.
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 (mildest) .. 5.
        seed: base seed; the same seed gives bit-identical output, another seed different randomness.
        preset: ``"imagenet"`` (constants for 224 px) or ``"cifar"`` (CIFAR-10-C constants for 32 px).
        index_offset: position of ``images[0]`` in the whole dataset; image i uses the random stream of
            position ``index_offset + i``, so a slice corrupted with its offset matches the full run.

    Returns:
        float32 tensor of the input's shape and device, in [0, 1].

    Raises:
        CorruptionError: unknown corruption or preset, severity outside 1..5, bad seed/offset, or images
            that are not a float tensor of a valid shape with values in [0, 1].
        AssetNotFoundError: ``frost`` without the frost photos (``pip install --no-deps imagecorruptions``).

    Example:
        >>> x = torch.rand(8, 3, 32, 32)
        >>> y = corrupt(x, "gaussian_noise", 5, seed=0, preset="cifar")
        >>> y.shape
        torch.Size([8, 3, 32, 32])
    """
    _check(images, corruption, severity, seed, preset, index_offset)
    from shiftkit.data import _corruption_ops  # scipy / PIL are imported on first use only

    # one torch op, then numpy: tiny torch ops are slow on a busy multi-threaded CPU pool
    arr = images.detach().to("cpu", torch.float32).numpy()
    single = arr.ndim == 3
    arr = arr[None] if single else arr
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= -_RANGE_TOL and arr.max() <= 1 + _RANGE_TOL):
        raise CorruptionError("images must be finite floats in [0, 1] (unnormalised); got values outside")
    arr = np.clip(arr, 0, 1)  # also a fresh array, so ops may work in place
    gray = arr.shape[1] == 1
    if gray:
        arr = np.repeat(arr, 3, axis=1)
    c = _TABLES[preset][corruption][severity - 1]
    k = CORRUPTIONS.index(corruption)
    n = arr.shape[0]
    rngs = (
        []
        if corruption in _DETERMINISTIC
        else [
            np.random.default_rng(np.random.SeedSequence([seed, k, severity, index_offset + i]))
            for i in range(n)
        ]
    )
    out = _corruption_ops.OPS[corruption](arr, c, rngs) if n else arr
    out = np.clip(out, 0, 1).astype(np.float32)
    if gray:
        out = out.mean(axis=1, keepdims=True)
    result = torch.from_numpy(np.ascontiguousarray(out))
    return (result[0] if single else result).to(images.device)


def corrupted_domains(
    x: Tensor, y: Tensor, corruptions: Sequence[str], severity: int, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{corruption: (corrupted x, y)}`` in the given order (CIFAR-10-C constants, 32 px).

    Example:
        >>> doms = corrupted_domains(x, y, ("gaussian_noise",), 5, 0)
        >>> doms["gaussian_noise"][0].shape == x.shape
        True
    """
    return {c: (corrupt(x, c, severity, seed=seed, preset="cifar"), y) for c in corruptions}
