"""Events from still images: a simulated neuromorphic camera making N-MNIST's three saccades.

The camera's view of the (log-intensity) image moves along a triangle, one side per saccade.  Each
pixel keeps the log intensity at its last event and fires ON/OFF events each time the current value
moves one contrast threshold away from it (threshold varying a little from pixel to pixel), at the
moment the linear path between simulation steps crosses the threshold, no sooner than a refractory
time after its previous event.  Timing jitter and uniform background noise are added.  All images
of a batch are simulated together, one vectorised update per time step.

:class:`Digits` is the offline default dataset built this way from scikit-learn's 1797 8x8 digits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OsbcError
from .cache import default_cache_dir
from .frames import SplitBy
from .nmnist import NMNIST
from .readers import EVENT_DTYPE, OnError, encode_nmnist
from .subsets import stratified_split

__all__ = ["saccade_events", "upsample_images", "Digits"]


def _triangle(t: np.ndarray, duration: float, amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera offset (dx, dy) in pixels at times t: three equal saccades around a triangle."""
    ang = np.deg2rad([-90.0, 30.0, 150.0, 270.0])  # apex up, then clockwise, back to the apex
    vx, vy = amplitude * np.cos(ang), amplitude * np.sin(ang)
    s = np.clip(t / duration * 3.0, 0.0, 3.0)
    seg = np.minimum(s.astype(np.int64), 2)
    f = s - seg
    return vx[seg] + f * (vx[seg + 1] - vx[seg]), vy[seg] + f * (vy[seg + 1] - vy[seg])


