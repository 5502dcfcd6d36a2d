"""The implicit methods never fail silently: budget, step splitting, DDIM fallback, summary.

A Gaussian mixture whose components lie far apart compared with their width (spread 3,
variances 0.01 to 0.05) has a denoiser that switches sharply between modes; with the
host's default schedules at 10 steps it is the case where AIDI-A used to land in another
mode (relative error 1.0 for flow seed 0 before step splitting). Schedules are the host's:
SD1.5 ``normal`` and flow shift 3 ``simple``, written here from their definitions.
"""

import math

import pytest
import torch

from analytic import Mixture, MixtureDenoiser
from measure import worst_rel
from inversion_suite.solvers import METHODS, invert, reconstruct
from inversion_suite.solvers.methods import aidi_anderson as aa
from inversion_suite.solvers.methods.euler import sample_euler
from inversion_suite.solvers.record import Inversion, summary

IMPLICIT = ("fixed_point", "aidi_anderson", "aidi_empirical")


def sd15_normal(n):
    """ComfyUI's ``normal`` scheduler on SD1.5's discrete schedule, ascending from 0.

    Betas linear in sqrt from 0.00085 to 0.012 over 1000 steps, ``sigma = sqrt((1 - acp) / acp)``;
    ``n`` timesteps evenly spaced from 999 to 0, sigma interpolated in log between the
    table's entries (float32, as the host holds them), then 0.
    """
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    log_sigmas = (((1 - acp) / acp) ** 0.5).float().log()
    t = torch.linspace(999, 0, n)
    w = t.frac()
    s = ((1 - w) * log_sigmas[t.floor().long()] + w * log_sigmas[t.ceil().long()]).exp()
    return torch.cat([s.double(), torch.zeros(1, dtype=torch.float64)]).flip(0)


def flow_simple(n, shift=3.0):
    """ComfyUI's ``simple`` scheduler on a discrete flow model with ``shift`` (SD3), ascending.

    The model's table is ``shift t / (1 + (shift - 1) t)`` at ``t = 1/1000 .. 1``; ``simple``
    takes every ``1000 / n``-th entry from the top, then 0.
    """
    t = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    s = [float(table[-(1 + int(i * 1000 / n))]) for i in range(n)] + [0.0]
    return torch.tensor(s, dtype=torch.float64).flip(0)


SCHEDULES = {"eps": sd15_normal, "flow": flow_simple}


def separated(seed):
    return Mixture((4, 8, 8), components=4, seed=seed, spread=3.0, var_range=(0.01, 0.05))


def case(space, seed, steps=10):
    mix = separated(seed)
    return MixtureDenoiser(mix, space), mix.sample(2, seed=10 + seed).float(), SCHEDULES[space](steps)


def test_schedules_match_the_hosts_ends():
    eps, flow = sd15_normal(10), flow_simple(10)
    assert eps[0] == 0 and abs(eps[-1].item() - 14.6146) < 1e-3 and abs(eps[1].item() - 0.0292) < 1e-3
    assert flow[0] == 0 and flow[-1] == 1 and abs(flow[1].item() - 0.25) < 1e-6  # t = 0.1 shifted
    assert (eps.diff() > 0).all() and (flow.diff() > 0).all()


def test_the_case_needs_step_splitting():
    # Without splitting (depth 0), at the old 5 calls per step, the flow case lands far off:
    # the case is hard, and the bound below is not met by iterating alone.
    den, x, sig = case("flow", 0)
    settings = dict(METHODS["aidi_anderson"].defaults(), iterations=5)
    inv = aa.invert_aidi_anderson(den, x, sig, space="flow", depth=0, **settings)
    assert inv.unconverged and worst_rel(sample_euler(den, inv.latent, inv.sigmas.flip(0), space="flow"), x) > 1e-3


# NFE measured at the defaults (tol 3e-3 of round trip, carry 0), seeds 0 to 5: eps 25 to 40, flow 39 to 55.
NFE = {"eps": 52, "flow": 60}
TOL = 3e-3  # the registry's default round-trip target


def test_the_default_target_is_the_registrys():
    assert all(METHODS[m].settings["tol"].default == TOL for m in IMPLICIT)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("space", ["eps", "flow"])
