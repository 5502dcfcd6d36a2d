"""Editing solvers against the exact mixture denoiser: blended guidance, DirectInversion, stochastic edits.

The edit denoiser is ``TwoPrompts`` over the analytic ``MixtureDenoiser``: the source prompt
is label k, the target another component's label, so an edit moves the image towards
another mixture component. Every check runs in both spaces.
"""

import pytest
import torch

from analytic import Mixture, MixtureDenoiser, karras, uniform_flow
from measure import rel
from inversion_suite.solvers import METHODS, SAMPLERS, NonFiniteError, SolverError, invert, reconstruct, sampler_for
from inversion_suite.solvers.editing import masks
from inversion_suite.solvers.editing.blended import edit_blended
from inversion_suite.solvers.editing.direct import edit_direct
from inversion_suite.solvers.editing.stochastic import edit_stochastic
from inversion_suite.solvers.editing.flowedit import edit_flowedit
from inversion_suite.solvers.editing.guidance import TwoPrompts, per_pixel_scale
from inversion_suite.solvers.editing.rf_inversion import edit_rf_inversion
from inversion_suite.solvers.methods.euler import sample_euler

SPACES = ("eps", "flow")
MIX = Mixture((4, 8, 8), components=4, seed=0)
SRC, TGT = [0, 1, 2], [3, 3, 0]


def schedule(space, steps):
    return karras(steps) if space == "eps" else uniform_flow(steps)


def data(batch=3):
    return torch.cat([MIX.sample(1, seed=3 + i, component=c) for i, c in enumerate(SRC[:batch])]).float()


def setup(method, space, steps=8, cfg=1.0, keep=False, **settings):
    den = MixtureDenoiser(MIX, space)
    inv = invert(method, den, data(), schedule(space, steps), {"label": SRC, "cfg": cfg}, space=space,
                 keep_trajectory=keep, **settings)
    return den, inv


def two(den, target=TGT):
    return TwoPrompts(den, {"label": SRC}, {"label": target})


def blended(den, inv, mask, w_inv=1.0, w_edit=5.0, target=TGT, **kw):
    fn, kwargs = sampler_for(inv.sampler, inv.settings)
    return edit_blended(two(den, target), inv.latent, inv.sigmas.flip(0), mask, w_inv, w_edit, sampler=fn,
                        sampler_args=kwargs, pair=inv.pair, space=inv.space, **kw)


