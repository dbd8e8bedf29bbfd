"""Numeric kernels of the ImageNet-C / CIFAR-10-C corruptions (private; see :mod:`shiftkit.data.corruptions`).

Every op takes a float32 batch ``x`` of shape (N, 3, H, W) in [0, 1], the severity's constants ``c`` and one
``numpy.random.Generator`` per image (``rngs[i]`` is image i's only source of randomness), and returns a
float array of the same shape (the caller clips and casts). Work that does not depend on the random draws
is done for the whole batch at once. Definitions follow ``make_imagenet_c.py`` / ``make_cifar_c.py`` of
https://github.com/hendrycks/robustness (ImageNet-C/create_c); the functions here are our own numpy/scipy
re-implementations, not copies. Where the original called OpenCV, scikit-image or ImageMagick, the
comment names the call it reproduces.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from shiftkit.errors import AssetNotFoundError

Rngs = Sequence[np.random.Generator]
_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def _stack(rngs: Rngs, draw: Any) -> np.ndarray:
    """Stack one draw per image: ``draw(rng)`` for each image's generator."""
    return np.stack([draw(r) for r in rngs])


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(..., multichannel=True) and its defaults: blur the last two axes only."""
    sig = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(x, sigma=sig, mode=mode, truncate=truncate)


# ----------------------------------------------------------------------------------------------- noise


def gaussian_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """x + N(0, c^2) per pixel and channel."""
    return x + c * _stack(rngs, lambda r: r.standard_normal(x.shape[1:], dtype=np.float32))


def shot_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """Poisson(c x) / c: photon noise with c photons at full intensity."""
    lam = x.astype(np.float64) * c
    return np.stack([r.poisson(li) for r, li in zip(rngs, lam)]) / c


def impulse_noise(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """skimage random_noise(mode='s&p', amount=c): each value flips w.p. c, to 1 or 0 with probability 1/2."""
    u = _stack(rngs, lambda r: r.random((2, *x.shape[1:]), dtype=np.float32))
    flipped, salted = u[:, 0] < c, u[:, 1] < 0.5
    return np.where(flipped, salted.astype(np.float32), x)


# ----------------------------------------------------------------------------------------------- blurs


def _cv2_gauss_1d(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma): sampled Gaussian normalised to sum 1."""
    t = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original ``disk``: an aliased disk, normalised, then cv2.GaussianBlur (reflect-101 border)."""
    grid: np.ndarray
    if radius <= 8:  # the original always uses a 17x17 grid and a 3x3 anti-alias blur below radius 8
        grid, ksize = np.arange(-8, 9), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    d = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    d /= d.sum()
    g = _cv2_gauss_1d(ksize, alias_blur)
    d = ndimage.correlate1d(ndimage.correlate1d(d, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    rows, cols = np.nonzero(d)  # crop the all-zero margin (exact: zero taps contribute nothing)
    r = max(abs(rows - d.shape[0] // 2).max(), abs(cols - d.shape[1] // 2).max())
    m = d.shape[0] // 2
    return d[m - r : m + r + 1, m - r : m + r + 1]


def defocus_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """cv2.filter2D(x, -1, disk(radius, alias_blur)) per channel; OpenCV's default border is reflect-101."""
    k = disk_kernel(c[0], c[1]).astype(np.float32)
    return ndimage.correlate(x, k[None, None], mode="mirror")


def glass_blur(x: np.ndarray, c: tuple[float, int, int], rngs: Rngs) -> np.ndarray:
    """Gaussian blur, local pixel "shuffling", Gaussian blur again.

    The original loop ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` runs on numpy row views, so it does not
    swap: it copies pixel (h', w') onto (h, w) and leaves (h', w') unchanged. We reproduce that behaviour
    (it is what generated the released ImageNet-C / CIFAR-10-C), tracking for every position the index of
    the source pixel; the sequential loop runs once for the whole batch, each step a vectorised gather.
    """
    sigma, delta, iters = c
    n, ch, h, w = x.shape
    x = _gaussian(x, sigma)
    hs, ws = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    pos = (hs[:, None] * w + ws[None, :]).ravel()  # the loop's visiting order, h outer, w inner
    # randint(-delta, delta) draws dx then dy in [-delta, delta - 1] for each visited pixel
    d = _stack(rngs, lambda r: r.integers(-delta, delta, size=(iters, pos.size, 2)))
    src = np.broadcast_to(np.arange(h * w), (n, h * w)).copy()
    rows = np.arange(n)
    for it in range(iters):
        other = pos[None, :] + d[:, it, :, 1] * w + d[:, it, :, 0]  # (N, steps): h' * W + w'
        for k in range(pos.size):
            src[:, pos[k]] = src[rows, other[:, k]]
    flat = x.reshape(n, ch, h * w)
    x = np.take_along_axis(flat, np.broadcast_to(src[:, None, :], flat.shape), axis=2).reshape(x.shape)
    return _gaussian(x, sigma)