def test_anderson_defaults_round_trip_well_separated_modes(space, seed):
    # Within its target and within the error it reports (the estimate the node shows with measure off).
    den, x, sig = case(space, seed)
    inv = invert("aidi_anderson", den, x, sig, space=space)
    err = worst_rel(reconstruct(den, inv), x)
    print(f"{space} seed {seed}: rel {err:.1e}, estimate {sum(inv.costs):.1e}, nfe {inv.nfe}, "
          f"steps {inv.base_steps} -> {inv.steps}")
    assert err <= TOL and err <= sum(inv.costs)
    assert inv.unconverged == [] and sum(inv.costs) <= TOL * (1 + 1e-9)
    assert 10 <= inv.nfe <= NFE[space] and inv.nfe <= inv.budget == 160
    assert "every step converged" in summary(inv)


@pytest.mark.parametrize("name", ["fixed_point", "aidi_empirical"])
@pytest.mark.parametrize("space", ["eps", "flow"])
def test_simpler_iterations_converge_or_say_so(name, space):
    for seed in (0, 1, 2):
        den, x, sig = case(space, seed)
        inv = invert(name, den, x, sig, space=space)
        err = worst_rel(reconstruct(den, inv), x)
        assert inv.nfe <= inv.budget == 160
        text = summary(inv)
        if not inv.unconverged:  # what the node says is so: the round trip holds
            assert "every step converged" in text and "did NOT" not in text
            assert err <= TOL, f"{name} {space} seed {seed}: said converged, off by {err:.1e}"
        else:
            assert f"{len(inv.unconverged)} of {inv.steps} steps did NOT converge" in text


def forward_error(den, xa, xb, sa, sb):
    """Per item ||Euler step from xb at sb down to sa, minus xa|| / ||xb||."""
    d = (xb - den(xb, torch.full((xb.shape[0],), sb))) / sb
    return (xb + (sa - sb) * d - xa).flatten(1).norm(dim=1) / xb.flatten(1).norm(dim=1)