def half(x, value=1.0):
    """1 on the right half of the latent, 0 elsewhere: (1, 1, H, W)."""
    m = torch.zeros(1, 1, *x.shape[2:])
    m[..., x.shape[-1] // 2:] = value
    return m


# --- blended guidance ---------------------------------------------------------------------------

@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_mask_with_blending_is_the_reconstruction_bit_for_bit(method, space):
    den, inv = setup(method, space)
    source = reconstruct(den, inv, {"label": SRC, "cfg": 1.0})
    out, nfe = blended(den, inv, torch.zeros(1, 1, 8, 8))
    assert torch.equal(out, source)
    calls = SAMPLERS[inv.sampler].calls(inv.steps)  # bdia resumes its pair
    assert nfe == 2 * calls


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", ["aidi_anderson", "bdia", "edict"])
def test_uniform_masks_without_blending_are_plain_guided_sampling(method, space):
    den, inv = setup(method, space)
    zero, _ = blended(den, inv, torch.zeros(1, 1, 8, 8), local_blend=False, source=False)
    assert torch.equal(zero, reconstruct(den, inv, {"label": TGT, "cfg": 1.0}))
    one, nfe = blended(den, inv, torch.ones(1, 1, 8, 8), local_blend=False, source=False)
    assert torch.equal(one, reconstruct(den, inv, {"label": TGT, "cfg": 5.0}))
    assert nfe == {"aidi_anderson": 8, "bdia": 7, "edict": 16}[method]
    closed, _ = blended(den, inv, torch.ones(1, 1, 8, 8), mask_steps=0.0)  # window closed: w_inv, no blend
    assert torch.equal(closed, zero)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", ["ddim", "bdia", "edict"])
def test_half_mask_keeps_the_rest_and_edits_inside(method, space):
    den, inv = setup(method, space)
    source = reconstruct(den, inv, {"label": SRC, "cfg": 1.0})
    out, _ = blended(den, inv, half(inv.latent))
    assert torch.equal(out[..., :4], source[..., :4])
    assert (out[..., 4:] - source[..., 4:]).abs().mean() > 0.1 * source.abs().mean()


def test_mask_window_and_per_pixel_scale_follow_the_formula():
    """A per-pixel scale is D_u + W (D_c - D_u) with W = w_inv + (w_edit - w_inv) M, the
    window open for the first ceil(mask_steps * N) steps: the editor asks for both halves there
    (scale None) and mixes them itself, and for the plain guided prediction after; checked call
    by call and against Euler sampling restated, in float64."""
    den = MixtureDenoiser(MIX, "eps")
    x = data().double()
    sig = karras(6).flip(0)
    assert masks.opened(sig, 0.5) == 3  # 3 of 6 steps open
    m = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def model(x, sigma, branch, scale):
        seen.append((float(sigma[0]), branch, scale))
        return two(den)(x, sigma, branch, scale)

    out, nfe = edit_blended(model, x, sig, m, 1.5, 6.0, local_blend=False, source=False, mask_steps=0.5)
    assert [s for s, _, _ in seen] == pytest.approx([float(v) for v in sig[:-1]], rel=1e-6)
    assert [(b, w) for _, b, w in seen] == [("target", None)] * 3 + [("target", 1.5)] * 3 and nfe == 6
    s, xt = [float(v) for v in sig], x
    for k in range(6):
        at = torch.full((3,), s[k], dtype=torch.float64)
        u, c = den(xt, at, label=TGT, cfg=0.0), den(xt, at, label=TGT, cfg=1.0)
        d = u + (1.5 + 4.5 * m) * (c - u) if k < 3 else den(xt, at, label=TGT, cfg=1.5)
        xt = xt + (s[k + 1] - s[k]) * (xt - d) / s[k]
    assert rel(out, xt) < 1e-12 and rel(out, x) > 1e-3


@pytest.mark.parametrize("space", SPACES)
def test_blended_runs_on_5d_latents(space):
    den = MixtureDenoiser(Mixture((4, 2, 4, 4), components=4, seed=1), space)
    x = den.mixture.sample(2, seed=5).float()
    extra = {"label": [0, 1], "cfg": 1.0}
    inv = invert("bdia", den, x, schedule(space, 6), extra, space=space)
    m = torch.zeros(1, 1, 2, 4, 4)
    m[:, :, 1] = 1  # edit the second frame only
    fn, kw = sampler_for("bdia", inv.settings)
    out, _ = edit_blended(TwoPrompts(den, {"label": [0, 1]}, {"label": [2, 3]}), inv.latent, inv.sigmas.flip(0), m,
                          1.0, 5.0, sampler=fn, sampler_args=kw, pair=inv.pair, space=space)
    source = reconstruct(den, inv, extra)
    assert torch.equal(out[:, :, 0], source[:, :, 0])
    assert (out[:, :, 1] - source[:, :, 1]).abs().mean() > 0.05


def test_video_mask_frames_map_to_latent_frames():
    m = torch.arange(9.0).view(9, 1, 1).expand(9, 2, 2)  # 9 frames -> 1 + 2 x 4 latent frames
    t = masks.per_latent_frame(m, 3, 4)
    assert t[:, 0, 0].tolist() == [0.0, 2.5, 6.5]
    assert torch.equal(masks.per_latent_frame(m[:1], 3, 4), m[:1].expand(3, 2, 2))
    with pytest.raises(SolverError, match="1 \\+ 2 x 4"):
        masks.per_latent_frame(m[:5], 3, 4)


# --- DirectInversion ----------------------------------------------------------------------------

@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("method", ["ddim", "naive_unsample", "aidi_anderson", "easyinv"])
def test_direct_with_target_equal_source_returns_the_source(method, space):
    den, inv = setup(method, space, keep=True)
    x = inv.trajectory[0]
    out, nfe = edit_direct(two(den, SRC), inv.trajectory, inv.sigmas, torch.ones(1, 1, 8, 8), 1.0, 1.0, space=space)
    assert torch.equal(out, x) and nfe == 2 * inv.steps
    # plain sampling drifts where the inversion was approximate; DirectInversion does not
    if method in ("ddim", "naive_unsample", "easyinv"):
        assert rel(reconstruct(den, inv, {"label": SRC, "cfg": 1.0}), x) > 1e-3


@pytest.mark.parametrize("space", SPACES)
def test_direct_is_the_papers_update(space):
    """x_t' = x_t + h d_t(x_t) + (x*_{k+1} - (x*_k + h d_s(x*_k))), in float64."""
    mix64 = MixtureDenoiser(MIX, space)
    x = data().double()
    inv = invert("ddim", mix64, x, schedule(space, 6), {"label": SRC, "cfg": 1.0}, space=space, keep_trajectory=True)
    out, _ = edit_direct(two(mix64), inv.trajectory, inv.sigmas, torch.ones(1, 1, 8, 8, dtype=torch.float64), 1.0,
                         4.0, space=space)
    s = [float(v) for v in inv.sigmas.flip(0)]
    ref = inv.trajectory[::-1]
    xt = ref[0]
    for k in range(len(s) - 1):
        sig = torch.full((3,), s[k], dtype=torch.float64)
        d_t = (xt - mix64(xt, sig, label=TGT, cfg=4.0)) / s[k]
        d_s = (ref[k] - mix64(ref[k], sig, label=SRC, cfg=1.0)) / s[k]
        h = s[k + 1] - s[k]
        xt = xt + h * d_t + (ref[k + 1] - (ref[k] + h * d_s))
    assert rel(out, xt) <= 1e-12


@pytest.mark.parametrize("space", SPACES)
def test_direct_half_mask_keeps_the_source_outside(space):
    den, inv = setup("ddim", space, keep=True)
    out, _ = edit_direct(two(den), inv.trajectory, inv.sigmas, half(inv.latent), 1.0, 5.0, space=space)
    x = inv.trajectory[0]
    assert torch.equal(out[..., :4], x[..., :4])
    assert (out[..., 4:] - x[..., 4:]).abs().mean() > 0.1 * x.abs().mean()


@pytest.mark.parametrize("sampler", ["bdia", "edict"])
def test_direct_refuses_pair_methods(sampler):
    den, inv = setup(sampler, "eps", keep=True)
    with pytest.raises(SolverError, match="single-state"):
        edit_direct(two(den), inv.trajectory, inv.sigmas, half(inv.latent), 1.0, 5.0, sampler=inv.sampler)
    assert den.calls == inv.nfe


# --- stochastic editing -------------------------------------------------------------------------

def stochastic(space, method="aidi_anderson", mask=None, target=TGT, seeds=(7, 8, 9), eta=1.0, **kw):
    den, inv = setup(method, space, keep=True)
    m = half(inv.latent) if mask is None else mask
    return inv, edit_stochastic(two(den, target), inv.trajectory, inv.sigmas, m, 1.0, 5.0, seeds, space=space,
                                eta=eta, **kw)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_with_the_source_prompt_returns_the_source(space, eta):
    inv, (edits, scores, nfe) = stochastic(space, target=SRC, mask=torch.zeros(1, 1, 8, 8), eta=eta)
    x = inv.trajectory[0]
    for j in range(3):
        assert rel(edits[3 * j:3 * j + 3], x) <= 1e-5
    assert nfe == 4 * inv.steps  # the maps' source calls, then each edit's target calls


@pytest.mark.parametrize("space", SPACES)
def test_stochastic_seeds_vary_the_inside_only(space):
    """Measured bound outside the mask: 0 (bit for bit the source), since there the target's
    prediction, mean and offset are the source's own."""
    inv, (edits, scores, _) = stochastic(space, seeds=(7, 8, 9, 10))
    x = inv.trajectory[0]
    e = edits.view(4, 3, *x.shape[1:])
    assert torch.equal(e[..., :4], x[None, ..., :4].expand(4, -1, -1, -1, -1))
    inside = (e[1:, ..., 4:] - e[:1, ..., 4:]).abs().flatten(2).mean(2)
    assert (inside > 0.05 * x.abs().mean()).all()
    assert (scores > 200).all()  # nothing outside changed: the mse floor (1e-20) sets the score


@pytest.mark.parametrize("space", SPACES)
def test_stochastic_without_blending_changes_the_rest(space):
    """Without local blending the rest follows the target prompt: what the pack did before."""
    inv, (edits, _, _) = stochastic(space, local_blend=False)
    x = inv.trajectory[0]
    assert rel(edits[:3, ..., :4], x[..., :4]) > 1e-3


def test_stochastic_seeds_are_reproducible_and_independent():
    _, (a, sa, _) = stochastic("eps", mask=torch.ones(1, 1, 8, 8), seeds=(7, 8))
    _, (b, sb, _) = stochastic("eps", mask=torch.ones(1, 1, 8, 8), seeds=(7, 8))
    _, (c, _, _) = stochastic("eps", mask=torch.ones(1, 1, 8, 8), seeds=(8,))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert torch.equal(c, a[3:])  # edit k's noise depends on its own seed only
    assert not torch.allclose(a[:3], a[3:])


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mask,words", [(torch.full((1, 1, 8, 8), 1.5), "[0, 1]"),
                                        (torch.full((1, 1, 8, 8), -0.1), "[0, 1]"),
                                        (torch.ones(1, 1, 4, 4), "shape"), (torch.ones(2, 1, 8, 8), "shape")])