def _motion_blur_one(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage(radius, sigma, angle) on one (C, H, W) image.

    A one-sided line kernel: width = 2 ceil(radius) + 1 taps with weights exp(-i^2 / 2 sigma^2) (i = 0 ..
    width - 1, normalised); tap i reads the pixel at offset (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) in
    (x, y), clamped to the border (ImageMagick's default "edge" virtual pixels).
    """
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width)
    k = np.exp(-(i.astype(np.float64) ** 2) / (2 * sigma**2))
    k /= k.sum()
    a = math.radians(angle)
    ox = np.ceil(i * math.cos(a) - 0.5).astype(int)
    oy = np.ceil(i * math.sin(a) - 0.5).astype(int)
    _, h, w = img.shape
    p = width
    pad = np.pad(img, ((0, 0), (p, p), (p, p)), mode="edge")
    out = np.zeros_like(img)
    for ki, dx, dy in zip(k, ox, oy):
        out += np.float32(ki) * pad[:, p + dy : p + dy + h, p + dx : p + dx + w]
    return out


def motion_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """Line-kernel motion blur (the original used ImageMagick via Wand) at a uniform angle in [-45, 45]."""
    angles = [r.uniform(-45, 45) for r in rngs]
    return np.stack([_motion_blur_one(xi, c[0], c[1], a) for xi, a in zip(x, angles)])


def _zoom_matrix(n_in: int, z: float, n_keep: int) -> np.ndarray:
    """Rows of scipy.ndimage.zoom(order=1) along one axis, cropped to the centre ``n_keep`` outputs.

    scipy maps output j of round(n_in z) outputs to input j (n_in - 1) / (n_out - 1) (corners aligned);
    linear interpolation is separable, so a (n_keep, n_in) matrix per axis reproduces it exactly.
    """
    n_out = round(n_in * z)
    start = (n_out - n_keep) // 2
    pos = (np.arange(start, start + n_keep) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)).clip(
        0, n_in - 1
    )
    lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_keep, n_in))
    np.add.at(m, (np.arange(n_keep), lo), 1 - frac)
    np.add.at(m, (np.arange(n_keep), hi), frac)
    return m


def clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """The original ``clipped_zoom``: zoom the centre ceil(H / z) crop of (..., H, W) by ``z`` with
    scipy.ndimage.zoom (order 1) and trim back to (H, W); done as two interpolation-matrix products."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / z), math.ceil(w / z)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    ry, rx = _zoom_matrix(ch, z, h).astype(x.dtype), _zoom_matrix(cw, z, w).astype(x.dtype)
    return ry @ crop @ rx.T


def zoom_blur(x: np.ndarray, c: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """Mean of x and its clipped zooms at factors np.arange(*c) (kept as arange for identical factors)."""
    factors = np.arange(*c)
    out = x.copy()
    for z in factors:
        out += clipped_zoom(x, float(z))
    return out / (len(factors) + 1)


# ------------------------------------------------------------------------------------------- weather


def snow(x: np.ndarray, c: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    """Snow layer N(c0, c1) zoomed by c2, thresholded at c3, motion-blurred (c4, c5, angle in [-135, -45]);
    the image is brightened towards 1.5 gray + 0.5 with weight 1 - c6 and the layer added twice (0 and 180
    degrees)."""
    h, w = x.shape[-2:]
    layer = _stack(rngs, lambda r: r.normal(c[0], c[1], size=(1, h, w)))
    layer = clipped_zoom(layer, c[2])
    layer = np.clip(np.where(layer < c[3], 0.0, layer), 0, 1).astype(np.float32)
    angles = [r.uniform(-135, -45) for r in rngs]
    layer = np.stack([_motion_blur_one(li, c[4], c[5], a) for li, a in zip(layer, angles)])
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # cv2.COLOR_RGB2GRAY weights
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return x + layer + layer[..., ::-1, ::-1]


def _resize_linear(img: np.ndarray, out_h: int, out_w: int, sy: float, sx: float) -> np.ndarray:
    """cv2.resize INTER_LINEAR of (C, h, w): sample at (i + 0.5) * s - 0.5, border replicated."""
    yy = (np.arange(out_h) + 0.5) * sy - 0.5
    xx = (np.arange(out_w) + 0.5) * sx - 0.5
    gy, gx = np.meshgrid(yy, xx, indexing="ij")
    return np.stack([ndimage.map_coordinates(ci, [gy, gx], order=1, mode="nearest") for ci in img])


@functools.lru_cache(maxsize=16)
def frost_image(index: int, scale: float) -> np.ndarray:
    """Frost photo ``index`` (0-based) as float32 (3, h, w) in [0, 1], resized by ``scale`` like cv2.

    The photos ship (Apache-2.0) inside the ``imagecorruptions`` wheel; we read its files, never import it.
    """
    spec = importlib.util.find_spec("imagecorruptions")
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locs[0], "frost", _FROST_FILES[index]) if locs else ""
    if not os.path.isfile(path):
        raise AssetNotFoundError(
            "the frost corruption needs the frost photos of the imagecorruptions package; install them "
            "with `pip install --no-deps imagecorruptions` (used as a data asset only, never imported)"
        )
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0  # drops alpha
    if scale != 1.0:  # cv2.resize(frost, (0, 0), fx=scale, fy=scale): size rounded, step exactly 1/scale
        h, w = arr.shape[1:]
        arr = _resize_linear(arr, round(h * scale), round(w * scale), 1 / scale, 1 / scale)
    return arr.astype(np.float32)


def frost(x: np.ndarray, c: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """c0 x + c1 * (random crop of one of the first five frost photos; randint(5) never picks the sixth).

    ``c[2]`` is the photo rescale of the preset (CIFAR: 0.2). A photo smaller than the image (beyond the
    original's sizes) is first upscaled just enough to be cropped.
    """
    _, _, h, w = x.shape
    out = np.empty_like(x)
    for i, r in enumerate(rngs):
        f = frost_image(int(r.integers(5)), float(c[2]))
        fh, fw = f.shape[1:]
        if fh <= h or fw <= w:
            s = max((h + 1) / fh, (w + 1) / fw)
            nh, nw = math.ceil(fh * s), math.ceil(fw * s)
            f = _resize_linear(f, nh, nw, fh / nh, fw / nw)
            fh, fw = f.shape[1:]
        top, left = int(r.integers(0, fh - h)), int(r.integers(0, fw - w))
        out[i] = c[0] * x[i] + c[1] * f[:, top : top + h, left : left + w]
    return out


def plasma_fractal(rngs: Rngs, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height maps (N, mapsize, mapsize) in [0, 1], one per generator, built together.

    Midpoints get the mean of their 4 neighbours (wrapping) plus wibble * U(-wibble, wibble); wibble starts
    at 100 and is divided by ``wibbledecay`` at each halving of the step (the original's constants).
    """
    n = len(rngs)
    m = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * _stack(rngs, lambda r: r.uniform(-wibble, wibble, total.shape[1:]))

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + np.roll(corner, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half::step, half::step] = wibbled(sq)
        dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        m[:, half::step, 0::step] = wibbled(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def fog(x: np.ndarray, c: tuple[float, float, int], rngs: Rngs) -> np.ndarray:
    """(x + c0 * plasma) * max(x) / (max(x) + c0), plasma with wibbledecay c1 on a c2-sized map (cropped)."""
    _, _, h, w = x.shape
    mapsize = max(int(c[2]), 1 << (max(h, w) - 1).bit_length())  # grow the map for images beyond c2
    plasma = plasma_fractal(rngs, mapsize, c[1])[:, None, :h, :w]
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * plasma) * max_val / (max_val + c[0])


# ------------------------------------------------------------------------------------------- digital


def brightness(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """HSV value V = max(r, g, b) raised to min(1, V + c) with hue and saturation kept.

    For fixed H and S, HSV -> RGB is linear in V, so the round trip is x * V'/V (and V' grey where V = 0,
    where skimage sets S = 0).
    """
    v = x.max(axis=1, keepdims=True)
    v2 = np.clip(v + c, 0, 1)
    return np.where(v > 0, x * (v2 / np.maximum(v, 1e-12)), v2)


def contrast(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """(x - mean) * c + mean with the mean taken per image and channel."""
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * c + mean


def elastic_transform(x: np.ndarray, c: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """Random affine (3 points moved by U(-c2, c2), cv2.warpAffine bilinear, reflect-101 border) followed
    by a smooth displacement field gaussian(U(-1, 1), c1, mode='reflect', truncate=3) * c0 (bilinear,
    reflect). Constants are in pixels, as in the original (not rescaled with the image size)."""
    n, _, h, w = x.shape
    cy, cx, s = h // 2, w // 2, min(h, w) // 3
    pts1 = np.array([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=np.float64)  # (x, y)
    draws = _stack(rngs, lambda r: np.concatenate([r.uniform(-c[2], c[2], 6), r.uniform(-1, 1, 2 * h * w)]))
    pts2 = pts1[None] + draws[:, :6].reshape(n, 3, 2)
    a = np.concatenate([pts1, np.ones((3, 1))], axis=1)  # [x y 1] @ M^T = pts2
    m = np.linalg.solve(a[None], pts2).transpose(0, 2, 1)  # (N, 2, 3) forward map src -> dst
    full = np.concatenate([m, np.broadcast_to([[[0.0, 0.0, 1.0]]], (n, 1, 3))], axis=1)
    inv = np.linalg.inv(full)[:, :2]  # warpAffine samples src at M^-1 (dst)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    sx = inv[:, 0, 0, None, None] * xx + inv[:, 0, 1, None, None] * yy + inv[:, 0, 2, None, None]
    sy = inv[:, 1, 0, None, None] * xx + inv[:, 1, 1, None, None] * yy + inv[:, 1, 2, None, None]
    x = _sample(x, sy, sx, "mirror")
    field = _gaussian(draws[:, 6:].reshape(n, 2, h, w), c[1], mode="reflect", truncate=3.0) * c[0]
    return _sample(x, yy + field[:, 1], xx + field[:, 0], "reflect")


def _fold(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map integer indices into [0, n): 'mirror' = reflect-101 (OpenCV) / scipy 'mirror', 'reflect' =
    half-sample symmetric (scipy 'reflect')."""
    if n == 1:
        return np.zeros_like(i)
    if mode == "mirror":
        i = np.mod(i, 2 * n - 2)
        return np.where(i >= n, 2 * n - 2 - i, i)
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _sample(x: np.ndarray, sy: np.ndarray, sx: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear sample every channel of image n at (sy[n], sx[n]) (each (N, H, W)), borders per ``mode``.

    Equals scipy.ndimage.map_coordinates(order=1, mode=mode) per image (extending the data, then
    interpolating), written as four vectorised gathers for the whole batch.
    """
    n, ch, h, w = x.shape
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = (sy - y0)[:, None].astype(x.dtype), (sx - x0)[:, None].astype(x.dtype)
    y0i, x0i = y0.astype(np.int64), x0.astype(np.int64)
    ya, yb = _fold(y0i, h, mode), _fold(y0i + 1, h, mode)
    xa, xb = _fold(x0i, w, mode), _fold(x0i + 1, w, mode)
    flat = x.reshape(n, ch, h * w)

    def at(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
        idx = np.broadcast_to((yi * w + xi).reshape(n, 1, -1), (n, ch, yi[0].size))
        return np.take_along_axis(flat, idx, axis=2).reshape(n, ch, *yi.shape[1:])

    top = at(ya, xa) * (1 - fx) + at(ya, xb) * fx
    bottom = at(yb, xa) * (1 - fx) + at(yb, xb) * fx
    return top * (1 - fy) + bottom * fy


def pixelate(x: np.ndarray, c: float, rngs: Rngs) -> np.ndarray:
    """PIL BOX resize to (int(W c), int(H c)) and back, on float ('F') images so nothing is quantised."""
    n, ch, h, w = x.shape
    small = (int(w * c), int(h * c))
    out = np.empty_like(x)
    for i in range(n):
        for j in range(ch):
            im = Image.fromarray(np.ascontiguousarray(x[i, j], dtype=np.float32))
            out[i, j] = np.asarray(
                im.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)
            )
    return out


def jpeg_compression(x: np.ndarray, c: int, rngs: Rngs) -> np.ndarray:
    """PIL JPEG round trip at quality c of the 8-bit image (round(255 x))."""
    u8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = np.empty(u8.shape, dtype=np.float32)
    for i, img in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return out.transpose(0, 3, 1, 2)


Op = Callable[[np.ndarray, Any, Rngs], np.ndarray]
OPS: dict[str, Op] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
