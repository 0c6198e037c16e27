"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d.

The coordinate has density f(x) = C_d (1 - x^2)^((d-3)/2) on [-1, 1] (no tail truncation).
Everything is solved in float64 on the CPU and cached per (dim, bits).
"""

import functools
import math

import torch

MIN_DIM, MAX_DIM = 8, 4096
_PANELS = 1 << 17  # grid panels on [-1, 1]; cumulative integral error is O(h^4)


@functools.lru_cache(maxsize=None)
def _cdf_grid(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, pdf, cdf) on a uniform grid of [-1, 1], float64."""
    x = torch.linspace(-1.0, 1.0, _PANELS + 1, dtype=torch.float64)
    one_minus = (1 - x * x).clamp_min(0)
    pdf = _pdf(dim, x)
    dpdf = torch.where(one_minus > 0, -(dim - 3) * x * pdf / one_minus.clamp_min(1e-300), 0.0)
    h = 2.0 / _PANELS
    # trapezoid with the Euler-Maclaurin end correction: 4th order per panel
    panel = h / 2 * (pdf[1:] + pdf[:-1]) - h * h / 12 * (dpdf[1:] - dpdf[:-1])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), panel.cumsum(0)])
    return x, pdf, cdf / cdf[-1]


def _cdf(dim: int, t: torch.Tensor) -> torch.Tensor:
    """P(X <= t) by cubic Hermite interpolation of the grid CDF (its derivative is the pdf)."""
    x, pdf, cdf = _cdf_grid(dim)
    h = 2.0 / _PANELS
    i = ((t + 1) / h).floor().long().clamp(0, _PANELS - 1)
    s = (t - x[i]) / h
    h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
    h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * cdf[i] + h10 * h * pdf[i] + h01 * cdf[i + 1] + h11 * h * pdf[i + 1]


def _log_norm_const(dim: int) -> float:
    return math.lgamma(dim / 2) - math.lgamma((dim - 1) / 2) - 0.5 * math.log(math.pi)


def _pdf(dim: int, t: torch.Tensor) -> torch.Tensor:
    return math.exp(_log_norm_const(dim)) * (1 - t * t).clamp_min(0) ** ((dim - 3) / 2)


def _first_moment_antiderivative(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Closed form of the integral of x f(x) from -1 to t."""
    return -math.exp(_log_norm_const(dim)) / (dim - 1) * (1 - t * t).clamp_min(0) ** ((dim - 1) / 2)


def _cells(dim: int, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability mass and first moment of each Voronoi cell of `centroids`."""
    edges = torch.cat([centroids.new_tensor([-1.0]), (centroids[1:] + centroids[:-1]) / 2,
                       centroids.new_tensor([1.0])])
    mass = _cdf(dim, edges).diff()
    moment = _first_moment_antiderivative(dim, edges).diff()
    return mass, moment


def _companding_init(dim: int, levels: int) -> torch.Tensor:
    """Quantiles of the high-rate optimal point density f^(1/3)."""
    x, pdf, _ = _cdf_grid(dim)
    density = pdf.pow(1 / 3)
    cum = torch.cat([density.new_zeros(1), ((density[1:] + density[:-1]) / 2).cumsum(0)])
    cum = cum / cum[-1]
    targets = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    j = torch.searchsorted(cum, targets).clamp(1, _PANELS)
    w = (targets - cum[j - 1]) / (cum[j] - cum[j - 1])
    return x[j - 1] + w * (x[j] - x[j - 1])


def _newton_step(dim: int, c: torch.Tensor) -> torch.Tensor:
    """One Newton step on g_k(c) = c_k * mass_k - moment_k = 0 (the centroid condition)."""
    mass, moment = _cells(dim, c)
    t = (c[1:] + c[:-1]) / 2
    upper = torch.cat([(c[:-1] - t) * _pdf(dim, t), c.new_zeros(1)])  # boundary above cell k
    lower = torch.cat([c.new_zeros(1), (c[1:] - t) * _pdf(dim, t)])  # boundary below cell k
    jac = torch.diag(mass + (upper - lower) / 2)
    jac += torch.diag(upper[:-1] / 2, 1) - torch.diag(lower[1:] / 2, -1)
    return c - torch.linalg.solve(jac, c * mass - moment)


def lloyd_max(dim: int, bits: int) -> torch.Tensor:
    """Centroids (2**bits,) float64, ascending and symmetric, for unit vectors in R^dim."""
    if type(dim) is not int or not MIN_DIM <= dim <= MAX_DIM:
        raise ValueError(f"dim must be an int in [{MIN_DIM}, {MAX_DIM}], got {dim!r}")
    if type(bits) is not int or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    return _solve(dim, bits)


@functools.lru_cache(maxsize=None)
def _solve(dim: int, bits: int) -> torch.Tensor:
    """Lloyd iterations from the companding initialisation, then Newton steps to 1e-13 / sqrt(dim)."""
    sigma = 1 / math.sqrt(dim)
    c = _companding_init(dim, 1 << bits)
    for _ in range(200):
        mass, moment = _cells(dim, c)
        c = moment / mass
    for _ in range(50):
        new = _newton_step(dim, c)
        new = (new - new.flip(0)) / 2  # the density is even: keep the codebook exactly symmetric
        step = (new - c).abs().max().item()
        c = new
        if step < 1e-13 * sigma:
            break
    if not (c.diff() > 0).all() or step > 1e-9 * sigma:
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits}")
    return c


def half_table(centroids: torch.Tensor) -> torch.Tensor:
    """The form the `tq::` ops take a codebook symmetric about 0 in: its upper half
    (2**(bits-1),), ascending. Shape says "symmetric", so kernels specialise without reading
    values."""
    return centroids[centroids.shape[0] // 2:]


def full_table(centroids: torch.Tensor, index_bits: int) -> torch.Tensor:
    """All 2**index_bits centroids from an op's `centroids` argument: the table itself, or the
    mirrored upper half (`half_table`) of a symmetric one."""
    if centroids.shape[0] == 1 << index_bits:
        return centroids
    return torch.cat((-centroids.flip(0), centroids))


@functools.lru_cache(maxsize=None)
def mse_distortion(dim: int, bits: int) -> float:
    """Exact D_mse = E||u - u_hat||^2 for a unit vector u in R^dim at `bits` bits."""
    c = lloyd_max(dim, bits)
    mass, _ = _cells(dim, c)
    return float(1 - dim * (mass * c * c).sum())