def test_bad_masks_are_refused_before_any_call(mask, words):
    den, inv = setup("ddim", "eps", keep=True)
    calls = den.calls
    for run in (lambda: blended(den, inv, mask),
                lambda: edit_direct(two(den), inv.trajectory, inv.sigmas, mask, 1.0, 5.0),
                lambda: edit_stochastic(two(den), inv.trajectory, inv.sigmas, mask, 1.0, 5.0, [1])):
        with pytest.raises(SolverError, match=words.replace("[", "\\[")):
            run()
    assert den.calls == calls


def broken(den, after):
    """``den``, returning NaN from its call ``after + 1`` on."""
    calls = [0]

    def call(x, sigma, **kw):
        calls[0] += 1
        out = den(x, sigma, **kw)
        return out * float("nan") if calls[0] > after else out
    return call


@pytest.mark.parametrize("method,sampler", [("ddim", "euler"), ("bdia", "bdia"), ("edict", "edict")])
def test_a_non_finite_edit_is_reported_under_the_editor(method, sampler):
    den, inv = setup(method, "eps")
    with pytest.raises(NonFiniteError, match=rf"^blended \({sampler} sampler\): the denoiser returned non-finite "
                                             r"values at step \d+ \(sigma"):
        blended(broken(den, 8), inv, half(inv.latent, 0.5))


def test_a_non_finite_stochastic_edit_is_reported_under_the_editor():
    den, inv = setup("ddim", "eps", keep=True)
    with pytest.raises(NonFiniteError, match=r"^stochastic"):
        edit_stochastic(two(broken(den, 12)), inv.trajectory, inv.sigmas, half(inv.latent, 0.5), 1.0, 5.0, [1])


