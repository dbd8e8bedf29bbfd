"""ImageNet-C / CIFAR-10-C corruptions: contracts, seeding, and the reference formulas.

Expected values come from the definitions in hendrycks/robustness ``make_imagenet_c.py`` /
``make_cifar_c.py`` (constants quoted below), from PIL / colorsys / scipy as oracles, or from literal
per-image transcriptions of the reference loops (glass blur, plasma fractal) checked against our
vectorised versions.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import shiftkit.data._corruption_ops as ops
from conftest import require_assets
from shiftkit.data import CORRUPTIONS, corrupt
from shiftkit.data.corruptions import PRESETS, CorruptionError
from shiftkit.errors import AssetNotFoundError, ShiftkitError

# the corruptions whose output does not depend on the seed
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
SIZES = {"cifar": (8, 32), "imagenet": (3, 64)}  # (images, side): small but within each preset's design


@functools.lru_cache(maxsize=8)
def _natural(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((n, 3, size, size))
    k = 4
    while k <= size:
        noise = rng.random((n, 3, k, k)) - 0.5
        img += (
            ndimage.zoom(noise, (1, 1, size / k, size / k), order=1, grid_mode=True, mode="nearest")
            * (4 / k) ** 0.5
        )
        k *= 2
    lo, hi = img.min(axis=(1, 2, 3), keepdims=True), img.max(axis=(1, 2, 3), keepdims=True)
    return (0.1 + 0.8 * (img - lo) / (hi - lo)).astype(np.float32)


def natural(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """A 1/f-like colour texture in [0.1, 0.9]: bilinearly upsampled noise octaves (natural-image-like)."""
    return torch.from_numpy(_natural(n, size, seed).copy())


def need_frost(name: str) -> None:
    if name != "frost" or importlib.util.find_spec("imagecorruptions") is not None:
        return
    msg = "frost photos missing (pip install --no-deps imagecorruptions)"
    if require_assets():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_contract_seed_and_subset(name: str, preset: str) -> None:
    need_frost(name)
    n, size = SIZES[preset]
    x = natural(n, size)
    y = corrupt(x, name, 3, seed=7, preset=preset)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)
    assert torch.equal(corrupt(x, name, 3, seed=7, preset=preset), y)  # same seed: bit-identical
    # image i's stream depends on its position only: a slice with its offset reproduces the full run
    assert torch.equal(corrupt(x[1:3], name, 3, seed=7, preset=preset, index_offset=1), y[1:3])
    assert torch.equal(corrupt(x[2], name, 3, seed=7, preset=preset, index_offset=2), y[2])  # (C, H, W)
    other = corrupt(x, name, 3, seed=8, preset=preset)
    assert torch.equal(other, y) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_grayscale_is_rgb_then_channel_mean(name: str) -> None:
    need_frost(name)
    x = natural(4, 32)[:, :1]
    y = corrupt(x, name, 2, seed=3, preset="cifar")
    assert y.shape == x.shape and y.dtype == torch.float32
    rgb = corrupt(x.expand(-1, 3, -1, -1), name, 2, seed=3, preset="cifar")
    torch.testing.assert_close(y, rgb.mean(1, keepdim=True), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ formula checks: noise

GAUSS = {"imagenet": (0.08, 0.12, 0.18, 0.26, 0.38), "cifar": (0.04, 0.06, 0.08, 0.09, 0.10)}
SHOT = {"imagenet": (60, 25, 12, 5, 3), "cifar": (500, 250, 100, 75, 50)}
IMPULSE = {"imagenet": (0.03, 0.06, 0.09, 0.17, 0.27), "cifar": (0.01, 0.02, 0.03, 0.05, 0.07)}


@pytest.mark.parametrize("preset", PRESETS)
def test_gaussian_noise_std(preset: str) -> None:
    x = torch.full((8, 3, 32, 32), 0.5)
    for sev in range(1, 6):
        c = GAUSS[preset][sev - 1]
        if 0.5 / c < 3.5:  # clipping at 0 / 1 would shrink the std noticeably
            continue
        r = corrupt(x, "gaussian_noise", sev, preset=preset) - x
        assert abs(float(r.mean())) < 3 * c / r.numel() ** 0.5 + 1e-4
        assert float(r.std()) == pytest.approx(c, rel=0.03)


def test_shot_noise_poisson_moments() -> None:
    x = torch.full((8, 3, 32, 32), 0.5)
    for sev, c in enumerate(SHOT["cifar"], start=1):  # lambda = c/2 >= 25: clipping at 1 is negligible
        y = corrupt(x, "shot_noise", sev, preset="cifar").double()
        k = y * c
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-3)  # Poisson counts / c
        assert float(y.mean()) == pytest.approx(0.5, abs=0.01)
        assert float(y.var()) == pytest.approx(0.5 / c, rel=0.05)  # Var(Poisson(cx)/c) = x / c


@pytest.mark.parametrize("preset", PRESETS)
def test_impulse_noise_fraction(preset: str) -> None:
    x = torch.full((8, 3, 32, 32), 0.5)
    for sev, amount in enumerate(IMPULSE[preset], start=1):
        y = corrupt(x, "impulse_noise", sev, preset=preset)
        changed = y != x
        assert set(torch.unique(y[changed]).tolist()) <= {0.0, 1.0}
        tol = 4 * (amount * (1 - amount) / x.numel()) ** 0.5
        assert float(changed.float().mean()) == pytest.approx(amount, abs=tol)
        assert float((y[changed] == 1).float().mean()) == pytest.approx(0.5, abs=0.06)  # salt vs pepper


# ------------------------------------------------------------------------ formula checks: digital


def test_brightness_matches_hsv_round_trip() -> None:
    grey = torch.full((2, 3, 8, 8), 0.3)
    for sev, c in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        y = corrupt(grey, "brightness", sev)
        torch.testing.assert_close(y, torch.full_like(grey, min(1.0, 0.3 + c)), rtol=0, atol=1e-6)
    x = natural(1, 8)
    x[0, :, 0, 0] = 0.0  # black pixel: V = 0, S = 0 in HSV
    y = corrupt(x, "brightness", 4, preset="cifar")  # c = 0.2
    for i in range(8):
        for j in range(8):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            ref = colorsys.hsv_to_rgb(h, s, min(1.0, v + 0.2))
            torch.testing.assert_close(
                y[0, :, i, j], torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0
            )


def test_contrast_keeps_channel_means_and_scales_deviations() -> None:
    x = natural(4, 32) * 0.5 + 0.25
    for sev, c in enumerate((0.4, 0.3, 0.2, 0.1, 0.05), start=1):
        y = corrupt(x, "contrast", sev)
        mean = x.mean((2, 3), keepdim=True)
        torch.testing.assert_close(y.mean((2, 3), keepdim=True), mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(y - mean, (x - mean) * c, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_pixelate_is_block_constant(preset: str) -> None:
    x = torch.rand(2, 3, 32, 32)
    factors = {"imagenet": (0.6, 0.5, 0.4, 0.3, 0.25), "cifar": (0.95, 0.9, 0.85, 0.75, 0.65)}[preset]
    for sev, c in enumerate(factors, start=1):
        y = corrupt(x, "pixelate", sev, preset=preset)
        k = int(32 * c)
        # BOX upsampling from k to 32 repeats each of the k source rows / columns in a contiguous run
        row_runs = 1 + (y[..., 1:, :] != y[..., :-1, :]).any(-1).any(1).sum(-1)
        col_runs = 1 + (y[..., :, 1:] != y[..., :, :-1]).any(-2).any(1).sum(-1)
        assert row_runs.tolist() == [k, k] and col_runs.tolist() == [k, k]


@pytest.mark.parametrize("preset", PRESETS)
def test_jpeg_equals_pil_round_trip(preset: str) -> None:
    u8 = (natural(2, 32) * 255).round().to(torch.uint8)
    x = u8.float() / 255
    quality = {"imagenet": (25, 18, 15, 10, 7), "cifar": (80, 65, 58, 50, 40)}[preset]
    for sev, q in enumerate(quality, start=1):
        y = corrupt(x, "jpeg_compression", sev, preset=preset)
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(u8[i].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
            ref = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
            torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- reference transcriptions (oracles)


def test_glass_blur_matches_literal_reference_loop() -> None:
    """The reference loop ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views (copy, not swap)."""
    x = np.random.default_rng(0).random((2, 3, 12, 10)).astype(np.float32)
    for delta, iters in ((1, 2), (2, 3)):
        ours = ops.glass_blur(x, (0.0, delta, iters), [np.random.default_rng(s) for s in (1, 2)])
        for i in range(2):
            r = np.random.default_rng(i + 1)  # the generator image i used above
            img = x[i].transpose(1, 2, 0).copy()  # H, W, C as in the reference
            steps = (img.shape[0] - 2 * delta) * (img.shape[1] - 2 * delta)
            d = r.integers(-delta, delta, size=(iters, steps, 2))
            for it in range(iters):
                k = 0
                for h in range(img.shape[0] - delta, delta, -1):
                    for w in range(img.shape[1] - delta, delta, -1):
                        dx, dy = d[it, k]
                        k += 1
                        img[h, w], img[h + dy, w + dx] = img[h + dy, w + dx], img[h, w]
            np.testing.assert_array_equal(ours[i], img.transpose(2, 0, 1))
        # a copy duplicates pixels: the output is not a permutation of the input
        assert len(np.unique(ours[0])) < len(np.unique(x[0]))


def test_plasma_fractal_matches_per_image_diamond_square() -> None:
    def reference(r: np.random.Generator, mapsize: int, decay: float) -> np.ndarray:
        a = np.zeros((mapsize, mapsize))
        step, wib = mapsize, 100.0
        while step >= 2:
            half = step // 2
            corners = a[0::step, 0::step]
            s = corners + np.roll(corners, -1, 0)
            s = s + np.roll(s, -1, 1)
            a[half::step, half::step] = s / 4 + wib * r.uniform(-wib, wib, s.shape)
            dr, ul = a[half::step, half::step], a[0::step, 0::step]
            t = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
            a[0::step, half::step] = t / 4 + wib * r.uniform(-wib, wib, t.shape)
            t = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
            a[half::step, 0::step] = t / 4 + wib * r.uniform(-wib, wib, t.shape)
            step //= 2
            wib /= decay
        a -= a.min()
        return a / a.max()

    ours = ops.plasma_fractal([np.random.default_rng(s) for s in (5, 6)], 32, 1.75)
    for i, s in enumerate((5, 6)):
        np.testing.assert_allclose(ours[i], reference(np.random.default_rng(s), 32, 1.75), atol=1e-12)


def test_clipped_zoom_equals_scipy_zoom() -> None:
    x = np.random.default_rng(0).random((32, 32, 3))
    for z in [*np.arange(1, 1.26, 0.01), 1.75, 2.25]:
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = ndimage.zoom(x[top : top + ch, top : top + ch], (z, z, 1), order=1)
        t = (ref.shape[0] - 32) // 2
        ours = ops.clipped_zoom(x.transpose(2, 0, 1), float(z)).transpose(1, 2, 0)
        np.testing.assert_allclose(ours, ref[t : t + 32, t : t + 32], atol=1e-9)


@pytest.mark.parametrize("mode", ["mirror", "reflect"])
def test_bilinear_sampler_equals_map_coordinates(mode: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 9, 7))
    sy, sx = rng.uniform(-15, 25, (2, 9, 7)), rng.uniform(-15, 25, (2, 9, 7))
    ref = [
        [ndimage.map_coordinates(x[i, c], [sy[i], sx[i]], order=1, mode=mode) for c in range(3)]
        for i in (0, 1)
    ]
    np.testing.assert_allclose(ops._sample(x, sy, sx, mode), np.array(ref), atol=1e-12)


def test_motion_blur_line_kernel() -> None:
    """ImageMagick's kernel: 2 ceil(r) + 1 taps exp(-i^2 / 2 sigma^2), tap i at (i cos a, i sin a)."""
    img = np.zeros((1, 21, 21), dtype=np.float32)
    img[0, 10, 10] = 1.0
    w = np.exp(-(np.arange(7) ** 2) / (2 * 2.0**2))
    w /= w.sum()
    out = ops._motion_blur_one(img, 3, 2.0, 0.0)  # angle 0: pixel x reads x + i, so the impulse spreads left
    np.testing.assert_allclose(out[0, 10, 4:11][::-1], w, atol=1e-6)
    assert out.sum() == pytest.approx(1.0, abs=1e-6) and out[0, 10, 11:].sum() == 0
    out = ops._motion_blur_one(img, 3, 2.0, 90.0)  # angle 90: along +y
    np.testing.assert_allclose(out[0, 4:11, 10][::-1], w, atol=1e-6)


