"""Video-prediction metrics (PSNR, SSIM, the noise share of random features) and sample videos written as GIFs."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

from defi_jax import paths


def psnr(pred: jax.Array, target: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio per image over the last three dims ``[..., H, W, C]`` (dB)."""
    mse = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-12))


def noise_share(x1: jax.Array, x2: jax.Array) -> jax.Array:
    """Per sample (leading axis), the share of ``x``'s energy that comes from the noise draw, from two draws
    ``x1``, ``x2`` of one random function of one input: ``|x1 - x2|^2 / (|x1|^2 + |x2|^2)``. With
    ``x_i = s + n_i`` (``n_i`` independent, zero mean, the same spread) its expectation is ``|n|^2 / (|s|^2 +
    |n|^2)``: 0 when the input determines ``x``, 1 when ``x`` is the noise alone."""
    a = x1.astype(jnp.float32).reshape(x1.shape[0], -1)
    b = x2.astype(jnp.float32).reshape(x2.shape[0], -1)
    energy = jnp.sum(a**2, axis=-1) + jnp.sum(b**2, axis=-1)
    return jnp.sum((a - b) ** 2, axis=-1) / jnp.maximum(energy, 1e-30)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def ssim(pred: jax.Array, target: jax.Array, max_val: float = 1.0, filter_size: int = 11,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Structural similarity per image of ``[..., H, W, C]`` (Wang et al. 2004; Gaussian window, 'valid'
    filtering, mean over positions and channels), the same definition as ``tf.image.ssim``."""
    lead = pred.shape[:-3]
    h, w, c = pred.shape[-3:]
    x = pred.astype(jnp.float32).reshape(-1, h, w, c)
    y = target.astype(jnp.float32).reshape(-1, h, w, c)
    size = min(filter_size, h, w)
    g = jnp.asarray(_gaussian_kernel(size, filter_sigma))

    def blur(z_NHWC):  # separable depthwise Gaussian, valid padding
        n = z_NHWC.shape[0]
        z = jnp.moveaxis(z_NHWC, -1, 1).reshape(n * c, 1, *z_NHWC.shape[1:3])
        z = jax.lax.conv_general_dilated(z, g.reshape(1, 1, size, 1), (1, 1), "VALID")
        z = jax.lax.conv_general_dilated(z, g.reshape(1, 1, 1, size), (1, 1), "VALID")
        return z.reshape(n, c, *z.shape[2:])

    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * sxy + c2) / (sxx + syy + c2)
    return jnp.mean(luminance * contrast_structure, axis=(1, 2, 3)).reshape(lead)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames in [-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_video_grid(path: str, rows: list[np.ndarray], fps: float = 4.0) -> str:
    """Writes a looping GIF to ``path`` (local or ``gs://``): ``rows`` are uint8 videos ``[B, T, H, W, 3]``
    stacked vertically, batch side by side; each frame shows for ``1000 / fps`` ms.

    As the reference's validation videos: ground truth on top, prediction below.
    """
    from PIL import Image

    grid_TBHW3 = np.concatenate([np.asarray(r) for r in rows], axis=2)  # rows stacked on height
    t = grid_TBHW3.shape[1]
    frames = [Image.fromarray(np.concatenate(list(grid_TBHW3[:, i]), axis=1)) for i in range(t)]  # batch on width
    buf = io.BytesIO()
    # The frame duration is in ms (GIF stores centiseconds). imageio's GIF writer changed its unit from seconds
    # to ms across versions; its `duration=1 / fps` wrote frames of 0 ms, which viewers play at their default.
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000.0 / fps),
                   loop=0)
    paths.write_bytes(path, buf.getvalue())
    return path
