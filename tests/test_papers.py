"""The pack against its papers' official code, restated here from the equations.

EDICT (salesforce/EDICT, ``coupled_stablediffusion``) and ReNoise (garibida/ReNoise-
Inversion, ``inversion_step``) are written below as their code runs them: in alpha-bar /
timestep form on Stable Diffusion's discrete schedule, with an eps-predicting model. The
pack runs the same steps in sigma form on the matching sigmas. Both use the exact
Gaussian-mixture denoiser in float64, so any difference beyond rounding is a difference of
method. The official schedulers are taken with ``set_alpha_to_one=True`` (their first
inversion step then starts at alpha-bar 1, sigma 0, as the host's schedules do).

Also: nothing about a method is written twice and disagrees (registry against solvers).
"""

import inspect

import pytest
import torch

from analytic import Mixture, MixtureDenoiser, karras, uniform_flow
from measure import rel
from inversion_suite.solvers import METHODS, SAMPLERS, Inversion, SolverError, check_record, invert, reconstruct
from inversion_suite.solvers.methods.edict import sample_edict
from inversion_suite.solvers.methods.renoise import low_noise_sigma
from inversion_suite.solvers.registry import plain

MIX = Mixture((4, 8, 8), components=4, seed=0)
EXTRA = {"label": [0, 1], "cfg": 2.0}
TOL = 1e-12  # relative: float64 rounding through 10-20 steps

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ABAR = torch.cumprod(1 - BETAS, 0)


def data():
    return MIX.sample(2, seed=5).double()


def abar(t):
    return 1.0 if t < 0 else float(ABAR[t])