def test_defocus_disk_kernel() -> None:
    for radius, blur in ((0.3, 0.4), (1.5, 0.1), (3, 0.1), (10, 0.5)):
        k = ops.disk_kernel(radius, blur)
        assert k.shape[0] % 2 == 1
        if radius <= 8:
            assert k.sum() == pytest.approx(1.0)
        else:  # the disk touches its grid's edge and cv2.GaussianBlur's reflect-101 border folds mass back in
            assert 1.0 < k.sum() < 1.02
        np.testing.assert_allclose(k, k.T, atol=1e-12)
        assert k.flat[k.size // 2] == pytest.approx(k.max())  # peak at the centre (radius 1.5: a flat 3x3)


# --------------------------------------------------------------------------- severity and blur shape

# Exempt from monotone mean |corrupt - x| over severities, because the reference constants are not
# monotone or the randomness differs per severity:
#   glass_blur: (sigma, max_delta, iterations) do not all grow with severity (e.g. CIFAR 3 (0.4, 1, 1)
#     vs 4 (0.25, 1, 2)); frost: the image weight falls as the frost weight rises, so |change| depends on
#     the (randomly chosen) photo's brightness; elastic_transform: the reference's jitter / alpha / sigma
#     are not ordered (CIFAR severity 1 is a 2.56 px affine jitter, severity 5 0.96 px); fog (imagenet): a
#     new random plasma per severity moves |change| more than one severity step.
EXEMPT = {
    "cifar": {"glass_blur", "frost", "elastic_transform"},
    "imagenet": {"glass_blur", "frost", "elastic_transform", "fog"},
}


@pytest.mark.parametrize(
    ("name", "preset"), [(n, p) for p in PRESETS for n in CORRUPTIONS if n not in EXEMPT[p]]
)
def test_severity_monotone(name: str, preset: str) -> None:
    n, size = (8, 32) if preset == "cifar" else (2, 224)  # the resolutions the presets were designed for
    x = natural(n, size)
    d = [float((corrupt(x, name, s, preset=preset) - x).abs().mean()) for s in range(1, 6)]
    assert all(b >= a for a, b in itertools.pairwise(d)), d


def _hf(t: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels (energy at the highest frequencies)."""
    x = t.numpy()
    return float(np.mean(np.diff(x, axis=-2) ** 2) + np.mean(np.diff(x, axis=-1) ** 2))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"])
def test_blurs_remove_high_frequencies(name: str, preset: str) -> None:
    n, size = SIZES[preset]
    x = natural(n, size)
    for sev in range(1, 6):
        ratio = _hf(corrupt(x, name, sev, preset=preset)) / _hf(x)
        if name == "glass_blur" and preset == "cifar" and sev in (1, 2, 4):
            # sigma <= 0.25 barely blurs, so the pixel shuffling adds jagged high frequencies (CIFAR-10-C too)
            assert ratio > 0.9
            continue
        assert ratio < 0.8, (sev, ratio)


# ---------------------------------------------------------------------------------------- frost + errors


@pytest.mark.assets
def test_frost_blend_of_photo_crop() -> None:
    need_frost("frost")
    x = torch.zeros(4, 3, 32, 32)  # black image: output = clip(c1 * frost crop)
    y = corrupt(x, "frost", 5, preset="cifar").numpy()  # c = (0.75, 0.45), photos resized by 0.2
    photos = [ops.frost_image(i, 0.2) for i in range(5)]
    for img in y:
        hits = [
            p
            for p in photos
            if np.any(np.all(np.isclose(img[:, 0, 0][:, None, None], 0.45 * p, atol=1e-6), axis=0))
        ]
        assert hits, "the top-left pixel comes from no frost photo"
    assert float(y.max()) <= 0.45 + 1e-6


def test_frost_without_photos_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops.importlib.util, "find_spec", lambda name: None)
    ops.frost_image.cache_clear()
    try:
        with pytest.raises(AssetNotFoundError, match="pip install --no-deps imagecorruptions"):
            corrupt(torch.rand(1, 3, 32, 32), "frost", 1, preset="cifar")
    finally:
        ops.frost_image.cache_clear()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"corruption": "speckle_noise"}, "valid: gaussian_noise"),
        ({"severity": 0}, "1..5"),
        ({"severity": 6}, "1..5"),
        ({"severity": True}, "1..5"),
        ({"severity": 2.0}, "1..5"),
        ({"preset": "tiny"}, "valid: imagenet, cifar"),
        ({"seed": -1}, "seed"),
        ({"index_offset": -2}, "index_offset"),
        ({"images": torch.rand(2, 2, 8, 8)}, "C in"),
        ({"images": torch.rand(8, 8)}, "C in"),
        ({"images": torch.full((1, 3, 8, 8), 1.5)}, r"\[0, 1\]"),
        ({"images": torch.full((1, 3, 8, 8), float("nan"))}, r"\[0, 1\]"),
        ({"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8)}, "floating-point"),
    ],
)
def test_errors(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"images": torch.rand(1, 3, 8, 8), "corruption": "contrast", "severity": 1}
    args.update(kwargs)
    with pytest.raises(CorruptionError, match=match) as info:
        corrupt(args.pop("images"), args.pop("corruption"), args.pop("severity"), **args)  # type: ignore[arg-type]
    assert isinstance(info.value, ShiftkitError)
