"""Gaussian-mixture data with its exact denoiser: the ground truth the solvers are tested on.

Data ``x0 ~ sum_k pi_k N(mu_k, diag(v_k))`` per batch item. In EPS space
``x = x0 + s * eps`` and in flow space ``x = (1 - s) * x0 + s * eps``; with ``a = 1`` or
``a = 1 - s`` each component of ``x`` is ``N(a mu_k, a^2 v_k + s^2)``, so
``E[x0 | x] = sum_k w_k(x) (mu_k + a v_k (x - a mu_k) / (a^2 v_k + s^2))`` with ``w_k`` the
posterior responsibilities. One component gives Gaussian data, whose probability-flow
ODE is solved in closed form by ``gaussian_flow``. A label selects the components a
conditional denoiser draws from, so classifier-free guidance works as in a real model.
"""

import math

import torch


class Mixture:
    def __init__(self, shape, components=4, seed=0, spread=1.0, var_range=(0.05, 0.5), dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        n = math.prod(shape)
        self.shape = tuple(shape)
        self.mu = (spread * torch.randn(components, n, generator=g, dtype=dtype))
        lo, hi = var_range
        self.var = lo + (hi - lo) * torch.rand(components, n, generator=g, dtype=dtype)
        self.logpi = torch.full((components,), -math.log(components), dtype=dtype)

    def sample(self, batch, seed=1, component=None):
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(len(self.mu), (batch,), generator=g) if component is None else torch.full((batch,), component)
        x = self.mu[k] + self.var[k].sqrt() * torch.randn(batch, self.mu.shape[1], generator=g, dtype=self.mu.dtype)
        return x.view(batch, *self.shape)

    def denoise(self, x, sigma, space="eps", mask=None):
        """Exact E[x0 | x] at ``sigma`` (shape (B,)); ``mask`` (B, K) restricts the components."""
        dt = x.dtype
        xf = x.flatten(1).to(self.mu.dtype)
        s = sigma.to(self.mu.dtype).reshape(-1, 1, 1)
        a = torch.ones_like(s) if space == "eps" else 1 - s
        mu, var = self.mu[None].to(x.device), self.var[None].to(x.device)
        tot = a * a * var + s * s
        diff = xf[:, None] - a * mu
        logp = -0.5 * (diff * diff / tot + tot.log()).sum(-1) + self.logpi.to(x.device)
        if mask is not None:
            logp = logp.masked_fill(~mask.to(x.device), -math.inf)
        w = torch.softmax(logp, -1)
        post = mu + a * var * diff / tot
        return (w[..., None] * post).sum(1).view_as(x).to(dt)


class MixtureDenoiser:
    """``model(x, sigma, label=None, cfg=1.0)``: guided denoiser over a Mixture, host contract."""

    def __init__(self, mixture, space="eps", dtype=None):
        self.mixture, self.space, self.dtype, self.calls = mixture, space, dtype, 0

    def __call__(self, x, sigma, label=None, cfg=1.0):
        self.calls += 1
        if self.dtype is not None:
            x = x.to(self.dtype)
        uncond = self.mixture.denoise(x, sigma, self.space)
        if label is None or cfg == 0:
            return uncond
        mask = torch.zeros(x.shape[0], len(self.mixture.mu), dtype=torch.bool, device=x.device)
        mask[torch.arange(x.shape[0]), torch.as_tensor(label, device=x.device)] = True
        cond = self.mixture.denoise(x, sigma, self.space, mask)
        return uncond + cfg * (cond - uncond)


def gaussian_flow(x, sigma_from, sigma_to, mu, var, space="eps"):
    """Exact probability-flow ODE solution for Gaussian data N(mu, diag(var)) between two sigmas."""
    shape = x.shape
    xf = x.flatten(1).to(mu.dtype)
    a0 = 1.0 if space == "eps" else 1.0 - sigma_from
    a1 = 1.0 if space == "eps" else 1.0 - sigma_to
    t0 = (a0 * a0 * var + sigma_from ** 2).sqrt()
    t1 = (a1 * a1 * var + sigma_to ** 2).sqrt()
    return (a1 * mu + t1 / t0 * (xf - a0 * mu)).view(shape).to(x.dtype)


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    """An ascending Karras schedule with a leading 0, as inversion uses it."""
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_min ** (1 / rho) + r * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return torch.cat([torch.zeros(1, dtype=torch.float64), s])


def uniform_flow(n, top=1.0):
    """An ascending uniform flow schedule 0, 1/n, ..., top."""
    return torch.linspace(0, top, n + 1, dtype=torch.float64)