def test_bad_scales_and_windows_are_refused():
    den, inv = setup("ddim", "eps", keep=True)
    m = half(inv.latent)
    with pytest.raises(SolverError, match="w_inv"):
        blended(den, inv, m, w_inv=-0.5)
    with pytest.raises(SolverError, match="mask_steps"):
        blended(den, inv, m, mask_steps=1.5)
    with pytest.raises(SolverError, match="trajectory"):
        edit_direct(two(den), None, inv.sigmas, m, 1.0, 5.0)
    with pytest.raises(SolverError, match="seed"):
        edit_stochastic(two(den), inv.trajectory, inv.sigmas, m, 1.0, 5.0, [])


def test_half_precision_inputs_compute_in_float32_and_inputs_stay_unchanged():
    den, inv = setup("ddim", "eps", keep=True)
    m = half(inv.latent)
    x16 = inv.latent.half()
    traj16 = [t.half() for t in inv.trajectory]
    keep = (x16.clone(), [t.clone() for t in traj16], m.clone())
    out, _ = edit_blended(two(den), x16, inv.sigmas.flip(0), m, 1.0, 5.0, space="eps")
    d, _ = edit_direct(two(den), traj16, inv.sigmas, m, 1.0, 5.0)
    e, _, _ = edit_stochastic(two(den), traj16, inv.sigmas, m, 1.0, 5.0, [1])
    assert out.dtype == d.dtype == e.dtype == torch.float32
    assert torch.equal(x16, keep[0]) and all(torch.equal(a, b) for a, b in zip(traj16, keep[1]))
    assert torch.equal(m, keep[2])


def test_a_half_precision_models_halves_are_mixed_in_float32():
    den16 = MixtureDenoiser(MIX, "eps", dtype=torch.float16)
    x = data()
    p = two(den16)(x, torch.full((3,), 2.0), branch="target", scale=None)
    assert p.uncond.dtype == p.cond.dtype == torch.float16
    w = per_pixel_scale(1.0, 5.0, torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    u, c = p.uncond.float(), p.cond.float()
    out = p.mix(w)
    assert out.dtype == torch.float32 and torch.equal(out, u + w * (c - u))
    assert not torch.equal(out, (p.uncond + w.half() * (p.cond - p.uncond)).float())  # float16 would differ
    # A blended edit with the float16 model equals the one with the same outputs handed over in float32.
    _, inv = setup("ddim", "eps")
    m = half(inv.latent, 0.5)
    def run(model):
        return edit_blended(two(model), inv.latent, inv.sigmas.flip(0), m, 1.0, 5.0, space="eps")[0]
    a, b = run(den16), run(lambda x, s, **kw: den16(x, s, **kw).float())
    assert a.dtype == torch.float32 and torch.equal(a, b)


# --- FlowEdit ------------------------------------------------------------------------------------

def flowedit_official(den, x_src, sig, w_src, w_tar, n_min, n_max, n_avg, seed, space, antithetic=False):
    """FlowEdit as the authors' FlowEditSD3 loop runs it (fallenshock/FlowEdit), in the host's sigma:
    velocities from the guided denoiser, a fresh noise per draw, an SDEdit-style tail for n_min.
    ``antithetic``: the pack's pairing, the 2nd, 4th, ... edited step taking the step before's draws negated."""
    g = torch.Generator().manual_seed(seed)
    s = [float(v) for v in sig]
    T = len(s) - 1

    def vel(x, t, label, w):
        return (x - den(x, torch.full((x.shape[0],), t, dtype=x.dtype), label=label, cfg=w)) / t

    def scale_noise(x0, t, n):
        return x0 + t * n if space == "eps" else (1 - t) * x0 + t * n

    zt_edit, xt_tar, fwds = x_src.clone(), None, []
    for i in range(T):
        t_i, t_im1 = s[i], s[i + 1]
        if T - i > n_max:
            continue
        if T - i > n_min:
            v_delta = torch.zeros_like(x_src)
            second = antithetic and (n_max - (T - i)) % 2 == 1
            fwds = [-f for f in fwds] if second else \
                [torch.randn(x_src.shape, generator=g, dtype=x_src.dtype) for _ in range(n_avg)]
            for fwd in fwds:
                zt_src = scale_noise(x_src, t_i, fwd)
                zt_tar = zt_edit + zt_src - x_src
                v_delta = v_delta + (1 / n_avg) * (vel(zt_tar, t_i, TGT, w_tar) - vel(zt_src, t_i, SRC, w_src))
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta
        else:
            if i == T - n_min:
                fwd = torch.randn(x_src.shape, generator=g, dtype=x_src.dtype)
                xt_tar = zt_edit + scale_noise(x_src, t_i, fwd) - x_src
            xt_tar = xt_tar + (t_im1 - t_i) * vel(xt_tar, t_i, TGT, w_tar)
    return zt_edit if n_min == 0 else xt_tar


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("n_min,n_max,n_avg", [(0, 6, 1), (2, 8, 2), (0, 8, 3), (1, 6, 1)])
def test_flowedit_is_the_official_update(space, n_min, n_max, n_avg, antithetic):
    den, x = MixtureDenoiser(MIX, space), data().double()
    sig = schedule(space, 8).flip(0)
    out, nfe = edit_flowedit(two(den), x, sig, 1.5, 5.5, n_min=n_min, n_max=n_max, n_avg=n_avg, seed=7, space=space,
                             antithetic=antithetic)
    want = flowedit_official(den, x, sig, 1.5, 5.5, n_min, n_max, n_avg, 7, space, antithetic)
    assert rel(out, want) < 1e-12 and rel(out, x) > 1e-3
    assert nfe == 2 * n_avg * (n_max - n_min) + n_min  # pairing costs no call
    if antithetic:  # and it is another edit than the paper's
        paper = flowedit_official(den, x, sig, 1.5, 5.5, n_min, n_max, n_avg, 7, space)
        assert rel(out, paper) > 1e-3


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("antithetic", [False, True])
def test_flowedit_with_the_target_equal_to_the_source_returns_the_source(space, antithetic):
    den, x = MixtureDenoiser(MIX, space), data()
    sig = schedule(space, 8).flip(0)
    out, _ = edit_flowedit(two(den, SRC), x, sig, 3.0, 3.0, n_max=8, space=space, antithetic=antithetic)
    assert rel(out, x) < 1e-6  # float rounding: z + z_src - x_src is z_src to rounding only


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("antithetic", [False, True])
def test_flowedit_region_keeps_the_rest_exactly_and_a_full_one_is_the_unmasked_edit(space, antithetic):
    den, x = MixtureDenoiser(MIX, space), data()
    sig = schedule(space, 8).flip(0)
    run = dict(n_max=7, seed=3, space=space, antithetic=antithetic)
    free, _ = edit_flowedit(two(den), x, sig, 1.0, 5.0, **run)
    assert torch.equal(edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=torch.ones(1, 1, 8, 8), **run)[0], free)
    assert torch.equal(edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=torch.zeros(1, 1, 8, 8), **run)[0], x)
    m = half(x)
    part, _ = edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=m, **run)
    assert torch.equal(part[..., :4], x[..., :4]) and rel(part[..., 4:], x[..., 4:]) > 1e-3
    a, _ = edit_flowedit(two(den), x, sig, 1.0, 5.0, **run)
    assert torch.equal(a, free)  # a seed gives the same edit
    with pytest.raises(SolverError, match="flowedit: expected 0 <= n_min <= n_max <= steps"):
        edit_flowedit(two(den), x, sig, 1.0, 5.0, n_min=3, n_max=2, space=space)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("n_min", [0, 2])