@pytest.mark.parametrize("space", ["eps", "flow"])
def test_unsolved_steps_keep_about_ddims_error_or_less(space):
    # An image far off the data: x plus 3x its scale in noise, 30 steps. Almost no step
    # converges; each kept state must reproduce its step's start about as well as the
    # DDIM step from the same start does, or better.
    den, x, _ = case(space, 0)
    x = x + 3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    inv = invert("aidi_anderson", den, x, SCHEDULES[space](30), space=space, keep_trajectory=True)
    assert len(inv.unconverged) > inv.steps // 2 and inv.kept_ddim
    assert set(inv.kept_ddim) <= set(inv.unconverged) and inv.nfe <= inv.budget
    s, t = [float(v) for v in inv.sigmas], inv.trajectory
    worst = []
    scale = lambda v: 1 / math.sqrt(1 + v * v) if space == "eps" else 1.0
    for i in inv.unconverged:
        xa, xb, sa, sb = t[i], t[i + 1], s[i], s[i + 1]
        ddim = xa + (sb - sa) * (xa * scale(sa) / scale(sb) - den(xa * scale(sa) / scale(sb), torch.full((2,), sb))) / sb
        kept, base = forward_error(den, xa, xb, sa, sb), forward_error(den, xa, ddim, sa, sb)
        worst.append((kept / base).max().item())
        # The residual recorded is the best iterate's own, measured; what is kept (F of it) is at most 3 times that.
        assert kept.max().item() <= 3 * inv.residuals[i], (i, kept, inv.residuals[i])
    # F of the best iterate is chosen on an estimate of its error (the step's largest contraction times the
    # iterate's), so a few steps end slightly above DDIM's step: measured 1.68x at most (eps), 1.11x (flow).
    assert max(worst) <= 2 and sorted(worst)[len(worst) * 9 // 10] <= 1.05, sorted(worst)[-5:]
    text = summary(inv)
    assert f"{len(inv.unconverged)} of {inv.steps} steps did NOT converge" in text
    assert f"{len(inv.kept_ddim)} of them" in text and "kept the DDIM step" in text


def test_split_sigmas_reconstruct_through_the_registry():
    den, x, sig = case("flow", 0)
    inv = invert("aidi_anderson", den, x, sig, space="flow", keep_trajectory=True)
    assert inv.steps > inv.base_steps == 10 and inv.split
    s = inv.sigmas.tolist()
    assert all(v in s for v in sig.tolist())  # the host's sigmas stay, new ones go between
    # The stalled step out of sigma 0 was split into quarters at once (its lower half would stall again).
    assert 0 in inv.split and s[1:4] == [float(torch.tensor(sig[1].item() * f)) for f in (0.25, 0.5, 1.0)]
    assert len(inv.trajectory) == inv.steps + 1 and len(inv.residuals) == len(inv.costs) == inv.steps
    assert worst_rel(reconstruct(den, inv), x) <= TOL
    # Sampling down the host's own 10 sigmas from the same latent misses: the split ones are needed.
    coarse = Inversion(latent=inv.latent, sigmas=sig.float(), method=inv.method, space="flow", settings=inv.settings,
                       nfe=inv.nfe, sampler="euler")
    assert worst_rel(reconstruct(den, coarse), x) > 1e-3


@pytest.mark.parametrize("space", ["eps", "flow"])
def test_the_extrapolated_guess_is_linear_in_log_sigma(space):
    # x_a + (sb - sa) e, e = e1 + (e1 - e0) log(sb / sa) / log(sa / s1): e1, e0 the slopes (x_a - x1) / (sa - s1),
    # (x1 - x0) / (s1 - s0) of the last two steps; one step back, e1; none, the DDIM guess. Float64, to 1e-12.
    from inversion_suite.solvers import implicit as im
    from inversion_suite.solvers.core import vp_scale
    g = torch.Generator().manual_seed(2)
    x0, x1, xa = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    s0, s1, sa, sb = (0.0, 0.2, 0.45, 0.8) if space == "flow" else (0.0, 0.3, 0.9, 2.1)
    e1, e0 = (xa - x1) / (sa - s1), (x1 - x0) / (s1 - s0)
    want = xa + (sb - sa) * (e1 + (e1 - e0) * math.log(sb / sa) / math.log(sa / s1))
    got = im.guess_point(xa, sa, sb, space, [(s0, x0), (s1, x1)])
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.allclose(im.guess_point(xa, sa, sb, space, [(s1, x1)]), xa + (sb - sa) * e1, rtol=0, atol=1e-12)
    assert torch.equal(im.guess_point(xa, sa, sb, space, []), xa * (vp_scale(sa, space) / vp_scale(sb, space)))


# --- Anderson: the incrementally updated system equals the rebuilt one ------------------

def rebuilt(history, carried, m, beta, lam):
    """The next iterate from scratch, as the method did before: stack the columns, form dR^T dR."""
    xs, gs, rs = zip(*history)
    keep = torch.ones(xs[0].shape[0], dtype=torch.bool)
    for k in range(1, len(rs)):
        keep &= rs[k] * aa.CARRY_GAIN <= rs[k - 1]
    cols = [(dx * keep[:, None], dg * keep[:, None]) for dx, dg in carried]
    first = max(0, len(xs) - m)
    cols += [(xs[j + 1] - xs[j], gs[j + 1] - gs[j]) for j in range(first, len(xs) - 1)]
    x, g = xs[-1], gs[-1]
    if not cols:
        return (1 - beta) * x + beta * g
    dX = torch.stack([c[0] for c in cols], 1)
    dR = torch.stack([c[1] - c[0] for c in cols], 1)
    A, b = dR @ dR.transpose(1, 2), (dR @ (g - x)[..., None])[..., 0]
    # (A + reg I) gamma = b, reg = lam * tr(A) / columns: one torch solve per item
    reg = lam * A.diagonal(dim1=1, dim2=2).sum(-1) / len(cols) + aa.TINY
    gamma, info = torch.linalg.solve_ex(A + reg[:, None, None] * torch.eye(len(cols), dtype=A.dtype), b[..., None])
    gamma, ok = gamma[..., 0], info == 0
    mixed = (1 - beta) * (x - (gamma[:, None] @ dX)[:, 0]) + beta * (g - (gamma[:, None] @ (dR + dX))[:, 0])
    grew = rs[-1] > rs[-2] if len(rs) > 1 else torch.zeros_like(ok)
    return torch.where((grew | ~ok)[:, None], (1 - beta) * x + beta * g, mixed)


@pytest.mark.parametrize("m,beta,carry", [(3, 1.0, 4), (5, 0.7, 0), (1, 1.0, 3), (4, 1.0, 6)])
def test_incremental_anderson_equals_the_rebuilt_solve(m, beta, carry):
    g0 = torch.Generator().manual_seed(m + carry)
    B, n = 3, 64
    target = torch.randn(B, n, generator=g0, dtype=torch.float64)
    W = 0.6 * torch.randn(n, n, generator=g0, dtype=torch.float64) / math.sqrt(n)
    F = lambda x: target + torch.tanh(x @ W)  # a nonlinear contraction, fixed point near target
    carried = [(torch.randn(B, n, generator=g0, dtype=torch.float64),) * 1 for _ in range(carry)]
    carried = [(dx, F(dx) - F(torch.zeros_like(dx)) + 0.1 * dx) for (dx,) in carried]  # secant-like pairs
    state = aa.Anderson(carried, m, beta, 1e-6)
    x, history = torch.zeros(B, n, dtype=torch.float64), []
    for k in range(12):
        g = F(x)
        r = (g - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
        history.append((x, g, r))
        nxt = state(x, g, g - x, r.tolist())
        ref = rebuilt(history, carried, m, beta, 1e-6)
        assert torch.allclose(nxt, ref, rtol=1e-12, atol=1e-12), (k, (nxt - ref).abs().max())
        x = nxt
    assert (F(x) - x).norm() < 1e-4 * x.norm()  # and the iteration is converging


@pytest.mark.parametrize("space,sb,h,beta", [("eps", 2.0, 0.7, 1.0), ("flow", 0.6, 0.1, 1.0), ("flow", 0.6, 0.1, 0.7),
                                            ("flow", 1.0, 0.05, 1.0)])
def test_carried_buffers_equal_the_transported_pairs(space, sb, h, beta):
    # The frames kept in place (implicit.Frames: their columns written and mixed straight
    # from the buffers, dR held divided by a scale) give the iterates of the same pairs
    # transported one by one (implicit.transported) and handed over as a list.
    from inversion_suite.solvers import implicit as im
    g0 = torch.Generator().manual_seed(3)
    B, n, carry = 2, 48, 4
    target = torch.randn(B, n, generator=g0, dtype=torch.float64)
    W = 0.5 * torch.randn(n, n, generator=g0, dtype=torch.float64) / math.sqrt(n)
    F = lambda x: target + torch.tanh(x @ W)
    frames, kept = im.PairRing(carry), []
    for j in range(6):  # more pairs than the ring holds: the last `carry` stay
        dx = torch.randn(B, n, generator=g0, dtype=torch.float64)
        dg = F(dx) - F(torch.zeros_like(dx)) + 0.1 * dx
        s_old, h_old = 1.5 * sb if space == "eps" else min(0.9, sb + 0.2), 0.3 * h
        frames.add(dx, dg, s_old, h_old, space)
        kept = (kept + [im.transport_frame(dx, dg, s_old, h_old, space)])[-carry:]
    listed = [im.transported(p, q, sb, h, space) for p, q in kept]
    a, b = aa.Anderson(frames.at(sb, h, space), 3, beta, 1e-6), aa.Anderson(listed, 3, beta, 1e-6)
    assert a.nc == b.nc == carry
    x = torch.zeros(B, n, dtype=torch.float64)
    for k in range(6):
        g = F(x)
        r = (g - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-30)
        xa, xb = a(x, g, g - x, r.tolist()), b(x, g, g - x, r.tolist())
        assert torch.allclose(xa, xb, rtol=1e-10, atol=1e-12), (k, (xa - xb).abs().max())
        assert not torch.equal(xa, g)  # the carried columns took part (not the plain step)
        x = xa


@pytest.mark.parametrize("m,beta", [(4, 1.0), (4, 0.7), (1, 1.0)])
def test_a_steps_pairs_are_the_moves_between_its_last_evaluations(m, beta):
    # A step hands on the last `keep` secant pairs from Anderson's own columns and its last
    # move instead of holding its iterates: they are the differences of the evaluated
    # iterates and of their F values, oldest first (m = 1 keeps no columns: the last move only).
    from inversion_suite.solvers import implicit as im
    from inversion_suite.solvers.core import Denoiser
    g0 = torch.Generator().manual_seed(5)
    B, n, sa, sb = 2, 40, 0.5, 0.8
    W = 0.9 * torch.randn(n, n, generator=g0, dtype=torch.float64) / math.sqrt(n)
    seen = []

    def model(x, sigma):  # a nonlinear denoiser, so the step needs several calls
        seen.append(x.flatten(1).clone())
        return torch.tanh(x.flatten(1) @ W).view(x.shape)

    x_a = torch.randn(B, 1, n, generator=g0, dtype=torch.float64)
    F = lambda x: x_a.flatten(1) + (sb - sa) / sb * (x - torch.tanh(x @ W))
    att = im.solve_step(Denoiser(model, None, "test"), x_a=x_a, sa=sa, sb=sb, start=x_a.clone(),
                        update=aa.anderson(m, beta, 1e-6), calls=30, target=1e-10, keep=3)
    assert len(seen) >= 4  # enough evaluations that the ring of own columns has wrapped or filled
    want = [(b - a, F(b) - F(a)) for a, b in zip(seen, seen[1:])][-(min(3, m) if m > 1 else 1):]
    assert len(att.pairs) == len(want)
    for (dx, dg), (wx, wg) in zip(att.pairs, want):
        assert torch.allclose(dx, wx, rtol=0, atol=1e-12) and torch.allclose(dg, wg, rtol=0, atol=1e-12)


def test_a_measured_round_trip_that_misses_tol_is_not_called_converged():
    den, x, sig = case("flow", 0)
    inv = invert("aidi_anderson", den, x, sig, space="flow")
    assert not inv.unconverged
    err = worst_rel(reconstruct(den, inv), x)
    text = summary(inv, err)
    assert f"Round trip measured: {err:.1e} relative" in text and "Estimated" not in text
    tight = summary(inv, 1e-9)
    assert "every step converged" in tight and "misses" not in tight
    loose = summary(inv, 10 * inv.settings["tol"])
    assert "converged" not in loose and "misses it" in loose and "Raise iterations" in loose
    assert summary(inv) == summary(inv, None) and "Estimated reconstruction error" in summary(inv)


# --- cfg 3 with a negative prompt: never worse than DDIM, or said so ------------------------------

class Guided:
    """The exact guided denoiser of a positive and a negative prompt, as the host's CFG with a negative
    prompt connected runs it: ``D_neg + cfg (D_pos - D_neg)``, each prompt selecting one component."""

    def __init__(self, mixture, space, pos=1, neg=2, cfg=3.0):
        self.mixture, self.space, self.pos, self.neg, self.cfg = mixture, space, pos, neg, cfg

    def __call__(self, x, sigma):
        def one(k):
            mask = torch.zeros(x.shape[0], len(self.mixture.mu), dtype=torch.bool)
            mask[:, k] = True
            return self.mixture.denoise(x, sigma, self.space, mask)
        neg = one(self.neg)
        return neg + self.cfg * (one(self.pos) - neg)


@pytest.mark.parametrize("iterations", [2, 3, 4, None])
@pytest.mark.parametrize("space", ["eps", "flow"])
def test_cfg3_with_a_negative_is_never_worse_than_ddim_or_says_so(space, iterations):
    # The mixture of the executor test (seed 0) and of seeds 3 to 5, 10 steps, cfg 3: at the defaults (None) and
    # at budgets down to 2 calls a step, every implicit method's round trip is no worse than DDIM's, or its
    # record lists unconverged steps (the node then shows the measured figure).
    for seed in (0, 3, 4, 5):
        mix = separated(seed)
        den, x, sig = Guided(mix, space), mix.sample(2, seed=10 + seed).float(), SCHEDULES[space](10)
        base = worst_rel(reconstruct(den, invert("ddim", den, x, sig, space=space)), x)
        for name in IMPLICIT:
            inv = invert(name, den, x, sig, space=space, **({} if iterations is None else {"iterations": iterations}))
            err = worst_rel(reconstruct(den, inv), x)
            print(f"{space} seed {seed} {name} @{iterations}: {err:.1e} (ddim {base:.1e}, ratio {err / base:.3f}), "
                  f"unconverged {inv.unconverged}")
            # Measured: all 96 cases at or below DDIM (worst 0.984x), so the stricter form is asserted; the
            # node would otherwise list the unconverged steps and show the measured figure.
            assert err <= base, (name, seed, err, base, inv.unconverged)
            assert inv.nfe <= inv.budget
            if iterations is None and space == "flow" and name != "aidi_empirical":
                # The estimate shown with the node's check off: within 3x here (measured 0.8x to 1.7x). On EPS at
                # cfg 3 the guided sampling grows the steps' errors and it is 6-8x low (see benchmarks/README.md).
                assert err / 3 <= sum(inv.costs) <= 3 * err, (name, seed, err, sum(inv.costs))