def saccade_events(images: np.ndarray, sensor_size: tuple[int, int] = (34, 34), *,
                   duration_us: int = 300_000, amplitude: float = 2.0, threshold: float = 0.25,
                   threshold_sigma: float = 0.03, refractory_us: int = 1_000, jitter_us: float = 300.0,
                   noise_hz: float = 0.2, step_us: int = 5_000, floor: float = 0.05,
                   vmax: float | None = None, seed: int | None = 0, batch: int = 256) -> list[np.ndarray]:
    """Simulate a neuromorphic camera moving over grayscale ``images`` ((N, h, w) or (h, w)).

    Images are centred on a ``sensor_size`` (H, W) sensor (h <= H, w <= W) and divided by ``vmax``
    (default: the maximum over all of them); intensity ``floor`` (fraction of full scale) keeps
    the log finite.
    ``amplitude`` is the distance in pixels from the triangle's centre to its corners,
    ``threshold`` the log-intensity contrast per event, ``noise_hz`` the background rate per pixel.
    Returns one time-sorted event array (x, y, t in us, p) per image.  Image i draws from its own
    stream of ``seed``: the same seed, image and ``vmax`` give the same events whatever ``batch``
    (images simulated together; it only trades memory for speed).
    """
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3:
        raise OsbcError(f"images must have shape (N, h, w) or (h, w), got {np.shape(images)}")
    H, W = sensor_size
    n, h, w = imgs.shape
    if h > H or w > W:
        raise OsbcError(f"images of {h}x{w} do not fit the {H}x{W} sensor: resize them first")
    for what, v in (("duration_us", duration_us), ("step_us", step_us), ("threshold", threshold),
                    ("batch", batch)):
        if not v > 0:
            raise OsbcError(f"{what} must be positive, got {v}")
    if not 0.0 < floor < 1.0:
        raise OsbcError(f"floor must lie strictly between 0 and 1, got {floor}")
    if n == 0:
        return []
    scale = float(imgs.max()) if vmax is None else float(vmax)
    imgs = np.clip(imgs / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(imgs)
    # one random stream per image, so an image's events do not depend on the batch it is in
    streams = np.random.SeedSequence(seed).spawn(n)
    # the canvas has room for the motion around the sensor, filled with the background level
    m = int(np.ceil(amplitude)) + 1
    top, left = m + (H - h) // 2, m + (W - w) // 2
    steps = max(int(round(duration_us / step_us)), 1)
    times = np.linspace(0.0, float(duration_us), steps + 1)
    dx, dy = _triangle(times, float(duration_us), amplitude)
    out: list[np.ndarray] = []
    for b0 in range(0, n, batch):
        chunk = imgs[b0:b0 + batch]
        canvas = np.full((len(chunk), H + 2 * m, W + 2 * m), np.log(floor), np.float32)
        canvas[:, top:top + h, left:left + w] = np.log(floor + (1.0 - floor) * chunk)
        rngs = [np.random.default_rng(s) for s in streams[b0:b0 + batch]]
        out += _simulate(canvas, (H, W), m, times, dx, dy, rngs, threshold, threshold_sigma,
                         refractory_us, jitter_us, noise_hz, duration_us)
    return out


def _view(canvas: np.ndarray, size: tuple[int, int], m: int, dx: float, dy: float,
          out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Bilinear sample of the canvas shifted by (dx, dy): four weighted slices, in place."""
    H, W = size
    y0, x0 = m + dy, m + dx
    iy, ix = int(np.floor(y0)), int(np.floor(x0))
    fy, fx = np.float32(y0 - iy), np.float32(x0 - ix)
    np.multiply(canvas[:, iy:iy + H, ix:ix + W], (1 - fy) * (1 - fx), out=out)
    for (oy, ox, wgt) in ((0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        if wgt:
            np.multiply(canvas[:, iy + oy:iy + oy + H, ix + ox:ix + ox + W], wgt, out=tmp)
            out += tmp
    return out


def _simulate(canvas: np.ndarray, size: tuple[int, int], m: int, times: np.ndarray, dx: np.ndarray,
              dy: np.ndarray, rngs: list[np.random.Generator], threshold: float, threshold_sigma: float,
              refractory_us: float, jitter_us: float, noise_hz: float, duration_us: int) -> list[np.ndarray]:
    B = canvas.shape[0]
    H, W = size
    npix = B * H * W
    bufs = (np.empty((B, H, W), np.float32), np.empty((B, H, W), np.float32))
    tmp = np.empty((B, H, W), np.float32)
    prev = _view(canvas, size, m, dx[0], dy[0], bufs[0], tmp).ravel()
    ref = prev.copy()  # log intensity at each pixel's last event
    mismatch = np.concatenate([r.standard_normal(H * W, dtype=np.float32) for r in rngs])
    thr = np.maximum(threshold * (1.0 + threshold_sigma * mismatch), 0.2 * threshold).astype(np.float32)
    last = np.full(npix, -np.inf)  # time of each pixel's last event
    pix_l: list[np.ndarray] = []
    t_l: list[np.ndarray] = []
    p_l: list[np.ndarray] = []
    diff = np.empty(npix, np.float32)
    for k in range(1, times.size):
        now = _view(canvas, size, m, dx[k], dy[k], bufs[k % 2], tmp).ravel()
        np.subtract(now, ref, out=diff)
        fire = np.flatnonzero(np.abs(diff) >= thr)
        if fire.size:
            t0, t1 = times[k - 1], times[k]
            d, c = diff[fire], thr[fire]
            count = np.floor(np.abs(d) / c).astype(np.int64)
            sign = np.sign(d)
            start = prev[fire] - ref[fire]  # offset from the reference at the step's start
            slope = now[fire] - prev[fire]  # change over the step (|d| >= c guarantees != 0)
            ref[fire] += sign * count * c
            # one row per threshold crossing; j-th crossing where prev + f*slope - ref = sign*j*c
            rep = np.repeat(np.arange(fire.size), count)
            j = np.arange(rep.size) - np.repeat(np.cumsum(count) - count, count) + 1
            # float32 rounding can leave |diff| a hair over c with no change since the last step
            slope[slope == 0] = np.float32(1e-12)
            f = np.clip((sign[rep] * j * c[rep] - start[rep]) / slope[rep], 0.0, 1.0)
            t = t0 + f * (t1 - t0)
            # refractory: t'_j = j*r + max(last, max_{i<=j}(t_i - i*r)) per pixel; offsetting
            # each pixel's rows by more than their spread lets one running maximum serve all
            span = (t1 - t0) + (int(count.max()) + 1) * refractory_us + 1.0
            v = t - t0 - j * refractory_us + rep * span
            run = np.maximum.accumulate(v) - rep * span + t0
            t = j * refractory_us + np.maximum(run, last[fire][rep])
            keep = t <= t1  # crossings that would fall after the step were lost to refractoriness
            pix = fire[rep[keep]]
            tk = t[keep]
            last[pix] = tk  # a pixel's rows are in time order: the last write wins
            pix_l.append(pix)
            t_l.append(tk)
            p_l.append(sign[rep[keep]] > 0)
        prev = now
    pix = np.concatenate(pix_l) if pix_l else np.zeros(0, np.int64)
    t = np.concatenate(t_l) if t_l else np.zeros(0)
    p = np.concatenate(p_l) if p_l else np.zeros(0, bool)
    # background activity: uniform in pixels, time and polarity
    rate = noise_hz * H * W * duration_us * 1e-6
    noise = [(r.integers(0, H * W, k), r.uniform(0, duration_us, k), r.random(k) < 0.5)
             for r in rngs for k in [r.poisson(rate) if rate > 0 else 0]]
    img = pix // (H * W)
    n_noise = np.array([len(q[0]) for q in noise], np.int64)
    img = np.concatenate([img, np.repeat(np.arange(B), n_noise)])
    rest = np.concatenate([pix - (pix // (H * W)) * (H * W)] + [q[0] for q in noise])
    t = np.concatenate([t] + [q[1] for q in noise])
    p = np.concatenate([p] + [q[2] for q in noise])
    # group by image with a radix sort on the small image number (stable: each image's events
    # stay in simulation order, so nearly in time order), jitter each image's times from its own
    # stream, then finish the time order with a merge sort that profits from that near order
    by_img = np.argsort(img.astype(np.uint16 if B < 1 << 16 else np.int64), kind="stable")
    img, rest, t, p = img[by_img], rest[by_img], t[by_img], p[by_img]
    bounds = np.searchsorted(img, np.arange(B + 1))
    if jitter_us > 0:
        t = t + jitter_us * np.concatenate(
            [r.standard_normal(int(bounds[i + 1] - bounds[i]), dtype=np.float32) for i, r in enumerate(rngs)])
    t = np.clip(np.rint(t), 0, duration_us - 1).astype(np.int64)
    order = np.argsort(img * duration_us + t, kind="stable")
    ev = np.empty(img.size, EVENT_DTYPE)
    ev["y"], ev["x"] = np.divmod(rest[order], W)
    ev["t"], ev["p"] = t[order], p[order]
    return [ev[bounds[i]:bounds[i + 1]] for i in range(B)]


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation between pixel centres."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (broadcast like ``np.matmul``) summed term by term in index order. A BLAS product's
    last bits depend on its thread count, and one last bit can move an event across a threshold."""
    out = a[..., :, 0, None] * b[..., 0, None, :]
    for k in range(1, a.shape[-1]):
        out += a[..., :, k, None] * b[..., k, None, :]
    return out


def upsample_images(images: np.ndarray, size: int = 20, pad: int = 4, blur: float = 0.8) -> np.ndarray:
    """Smoothly enlarge square images: linear interpolation to ``size`` x ``size``, a margin of
    ``pad`` pixels, then a Gaussian blur of ``blur`` pixels. The defaults turn scikit-learn's 8x8
    digits into MNIST-like 28x28 images (20x20 digit in a 28x28 field)."""
    imgs = np.asarray(images, dtype=np.float64)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise OsbcError(f"images must have shape (N, n, n), got {imgs.shape}")
    up = _linear_matrix(imgs.shape[1], size)
    full = size + 2 * pad
    placed = np.zeros((full, imgs.shape[1]))
    placed[pad:pad + size] = up
    if blur > 0:
        r = np.arange(full)
        g = np.exp(-0.5 * ((r[:, None] - r[None, :]) / blur) ** 2)
        placed = _matmul(g / g.sum(1, keepdims=True), placed)
    return _matmul(_matmul(placed, imgs), placed.T)


# ------------------------------------------------------------------------------------ Digits

_DIGITS_VERSION = 1


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("Digits needs scikit-learn's bundled digits: pip install 'osbc[digits]' "
                          "(or scikit-learn)") from None
    d = load_digits()
    return d.images, d.target


class Digits(NMNIST):
    """Offline default: scikit-learn's 1797 handwritten 8x8 digits as N-MNIST recordings.

    The digits are enlarged to 28x28 (:func:`upsample_images`), turned into events by
    :func:`saccade_events` on a 34x34 sensor, written as N-MNIST ``.bin`` files under
    ``root/<version-hash>/{Train,Test}/<digit>/<index>.bin`` and read back through
    :class:`NMNIST`, so everything downstream runs exactly as on real N-MNIST.
    ``root`` defaults to ``<cache>/digits`` (``$OSBC_CACHE`` or ``~/.cache/osbc``, or the folder
    given as ``cache``); a second call with the same parameters reuses the files.  The train/test split is stratified and
    seeded (``test_fraction`` of each class for testing).  ``saccade`` overrides
    :func:`saccade_events` parameters.
    """

    name = "Digits"

    def __init__(self, root: str | os.PathLike | None = None, train: bool = True,
                 frames: int | None = 20, split_by: SplitBy = "time", *, downsample: int = 1,
                 test_fraction: float = 0.2, seed: int = 0, saccade: dict[str, Any] | None = None,
                 cache: bool | str | os.PathLike | None = None, on_error: OnError = "raise",
                 transform: Callable | None = None, target_transform: Callable | None = None):
        if not 0.0 < test_fraction < 1.0:
            raise OsbcError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
        params = {"seed": int(seed), "sensor_size": [34, 34], "saccade": dict(saccade or {})}
        params["saccade"].pop("sensor_size", None)
        try:
            json.dumps(params)
        except TypeError:
            raise OsbcError(f"saccade parameters must be plain numbers, got {saccade!r}") from None
        if root is None:
            base = default_cache_dir() if cache in (None, True, False) else Path(cache).expanduser()
            root = base / "digits"
        self.test_fraction, self.seed, self.saccade = test_fraction, seed, params["saccade"]
        params["test_fraction"] = float(test_fraction)
        folder = _build_digits(Path(root).expanduser(), params)
        super().__init__(folder, train=train, frames=frames, split_by=split_by, downsample=downsample,
                         cache=cache, on_error=on_error, transform=transform,
                         target_transform=target_transform)


def _build_digits(root: Path, params: dict[str, Any]) -> Path:
    """Write the .bin files once per parameter set; return the folder holding Train/ and Test/."""
    doc = json.dumps({"version": _DIGITS_VERSION, **params}, sort_keys=True)
    folder = root / f"v{_DIGITS_VERSION}-{hashlib.sha1(doc.encode()).hexdigest()[:10]}"
    marker = folder / "osbc-digits.json"
    if marker.is_file():
        return folder
    images, labels = _load_sklearn_digits()
    test_idx, _ = stratified_split(labels, params["test_fraction"], params["seed"])
    is_test = np.zeros(labels.size, bool)
    is_test[test_idx] = True
    events = saccade_events(upsample_images(images), tuple(params["sensor_size"]),
                            seed=params["seed"], **params["saccade"])
    # build beside the final folder and rename it into place, so that a concurrent or
    # interrupted build never leaves a half-written dataset that looks complete
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        for split in ("Train", "Test"):
            for label in np.unique(labels):
                (tmp / split / str(int(label))).mkdir(parents=True)
        # plain writes: the folder as a whole is what appears atomically
        for i, (ev, label) in enumerate(zip(events, labels)):
            path = tmp / ("Test" if is_test[i] else "Train") / str(int(label)) / f"{i:04d}.bin"
            path.write_bytes(encode_nmnist(ev))
        (tmp / "osbc-digits.json").write_text(doc)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not marker.is_file():  # not another process winning the race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