def test_flowedit_pasted_is_the_whole_edit_composited_by_the_region(space, n_min):
    """``paste``: the whole image's edit (the same calls and draws), composited by the region's
    (feathered) mask: the source exactly where the mask is 0, the edit where it is 1."""
    den, x = MixtureDenoiser(MIX, space), data()
    sig = schedule(space, 8).flip(0)
    run = dict(n_max=7, n_min=n_min, seed=3, space=space, antithetic=True)
    free, nfe_free = edit_flowedit(two(den), x, sig, 1.0, 5.0, **run)
    region = masks.Region(half(x), feather=1)
    out, nfe = edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=region, paste=True, **run)
    m = masks.feather(half(x), 1)
    assert nfe == nfe_free and torch.equal(out, torch.lerp(x, free, m.expand_as(x)))
    assert torch.equal(out[..., :4], x[..., :4]) and torch.equal(out[..., 5:], free[..., 5:])
    grown, _ = edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=masks.Region(half(x), feather=1, grow=True), paste=True,
                             **run)
    assert torch.equal(grown, out)  # growing is a rule for the steps: a paste takes the feathered values
    weighed, _ = edit_flowedit(two(den), x, sig, 1.0, 5.0, mask=region, **run)  # every step weighed
    assert torch.equal(weighed[..., :4], x[..., :4]) and rel(weighed[..., 4:], x[..., 4:]) > 1e-3


# --- RF-Inversion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("space", SPACES)
def test_rf_inversion_without_control_is_plain_inversion_and_sampling(space):
    den, x = MixtureDenoiser(MIX, space), data().double()
    up = schedule(space, 8)
    out, nfe = edit_rf_inversion(two(den), x, up.flip(0), 1.0, 4.0, gamma=0.0, eta=0.0, space=space)
    inv = invert("naive_unsample", den, x, up, {"label": SRC, "cfg": 1.0}, space=space)
    plain = sample_euler(den, inv.latent, up.flip(0), {"label": TGT, "cfg": 4.0}, space=space)
    assert rel(out, plain) < 1e-12 and nfe == 16


def rf_inversion_paper(den, x0, up, gamma, eta, start, stop, y1, space):
    """Rout et al., Algorithms 1 and 2 (controlled forward and reverse ODEs), in the host's sigma."""
    def v(x, s, label, w):
        return (x - den(x, torch.full((x.shape[0],), s, dtype=x.dtype), label=label, cfg=w)) / s
    s = [float(t) for t in up]
    y = x0
    for i in range(len(s) - 1):
        u = v(y, max(s[i], 1e-4), SRC, 1.0)
        cond = y1 if space == "eps" else (y1 - y) / (1 - s[i])  # the path from y to y1
        y = y + (s[i + 1] - s[i]) * (u + gamma * (cond - u))
    d = s[::-1]
    for i in range(len(d) - 1):
        u = v(y, d[i], TGT, 4.0)
        if start <= i < stop:
            u = u + eta * ((y - x0) / d[i] - u)  # the path from y back to x0
        y = y + (d[i + 1] - d[i]) * u
    return y