def sd_timesteps(n):
    """DDIM's timesteps for n steps, ascending (as inversion walks them)."""
    return [k * (1000 // n) for k in range(n)]


def sd_sigmas(n):
    """The same levels as host sigmas: 0, then sigma(t) = sqrt((1 - abar) / abar)."""
    return torch.tensor([0.0] + [((1 - abar(t)) / abar(t)) ** 0.5 for t in sd_timesteps(n)], dtype=torch.float64)


def unet(den, z, t):
    """An eps-predicting model on VP latents z at timestep t, from the host-contract denoiser."""
    a = abar(t)
    s = ((1 - a) / a) ** 0.5
    x = z / a ** 0.5
    return (x - den(x, torch.full((z.shape[0],), s, dtype=z.dtype), **EXTRA)) / s


# -- EDICT, as coupled_stablediffusion runs it ----------------------------------------

def ddim_down(eps, t, dt, z):
    """DDIM from timestep t to t - dt, written as the paper's (a, b) affine step."""
    a_t, a_p = abar(t), abar(t - dt)
    q = (a_t / a_p) ** 0.5
    return z / q - (1 - a_t) ** 0.5 / q * eps + (1 - a_p) ** 0.5 * eps


def ddim_up(eps, t, dt, z):
    """Its exact inverse, from t - dt up to t."""
    a_t, a_p = abar(t), abar(t - dt)
    q = (a_t / a_p) ** 0.5
    return q * z + (1 - a_t) ** 0.5 * eps - q * (1 - a_p) ** 0.5 * eps


def order(i, n, leapfrog, reverse):
    """Chain indices in update order for loop index i, as the official loop picks them."""
    out = []
    for li in range(2):
        if reverse:
            li = (li + (n - (i + 1) + 1) % 2) % 2 if leapfrog else (li + 1) % 2
        elif leapfrog:
            li = (li + i % 2) % 2
        out.append(li)
    return out


def edict_official(model_eps, pair, ts, dt, p, leapfrog, reverse):
    """The coupled loop: model input the other chain as it stands, at the step's timestep t."""
    pair = [pair[0].clone(), pair[1].clone()]
    ts = list(reversed(ts)) if not reverse else list(ts)
    for i, t in enumerate(ts):
        if reverse:
            pair[1] = (pair[1] - (1 - p) * pair[0]) / p
            pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        for li in order(i, len(ts), leapfrog, reverse):
            eps = model_eps(pair[1 - li], t)
            pair[li] = (ddim_up if reverse else ddim_down)(eps, t, dt, pair[li])
        if not reverse:
            pair[0] = p * pair[0] + (1 - p) * pair[1]
            pair[1] = (1 - p) * pair[0] + p * pair[1]
    return pair


@pytest.mark.parametrize("leapfrog", [True, False])
def test_edict_matches_the_official_code_eps(leapfrog):
    n, p = 10, 0.93
    den, x = MixtureDenoiser(MIX, "eps"), data()
    ts = sd_timesteps(n)
    inv = invert("edict", den, x, sd_sigmas(n), EXTRA, space="eps", p=p, order="leapfrog" if leapfrog else "fixed")
    z = edict_official(lambda z, t: unet(den, z, t), [x, x], ts, 1000 // n, p, leapfrog, reverse=True)
    k = abar(ts[-1]) ** 0.5  # x = z / sqrt(abar)
    assert rel(inv.latent, z[0] / k) < TOL and rel(inv.pair, z[1] / k) < TOL
    # sampling from the official pair, in both coordinates
    back = edict_official(lambda z, t: unet(den, z, t), z, ts, 1000 // n, p, leapfrog, reverse=False)
    mine = sample_edict(den, z[0] / k, sd_sigmas(n).flip(0), EXTRA, space="eps", pair=z[1] / k, p=p,
                        order=inv.settings["order"])
    assert rel(mine, back[0]) < TOL
    assert rel(back[0], x) < 1e-12  # and the official round trip is exact, as the pack's


def test_edict_leapfrog_changes_the_pair():
    """Leapfrog is the default and matters: the fixed order gives another pair (the rescaling is
    checked against the official code above)."""
    n = 10
    den, x = MixtureDenoiser(MIX, "eps"), data()
    lf = invert("edict", den, x, sd_sigmas(n), EXTRA, space="eps")
    fx = invert("edict", den, x, sd_sigmas(n), EXTRA, space="eps", order="fixed")
    assert lf.settings["order"] == "leapfrog"
    assert rel(lf.latent, fx.latent) > 1e-3


@pytest.mark.parametrize("leapfrog", [True, False])
def test_edict_flow_analogue(leapfrog):
    """Flow: the same loop with z = x and the velocity in place of DDIM's step."""
    n, p = 10, 0.9
    den, x = MixtureDenoiser(MIX, "flow"), data()
    sig = uniform_flow(n)

    def vel(x, s):
        return (x - den(x, torch.full((x.shape[0],), s, dtype=x.dtype), **EXTRA)) / s

    idx = list(range(1, n + 1))  # step "timestep" t = index of its upper sigma
    inv = invert("edict", den, x, sig, EXTRA, space="flow", p=p, order="leapfrog" if leapfrog else "fixed")
    pair = [x.clone(), x.clone()]
    for i, t in enumerate(idx):
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        for li in order(i, n, leapfrog, True):
            pair[li] = pair[li] + (float(sig[t]) - float(sig[t - 1])) * vel(pair[1 - li], float(sig[t]))
    assert rel(inv.latent, pair[0]) < TOL and rel(inv.pair, pair[1]) < TOL
    assert rel(reconstruct(den, inv, EXTRA), x) < 1e-12


# -- ReNoise, as inversion_step runs it -----------------------------------------------

def ac_loss(x, gen):
    """pix2pix-zero's auto-correlation loss, one item: per channel, random roll, pooled levels."""
    loss = 0.0
    for c in range(x.shape[1]):
        noise = x[:, c:c + 1]
        while True:
            r = torch.randint(0, noise.shape[2] // 2, (1,), generator=gen).item()
            loss = loss + (noise * torch.roll(noise, shifts=r, dims=2)).mean() ** 2
            loss = loss + (noise * torch.roll(noise, shifts=r, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            h, w = noise.shape[2] // 2, noise.shape[3] // 2  # 2x2 average pooling
            noise = noise[..., :2 * h, :2 * w].reshape(1, 1, h, 2, w, 2).mean((3, 5))
    return loss


def kl_loss(x0, x1, ps=4):
    """Patch KL: 4x4 patches per channel, |log ratio + (v0 + dm^2) / v1 - 1| summed."""
    def patches(t):
        return t.unfold(2, ps, ps).unfold(3, ps, ps).reshape(t.shape[0], t.shape[1], -1, ps * ps)
    a, b = patches(x0), patches(x1)
    m0, m1, v0, v1 = a.mean(-1), b.mean(-1), a.var(-1), b.var(-1)
    return (torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1).abs().sum()


def noise_regularization(e, opt, lambda_kl, lambda_ac, steps, rolls, gen):
    for _ in range(steps):
        if lambda_kl > 0:
            v = e.detach().clone().requires_grad_(True)
            kl_loss(v, opt).backward()
            e = e - lambda_kl * torch.clip(v.grad.detach(), -100, 100)
        if lambda_ac > 0:
            for _ in range(rolls):
                v = e.detach().clone().requires_grad_(True)
                ac_loss(v, gen).backward()
                e = e - lambda_ac * v.grad.detach() / rolls
        e = e.detach()
    return e


def renoise_official(model_eps, z0, ts, dt, K, avg_range, first_range, reg_steps=0, gen=None,
                     lam_ac=20.0, lam_kl=0.065):
    """The per-step loop of inversion_step with a DDIM scheduler; counts the model calls."""
    calls = [0]

    def eps_at(z, t):
        calls[0] += 1
        return model_eps(z, t)

    noise = torch.randn(z0.shape, generator=gen, dtype=z0.dtype) if reg_steps else None
    z = z0
    for t in ts:
        first = t < 250
        rng = first_range if first else avg_range
        k = min(5, K) if first else K
        avg, opt = None, None
        if reg_steps:  # the official batches this with call 0; it counts as a call here
            opt = eps_at(abar(t) ** 0.5 * z0 + (1 - abar(t)) ** 0.5 * noise, t)
        zt = z.clone()
        for i in range(k + 1):
            e = eps_at(zt, t)
            if rng[0] <= i < rng[1]:
                j = i - rng[0]
                avg = e.clone() if avg is None else j * avg / (j + 1) + e / (j + 1)
            if i >= rng[0]:
                e = noise_regularization(e, opt, lam_kl, lam_ac, reg_steps, 5, gen)
            zt = ddim_up(e, t, dt, z)
        if avg is not None:
            avg = noise_regularization(avg, opt, lam_kl, lam_ac, reg_steps, 5, gen)
            zt = ddim_up(avg, t, dt, z)
        z = zt
    return z, calls[0]


@pytest.mark.parametrize("K, window, first", [(1, (8, 10), (0, 5)), (9, (8, 10), (0, 5)), (4, (3, 5), (0, 5))])
def test_renoise_matches_the_official_step_rule(K, window, first):
    """Counting (K renoising steps = K + 1 calls), the low-noise window and cap on every t < 250.
    The official code cuts a window to the calls silently; the pack takes the cut window and
    refuses the uncut one before any call."""
    n = 10
    den, x = MixtureDenoiser(MIX, "eps"), data()
    ts = sd_timesteps(n)
    z, calls = renoise_official(lambda z, t: unet(den, z, t), x, ts, 1000 // n, K, window, first)
    cut = lambda w, c: (min(w[0], c), min(w[1], c))  # noqa: E731
    run = lambda w, f: invert("renoise", den, x, sd_sigmas(n), EXTRA, space="eps", iterations=K + 1,  # noqa: E731
                              window=w, first_window=f, first_iterations=6, first_until=0.25)
    inv = run(cut(window, K + 1), cut(first, min(6, K + 1)))
    assert rel(inv.latent, z / abar(ts[-1]) ** 0.5) < TOL
    assert inv.nfe == calls == 3 * (min(5, K) + 1) + 7 * (K + 1)  # t = 0, 100, 200 are below 250
    if (window, first) != (cut(window, K + 1), cut(first, min(6, K + 1))):
        before = den.calls
        with pytest.raises(SolverError, match="renoise: (first_)?window .* raise iterations"):
            run(window, first)
        assert den.calls == before


def test_renoise_regularisation_matches_the_official_code():
    """SDXL-Turbo's counting with the default noise regularisation (auto-correlation and KL)."""
    n, seed = 4, 7
    mix = Mixture((4, 16, 16), components=3, seed=2)  # 16 pixels: two auto-correlation levels
    den, x = MixtureDenoiser(mix, "eps"), mix.sample(1, seed=4).double()
    extra = {"label": [1], "cfg": 1.0}

    def eps(z, t):
        a = abar(t)
        s = ((1 - a) / a) ** 0.5
        return (z / a ** 0.5 - den(z / a ** 0.5, torch.full((1,), s, dtype=z.dtype), **extra)) / s

    ts = sd_timesteps(n)
    z, calls = renoise_official(eps, x, ts, 1000 // n, 9, (8, 10), (0, 5), reg_steps=4,
                                gen=torch.Generator().manual_seed(seed))
    inv = invert("renoise", den, x, sd_sigmas(n), extra, space="eps", iterations=10, window=(8, 10),
                 first_window=(0, 5), reg_steps=4, lambda_ac=20.0, lambda_kl=0.065, reg_seed=seed)
    plain_inv = invert("renoise", den, x, sd_sigmas(n), extra, space="eps", iterations=10, window=(8, 10))
    # The gradient steps amplify rounding: moving the input by 1e-15 moves the official
    # result by 3e-9 (measured), so this is float64 rounding, not a difference of method.
    assert rel(inv.latent, z / abar(ts[-1]) ** 0.5) < 1e-8
    assert rel(inv.latent, plain_inv.latent) > 1e-3  # the regularisation did something
    assert inv.nfe == calls == 6 + 3 * 10 + 4  # t = 0 is low-noise; one reference call per step


def test_renoise_low_noise_steps_in_sigma():
    """t < 250 is sigma < 0.6958 on SD's schedule (13 of 50 DDIM steps); flow reads sigma < 0.25."""
    cut = low_noise_sigma(0.25, "eps")
    assert abs(cut - ((1 - abar(250)) / abar(250)) ** 0.5) < 1e-12
    assert int((sd_sigmas(50)[1:] < cut).sum()) == 13 and int((sd_sigmas(10)[1:] < cut).sum()) == 3
    den = MixtureDenoiser(MIX, "flow")
    inv = invert("renoise", den, data(), uniform_flow(10), EXTRA, space="flow", iterations=8, first_iterations=3,
                 first_window=(1, 3))
    assert inv.nfe == 2 * 3 + 8 * 8  # sigma 0.1 and 0.2 end below 0.25


@pytest.mark.parametrize("settings,words", [
    (dict(iterations=3), r"window \(3, 5\) averages calls 3 to 4 of a step, but iterations 3 makes 3 calls a step: "
                         r"raise iterations to at least 5, or give a window within \(0, 3\)"),
    (dict(iterations=2, window=(0, 2)), r"first_window \(3, 5\) .* the low-noise steps make \(the fewer of "
                                        r"iterations 2 and first_iterations 6\) 2 calls a step: raise iterations and "
                                        r"first_iterations to at least 5"),
    (dict(iterations=9, window=(8, 10)), r"window \(8, 10\) .* iterations 9 makes 9 calls"),
    (dict(first_iterations=4), r"first_window \(3, 5\) .* first_iterations 4\) 4 calls")])
def test_renoise_refuses_a_window_its_calls_do_not_reach_before_any_call(settings, words):
    """Call 3 of 3 is never made: the window would be dropped (plain fixed point) or cut short."""
    den = MixtureDenoiser(MIX, "eps")
    with pytest.raises(SolverError, match=f"^renoise: {words}"):
        invert("renoise", den, data(), karras(6), EXTRA, space="eps", **settings)
    assert den.calls == 0


def test_renoise_checks_only_the_windows_its_steps_use():
    """A schedule with no low-noise step never uses first_window; one all low-noise never uses window."""
    cut = low_noise_sigma(0.25, "eps")
    den, x = MixtureDenoiser(MIX, "eps"), data()
    high = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    inv = invert("renoise", den, x, high, EXTRA, space="eps", first_iterations=2)
    assert inv.nfe == 3 * 5
    low = torch.tensor([0.0, cut / 4, cut / 2], dtype=torch.float64)
    inv = invert("renoise", den, x, low, EXTRA, space="eps", iterations=3, window=(1, 3), first_iterations=3,
                 first_window=(0, 3))
    assert inv.nfe == 2 * 3
    with pytest.raises(SolverError, match="first_window"):
        invert("renoise", den, x, low, EXTRA, space="eps", iterations=3, window=(1, 3))


def test_renoise_regularises_under_inference_mode():
    """The host samples under torch.inference_mode; the regularisation's autograd still runs."""
    mix = Mixture((4, 16, 16), components=2, seed=3)
    den, x = MixtureDenoiser(mix, "eps"), mix.sample(1, seed=6)
    with torch.inference_mode():
        inv = invert("renoise", den, x, karras(4), {"label": [0], "cfg": 1.0}, space="eps", reg_steps=2)
    off = invert("renoise", den, x, karras(4), {"label": [0], "cfg": 1.0}, space="eps")
    assert torch.isfinite(inv.latent).all() and inv.settings["reg_steps"] == 2
    assert rel(inv.latent, off.latent) > 1e-4


def test_renoise_regularisation_is_refused_on_flow_before_any_call():
    mix = Mixture((4, 16, 16), components=2, seed=3)
    den, x = MixtureDenoiser(mix, "flow"), mix.sample(1, seed=6)
    calls = []
    with pytest.raises(SolverError, match="renoise: the noise regularisation .* on a flow model set reg_steps to 0"):
        invert("renoise", lambda x, s, **k: calls.append(1) or den(x, s, **k), x, uniform_flow(4),
               {"label": [0], "cfg": 1.0}, space="flow", reg_steps=2)
    assert not calls
    assert torch.isfinite(invert("renoise", den, x, uniform_flow(4), {"label": [0], "cfg": 1.0}, space="flow").latent).all()


# -- RF-Solver and FireFlow, restated from their papers ---------------------------------

def velocity(den, x, s):
    """The flow ODE's right-hand side in the host's sigma (flow: eps - x0; EPS: eps)."""
    return (x - den(x, torch.full((x.shape[0],), s, dtype=x.dtype), **EXTRA)) / s


def midpoint_ode(den, x, sig):
    """RF-Solver, arXiv 2411.04746, eq. (9): x' = x + h v + (h^2 / 2) v^(1), v^(1) from the half step,
    written here as the explicit midpoint step it equals: x' = x + h v(x + (h / 2) v, s + h / 2)."""
    for s, t in zip(sig[:-1], sig[1:]):
        h = t - s
        x = x + h * velocity(den, x + (h / 2) * velocity(den, x, max(s, 1e-4)), s + h / 2)
    return x


def fireflow_ode(den, x, sig):
    """FireFlow, arXiv 2412.07517, Algorithm 1: the midpoint step whose first velocity is the
    previous step's midpoint velocity (the very first: the velocity at the start)."""
    u = velocity(den, x, max(float(sig[0]), 1e-4))
    for s, t in zip(sig[:-1], sig[1:]):
        h = t - s
        u = velocity(den, x + (h / 2) * u, s + h / 2)
        x = x + h * u
    return x


@pytest.mark.parametrize("space", ["eps", "flow"])
@pytest.mark.parametrize("name,ref", [("rf_solver", midpoint_ode), ("fireflow", fireflow_ode)])
def test_rf_solver_and_fireflow_are_their_papers_steps(name, ref, space):
    den, x = MixtureDenoiser(MIX, space), data()
    up = karras(8) if space == "eps" else uniform_flow(8)
    inv = invert(name, den, x, up, EXTRA, space=space)
    want = ref(den, x, [float(v) for v in up])
    assert rel(inv.latent, want) < TOL and inv.nfe == {"rf_solver": 16, "fireflow": 9}[name]
    back = reconstruct(den, inv, EXTRA)
    assert rel(back, ref(den, inv.latent, [float(v) for v in up.flip(0)])) < TOL


@pytest.mark.parametrize("space", ["eps", "flow"])
def test_rf_solver_and_fireflow_against_euler_and_bdia(space, capsys):
    """FireFlow's paper (Table 3, Flux, 30 steps): Euler 16.6 dB with 60 calls, RF-Solver 20.1 dB with
    120, FireFlow 23.9 dB with 62, inversion and sampling together. The same comparison on the
    mixture, 10 steps: both second-order methods beat the first-order DDIM/Euler round trip at their
    calls; BDIA is exact to float rounding at 10 + 9."""
    den, x = MixtureDenoiser(MIX, space), MIX.sample(2, seed=5).double()
    up = karras(10) if space == "eps" else uniform_flow(10)
    out = {}
    for name in ("ddim", "naive_unsample", "rf_solver", "fireflow", "bdia"):
        inv = invert(name, den, x, up, EXTRA, space=space)
        calls = den.calls
        err = rel(reconstruct(den, inv, EXTRA), x)
        out[name] = (err, inv.nfe + den.calls - calls)
    with capsys.disabled():
        print(f"\n{space}: " + ", ".join(f"{k} {e:.1e} ({c} calls)" for k, (e, c) in out.items()))
    assert out["rf_solver"][1] == 40 and out["fireflow"][1] == 22
    for name in ("rf_solver", "fireflow"):
        assert out[name][0] < min(out["ddim"][0], out["naive_unsample"][0]) / 3, (name, out)
    assert out["bdia"][0] < 1e-10


# -- one place for each fact ----------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_registry_and_solvers_agree(name):
    m = METHODS[name]
    den = MixtureDenoiser(MIX, "eps")
    # The solver itself writes none of the registry's facts: the registry is their one writer.
    raw = m.invert(den, data(), karras(4), EXTRA, space="eps", **m.defaults())
    assert (raw.method, raw.sampler, raw.settings) == (None, None, None)
    inv = invert(name, den, data(), karras(4), EXTRA, space="eps")
    assert inv.method == name and inv.sampler == m.sampler
    assert inv.settings == {k: plain(s.default, s.default) for k, s in m.settings.items()}
    assert torch.equal(inv.latent, raw.latent)
    assert set(SAMPLERS[m.sampler].settings) <= set(m.settings)
    # a default in a signature may only repeat the registry's
    for f in (m.invert, SAMPLERS[m.sampler].sample):
        for k, prm in inspect.signature(f).parameters.items():
            if k in m.settings and prm.default is not inspect.Parameter.empty:
                assert prm.default == m.settings[k].default, f"{f.__name__}: {k}={prm.default!r}"
    # and a setting given is the setting recorded
    if "iterations" in m.settings:
        assert invert(name, den, data(), karras(4), EXTRA, space="eps", iterations=7).settings["iterations"] == 7


PAPERS = {"rf_solver": "2411.04746", "fireflow": "2412.07517", "ddim": "2010.02502", "easyinv": "2408.05159", "bdia": "2307.10829", "edict": "2211.12446",
          "renoise": "2403.14602", "fixed_point": "2309.04907", "aidi_anderson": "2309.04907",
          "aidi_empirical": "2309.04907"}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_docstrings_name_their_papers(name):
    doc = inspect.getmodule(METHODS[name].invert).__doc__
    assert f"arXiv:{PAPERS[name]}" in doc
    assert "No paper" in inspect.getmodule(METHODS["naive_unsample"].invert).__doc__


# -- the AIDI paper's own loop (loop = "paper") ---------------------------------------------

def aidi_paper(den, x, up, K, rule, m=3, lam=1e-6):
    """The published loop, per step: from the DDIM point, K updates of the rule, then F of the last
    iterate (K + 1 calls). Rules: Picard, AIDI-E (the mean of the last two F values), and Anderson
    with the last m iterates (m - 1 differences), gamma from the regularised least squares
    (A + lam tr(A) / (m - 1) I) gamma = dR^T r, x' = g - dG gamma."""
    s = [float(v) for v in up]
    for i in range(len(s) - 1):
        sa, sb = s[i], s[i + 1]

        def F(z):
            return x + (sb - sa) * (z - den(z, torch.full((z.shape[0],), sb, dtype=z.dtype), **EXTRA)) / sb
        z = x * ((1 + sb * sb) ** 0.5 / (1 + sa * sa) ** 0.5)  # the DDIM point: F(z) is the DDIM step
        xs, gs = [], []
        for k in range(K):
            g = F(z)
            xs.append(z)
            gs.append(g)
            if rule == "picard":
                z = g
            elif rule == "empirical":
                z = g if k == 0 else 0.5 * (g + gs[-2])
            else:
                X, G = xs[-m:], gs[-m:]
                if len(X) == 1:
                    z = g
                    continue
                out = []
                for b in range(z.shape[0]):
                    R = torch.stack([(gg - xx)[b].flatten() for xx, gg in zip(X, G)], 1)
                    dR, dG = R[:, 1:] - R[:, :-1], torch.stack([gg[b].flatten() for gg in G], 1)
                    dG = dG[:, 1:] - dG[:, :-1]
                    A = dR.T @ dR
                    reg = lam * torch.trace(A) / (m - 1)
                    gamma = torch.linalg.solve(A + reg * torch.eye(A.shape[0], dtype=A.dtype), dR.T @ R[:, -1])
                    out.append(G[-1][b].flatten() - dG @ gamma)
                z = torch.stack(out).view_as(z)
        x = F(z)
    return x


@pytest.mark.parametrize("name,rule", [("fixed_point", "picard"), ("aidi_empirical", "empirical"),
                                       ("aidi_anderson", "anderson")])
def test_the_paper_loop_is_the_published_algorithm(name, rule):
    den, x, up = MixtureDenoiser(MIX, "eps"), data(), karras(6)
    settings = dict(loop="paper", guess="ddim", iterations=5)
    inv = invert(name, den, x, up, EXTRA, space="eps", **settings)
    want = aidi_paper(den, x, up, 4, rule)
    assert inv.nfe == 6 * 5 and not inv.split and rel(inv.latent, want) < TOL
    assert inv.settings["loop"] == "paper"


def test_the_paper_loop_records_no_tol_it_did_not_use():
    """It takes no tolerance: its record holds none (the budget loop's the one given), and reads back."""
    den, x = MixtureDenoiser(MIX, "eps"), data()
    loose, tight = (invert("fixed_point", den, x, karras(4), EXTRA, space="eps", loop="paper", guess="ddim",
                           iterations=3, tol=t) for t in (0.05, 1e-8))
    assert torch.equal(loose.latent, tight.latent)  # tol had no effect
    assert "tol" not in loose.settings and loose.settings["loop"] == "paper"
    assert check_record(Inversion.from_dict(loose.to_dict())).settings == loose.settings
    older = dict(loose.to_dict(), settings=dict(loose.settings, tol=0.05))  # written before: tol as given
    check_record(Inversion.from_dict(older))
    budget = invert("fixed_point", den, x, karras(4), EXTRA, space="eps", tol=0.05)
    assert budget.settings["tol"] == 0.05
    with pytest.raises(SolverError, match="'settings' must be exactly"):
        check_record(Inversion.from_dict(dict(budget.to_dict(), settings={k: v for k, v in budget.settings.items()
                                                                          if k != "tol"})))


def test_the_paper_loop_refuses_what_it_would_ignore():
    den, x = MixtureDenoiser(MIX, "eps"), data()
    with pytest.raises(SolverError, match="aidi_anderson: the paper loop carries no secant pairs"):
        invert("aidi_anderson", den, x, karras(4), EXTRA, space="eps", loop="paper", carry=2)
    with pytest.raises(SolverError, match="loop must be one of"):
        invert("fixed_point", den, x, karras(4), EXTRA, space="eps", loop="nope")