@pytest.mark.parametrize("space", SPACES)
def test_rf_inversion_is_the_papers_controller(space):
    den, x = MixtureDenoiser(MIX, space), data().double()
    up = schedule(space, 8)
    out, _ = edit_rf_inversion(two(den), x, up.flip(0), 1.0, 4.0, gamma=0.5, eta=0.9, start=1, stop=5, seed=2,
                               space=space)
    y1 = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    want = rf_inversion_paper(den, x, up, 0.5, 0.9, 1, 5, y1, space)
    assert rel(out, want) < 1e-12 and rel(out, x) > 1e-3
    kept, _ = edit_rf_inversion(two(den), x, up.flip(0), 1.0, 4.0, seed=2, space=space, mask=torch.zeros(1, 1, 8, 8))
    assert torch.equal(kept, x)
    with pytest.raises(SolverError, match="rf_inversion: expected 0 <= start <= stop <= steps"):
        edit_rf_inversion(two(den), x, up.flip(0), 1.0, 4.0, start=5, stop=2, space=space)


# --- soft regions: values per pixel, a feather, DifferentialDiffusion's growth ------------------------

def test_feather_ramps_inwards_and_keeps_the_outside_and_a_full_region():
    x = torch.zeros(1, 4, 8, 8)
    m = half(x)
    f = masks.feather(m, 2)
    assert torch.equal(f[..., :4], m[..., :4])  # outside: exactly 0
    assert torch.equal(f[0, 0, 0, 4:], torch.tensor([1 / 3, 2 / 3, 1.0, 1.0]))  # the latent's border is not outside
    assert torch.equal(masks.feather(m, 0), m)
    assert torch.equal(masks.feather(torch.ones(1, 1, 8, 8), 3), torch.ones(1, 1, 8, 8))
    soft = half(x, 0.5)
    assert torch.equal(masks.feather(soft, 1)[..., 5:], soft[..., 5:])  # values kept where the ramp is full
    video = torch.zeros(1, 1, 2, 4, 4)
    video[:, :, 1, :, 2:] = 1
    fv = masks.feather(video, 1)
    assert torch.equal(fv[:, :, 0], video[:, :, 0]) and fv[0, 0, 1, 0].tolist() == [0, 0, 0.5, 1]  # per frame


def test_growing_region_is_differential_diffusions_rule():
    """ComfyUI's DifferentialDiffusion at step i of a schedule s_0 > ... > s_N edits the pixels
    whose value is at least (t(s_i) - t(s_N)) / (t(s_0) - t(s_N)), t the model's timestep; on a
    flow model t = 1000 s, and a uniform schedule makes that 1 - i / N."""
    values = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0]).view(1, 1, 3, 3)
    s = [float(v) for v in uniform_flow(4).flip(0)]
    t = [1000 * v for v in s]
    for i in range(4):
        threshold = (t[i] - t[-1]) / (t[0] - t[-1])
        assert torch.equal(masks.grown(values, i, 4), (values >= threshold).float()), i
    firsts = sum(masks.grown(values, i, 4) for i in range(4))  # steps each pixel is edited
    assert firsts.flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_a_half_precision_region_is_shaped_in_float32():
    x = torch.zeros(1, 4, 8, 8)
    m16 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    m16[..., :2] = 0
    m16[0, 0, 0, 2] = 0.9  # rounds to 0.8999: below the threshold 1 - 1/10 in float32, not in float16
    r16, r32 = masks.Region(m16, feather=2, grow=True), masks.Region(m16.float(), feather=2, grow=True)
    soft = r16.soft(None, x)
    assert soft.dtype == torch.float32 and torch.equal(soft, r32.soft(None, x))
    assert torch.equal(masks.feather(m16, 2), masks.feather(m16.float(), 2))
    for i in range(10):
        g = r16.at(m16, i, 10)
        assert g.dtype == torch.float32 and torch.equal(g, (m16.double() >= 1 - i / 10).float()), i


SOFT = [dict(feather=0, grow=False), dict(feather=2, grow=False), dict(feather=0, grow=True),
        dict(feather=2, grow=True)]


@pytest.mark.parametrize("soft", SOFT)
@pytest.mark.parametrize("space", SPACES)
def test_all_zero_soft_region_is_the_reconstruction_and_all_one_the_unmasked_edit(space, soft):
    """Bit for bit, for every editor: zero returns what it returns with nothing to edit (the source
    branch for blended, DirectInversion and stochastic edits; the source latent for FlowEdit and
    RF-Inversion), one what it returns editing the whole image."""
    zero = masks.Region(torch.zeros(1, 1, 8, 8), **soft)
    one = masks.Region(torch.ones(1, 1, 8, 8), **soft)
    den, inv = setup("bdia", space)
    assert torch.equal(blended(den, inv, zero)[0], reconstruct(den, inv, {"label": SRC, "cfg": 1.0}))
    assert torch.equal(blended(den, inv, one)[0], blended(den, inv, None)[0])
    den, inv = setup("ddim", space, keep=True)
    x = inv.trajectory[0]
    run = dict(space=space)
    assert torch.equal(edit_direct(two(den), inv.trajectory, inv.sigmas, zero, 1.0, 5.0, **run)[0], x)
    assert torch.equal(edit_direct(two(den), inv.trajectory, inv.sigmas, one, 1.0, 5.0, **run)[0],
                       edit_direct(two(den), inv.trajectory, inv.sigmas, None, 1.0, 5.0, **run)[0])
    e0, s0, _ = edit_stochastic(two(den), inv.trajectory, inv.sigmas, zero, 1.0, 5.0, [3, 4], **run)
    assert torch.equal(e0, x.repeat(2, 1, 1, 1))
    e1, s1, _ = edit_stochastic(two(den), inv.trajectory, inv.sigmas, one, 1.0, 5.0, [3, 4], **run)
    e, s, _ = edit_stochastic(two(den), inv.trajectory, inv.sigmas, torch.ones(1, 1, 8, 8), 1.0, 5.0, [3, 4], **run)
    assert torch.equal(e1, e) and rel(e1, e0) > 1e-3
    x = data().double()
    sig = schedule(space, 8).flip(0)
    for edit, kw in ((edit_flowedit, dict(n_max=7, n_min=2, seed=3)), (edit_rf_inversion, dict(seed=3, stop=4))):
        assert torch.equal(edit(two(den), x, sig, 1.0, 5.0, mask=zero, space=space, **kw)[0], x)
        free = edit(two(den), x, sig, 1.0, 5.0, space=space, **kw)[0]
        assert torch.equal(edit(two(den), x, sig, 1.0, 5.0, mask=one, space=space, **kw)[0], free)
        assert rel(free, x) > 1e-3


@pytest.mark.parametrize("grow", [False, True])
@pytest.mark.parametrize("space", SPACES)
def test_feather_leaves_the_outside_exactly_unchanged(space, grow):
    """A half region feathered over 3 latent pixels: every editor keeps the left half bit for bit
    and edits the right."""
    m = masks.Region(half(torch.zeros(1, 1, 8, 8)), feather=3, grow=grow)
    den, inv = setup("bdia", space)
    outs = [(blended(den, inv, m)[0], reconstruct(den, inv, {"label": SRC, "cfg": 1.0}))]
    den, inv = setup("ddim", space, keep=True)
    x = inv.trajectory[0]
    outs.append((edit_direct(two(den), inv.trajectory, inv.sigmas, m, 1.0, 5.0, space=space)[0], x))
    outs.append((edit_stochastic(two(den), inv.trajectory, inv.sigmas, m, 1.0, 5.0, [3], space=space)[0], x))
    x = data().double()
    sig = schedule(space, 8).flip(0)
    outs.append((edit_flowedit(two(den), x, sig, 1.0, 5.0, n_max=7, n_min=2, mask=m, space=space)[0], x))
    outs.append((edit_rf_inversion(two(den), x, sig, 1.0, 5.0, stop=4, mask=m, space=space)[0], x))
    for out, source in outs:
        assert torch.equal(out[..., :4], source[..., :4])
        assert rel(out[..., 4:], source[..., 4:]) > 1e-3


def flowedit_growing(den, x_src, sig, w_src, w_tar, n_max, n_min, seed, space, values):
    """The official FlowEdit loop (n_avg 1) whose velocity difference at the j-th edited step of
    n_max - n_min counts only where values >= 1 - j / (n_max - n_min); the tail composited by the last."""
    g = torch.Generator().manual_seed(seed)
    s = [float(v) for v in sig]
    T, n = len(s) - 1, n_max - n_min
    vel = lambda x, t, label, w: (x - den(x, torch.full((x.shape[0],), t, dtype=x.dtype), label=label, cfg=w)) / t
    noised = lambda x0, t, e: x0 + t * e if space == "eps" else (1 - t) * x0 + t * e
    z, tail, edited = x_src.clone(), None, None
    for i in range(T - n_max, T):
        t_i, t_im1 = s[i], s[i + 1]
        if T - i > n_min:
            j = i - (T - n_max)
            edited = (values >= 1 - j / n).to(x_src)
            zs = noised(x_src, t_i, torch.randn(x_src.shape, generator=g, dtype=x_src.dtype))
            z = z + (t_im1 - t_i) * edited * (vel(z + zs - x_src, t_i, TGT, w_tar) - vel(zs, t_i, SRC, w_src))
        else:
            if tail is None:
                tail = z + noised(x_src, t_i, torch.randn(x_src.shape, generator=g, dtype=x_src.dtype)) - x_src
            tail = tail + (t_im1 - t_i) * vel(tail, t_i, TGT, w_tar)
    return z if tail is None else x_src + edited * (tail - x_src)


@pytest.mark.parametrize("n_min", [0, 2])
@pytest.mark.parametrize("space", SPACES)
def test_flowedit_growing_region_is_the_rule_step_by_step(space, n_min):
    den, x = MixtureDenoiser(MIX, space), data().double()
    sig = schedule(space, 8).flip(0)
    values = torch.linspace(0, 1, 64, dtype=torch.float64).view(1, 1, 8, 8)
    m = masks.Region(values, grow=True)
    out, _ = edit_flowedit(two(den), x, sig, 1.5, 5.5, n_min=n_min, n_max=7, seed=4, mask=m, space=space)
    want = flowedit_growing(den, x, sig, 1.5, 5.5, 7, n_min, 4, space, values)
    assert rel(out, want) < 1e-12
    never = values < 1 / (7 - n_min)  # below the last threshold: never edited
    assert torch.equal(out * never, x * never) and rel(out, x) > 1e-3


class Attending:
    """TwoPrompts that also returns, with each call, an attention map of the edited words: one layer
    at factor 2 that attends to the right half of the latent, as the host's capture returns them."""

    def __init__(self, den, seen):
        self.two, self.seen = two(den), seen

    def __call__(self, x, sigma, branch, scale):
        p = self.two(x, sigma, branch, scale)
        self.seen.append(scale)
        att = torch.full((x.shape[0], 1, 8, 8), 0.2)
        att[..., 4:] = 1.0
        p.maps = ((2, att),)
        return p


@pytest.mark.parametrize("space", SPACES)
def test_region_from_the_attention_each_call_returns(space):
    """The editor builds the mask from the maps the calls return (shape_mask of their mean), after
    each step's calls, and asks for both halves so as to guide them per pixel: here the same as the
    right half given as a mask, bit for bit; a feather on the words' region works as on a mask's."""
    den, inv = setup("ddim", space)
    seen = []
    words = masks.Region(words=True, threshold=0.5, dilation=0)
    fn, kwargs = sampler_for(inv.sampler, inv.settings)
    run = dict(sampler=fn, sampler_args=kwargs, space=space)
    out, nfe = edit_blended(Attending(den, seen), inv.latent, inv.sigmas.flip(0), words, 1.0, 5.0, **run)
    assert torch.equal(out, blended(den, inv, half(inv.latent))[0])
    assert seen == [1.0, None] * inv.steps and nfe == 2 * inv.steps
    soft, _ = edit_blended(Attending(den, []), inv.latent, inv.sigmas.flip(0),
                           masks.Region(words=True, threshold=0.5, dilation=0, feather=2), 1.0, 5.0, **run)
    assert torch.equal(soft, blended(den, inv, masks.Region(half(inv.latent), feather=2))[0])


@pytest.mark.parametrize("space", SPACES)
def test_blended_growing_region_is_the_rule_step_by_step(space):
    """Blended guidance over DDIM's inversion with a growing region, against Euler sampling of both
    branches restated: at step k of the window's n, M_k = [values >= 1 - k / n] sets the target's
    scale and its blend with the source branch, in float64."""
    den = MixtureDenoiser(MIX, space)
    inv = invert("ddim", den, data().double(), schedule(space, 6), {"label": SRC, "cfg": 1.0}, space=space)
    values = torch.linspace(0, 1, 64, dtype=torch.float64).view(1, 1, 8, 8)
    out, _ = blended(den, inv, masks.Region(values, grow=True), mask_steps=4 / 6)
    s = [float(v) for v in inv.sigmas.flip(0)]
    xs = xt = inv.latent
    for k in range(6):
        at = torch.full((3,), s[k], dtype=torch.float64)
        ds = den(xs, at, label=SRC, cfg=1.0)
        if k < 4:
            m = (values >= 1 - k / 4).double()
            u, c = den(xt, at, label=TGT, cfg=0.0), den(xt, at, label=TGT, cfg=1.0)
            dt = u + (1.0 + 4.0 * m) * (c - u)
            dt = dt * m + ds * (1 - m)
        else:
            dt = den(xt, at, label=TGT, cfg=1.0)
        xs = xs + (s[k + 1] - s[k]) * (xs - ds) / s[k]
        xt = xt + (s[k + 1] - s[k]) * (xt - dt) / s[k]
    assert rel(out, xt) < 1e-12 and rel(out, xs) > 1e-3


@pytest.mark.parametrize("space", SPACES)
def test_rf_inversion_growing_region_is_the_rule_step_by_step(space):
    """RF-Inversion with a growing region, against the paper's loops restated with inpainting's
    rule: after sampling step i, the pixels below the threshold 1 - i / N take the inversion's
    state at that sigma, in float64; the never-edited pixels end as the source exactly."""
    den, x = MixtureDenoiser(MIX, space), data().double()
    up = schedule(space, 8)
    values = torch.linspace(0, 1, 64, dtype=torch.float64).view(1, 1, 8, 8)
    out, _ = edit_rf_inversion(two(den), x, up.flip(0), 1.0, 4.0, gamma=0.5, eta=0.9, start=1, stop=5, seed=2,
                               space=space, mask=masks.Region(values, grow=True))
    y1 = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    v = lambda y, t, label, w: (y - den(y, torch.full((3,), t, dtype=y.dtype), label=label, cfg=w)) / t
    s, states, y = [float(t) for t in up], [x], x
    for i in range(8):
        u = v(y, max(s[i], 1e-4), SRC, 1.0)
        y = y + (s[i + 1] - s[i]) * (u + 0.5 * ((y1 if space == "eps" else (y1 - y) / (1 - s[i])) - u))
        states.append(y)
    d = s[::-1]
    for i in range(8):
        u = v(y, d[i], TGT, 4.0)
        if 1 <= i < 5:
            u = u + 0.9 * ((y - x) / d[i] - u)
        y = y + (d[i + 1] - d[i]) * u
        m = (values >= 1 - i / 8).double()
        y = states[7 - i] + m * (y - states[7 - i])
    assert rel(out, y) < 1e-12 and rel(out, x) > 1e-3
    never = values < 1 / 8
    assert torch.equal(out * never, x * never)
