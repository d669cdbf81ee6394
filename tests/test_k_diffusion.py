"""diffkern.k_diffusion against k-diffusion's own sampling.py (0.1.1, loaded by tests/kdiffusion_peer.py):
every sampler and option with the same denoiser and the same noise, float64 to 1e-10 and float32 to
1e-5 (relative to the largest |x|); the same callback dicts, model calls and extra_args; the global
generator and the Brownian tree reproduce k-diffusion's noise under the same torch.manual_seed; the
stream path is batch-split invariant; convergence orders on Gaussian data; bad input."""
import inspect
import math

import pytest
import torch
from common import DEVICES, requires_cuda
from kdiffusion_peer import load

import diffkern.k_diffusion as K
from diffkern.models import GaussianMixture

KP, WHY = load()
needs_peer = pytest.mark.skipif(KP is None, reason=WHY or "")
MIX = GaussianMixture.ring()
F64 = torch.float64


def denoiser(x, sigma, **extra):
    """The ring mixture's exact denoiser, computed in float64 whatever x's dtype (so a float32 comparison
    measures the samplers' arithmetic, not the mixture's sensitivity to a rounded input)."""
    return MIX.denoiser(x.double(), torch.as_tensor(sigma).double().expand(x.shape[0])).to(x.dtype)


class Recorded:
    """A noise sampler with its own generator: two fresh instances give the same sequence of draws."""

    def __init__(self, x, seed=0):
        self.generator, self.x, self.calls = torch.Generator().manual_seed(seed), x, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.x.shape, generator=self.generator, dtype=F64).to(self.x.dtype)


SIGMA_SAMPLERS = [
    ("sample_euler", {}), ("sample_euler", {"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 5.0, "s_noise": 1.003}),
    ("sample_euler_ancestral", {}), ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("sample_euler_ancestral", {"eta": 0.0}),
    ("sample_heun", {}), ("sample_heun", {"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 5.0}),
    ("sample_dpm_2", {}), ("sample_dpm_2", {"s_churn": 0.5}),
    ("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.7, "s_noise": 1.1}),
    ("sample_lms", {}), ("sample_lms", {"order": 2}), ("sample_lms", {"order": 1}),
    ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"r": 0.3, "eta": 0.5}), ("sample_dpmpp_sde", {"eta": 0.0}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.8}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_3m_sde", {}), ("sample_dpmpp_3m_sde", {"eta": 0.0, "s_noise": 0.5}),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _run(module, name, x, sigmas, kwargs, callback=None):
    """One sampler call with a fresh Recorded noise sampler where it takes one, and torch's global
    generator seeded (the churn samplers draw from it)."""
    function = getattr(module, name)
    if "noise_sampler" in inspect.signature(function).parameters:
        kwargs = dict(kwargs, noise_sampler=Recorded(x))
    torch.manual_seed(3)
    return function(denoiser, x, sigmas, disable=True, callback=callback, **kwargs)


def _close(ours, theirs, dtype):
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= TOLERANCE[dtype] * scale, (ours - theirs).abs().max().item() / scale


@needs_peer
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kwargs", SIGMA_SAMPLERS, ids=[f"{n}-{k}" for n, k in SIGMA_SAMPLERS])
def test_samplers_equal_k_diffusion(name, kwargs, dtype):
    sigmas = K.get_sigmas_karras(12, 0.02, 20.0).to(dtype)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype) * sigmas[0]
    before = x.clone()
    seen = {"ours": [], "peer": []}
    ours = _run(K, name, x, sigmas, kwargs, seen["ours"].append)
    theirs = _run(KP, name, x, sigmas, kwargs, seen["peer"].append)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    _close(ours, theirs, dtype)
    assert torch.equal(x, before)  # nothing written into x
    assert len(seen["ours"]) == len(seen["peer"]) == 12
    for a, b in zip(seen["ours"], seen["peer"]):
        assert a.keys() == b.keys() and a["i"] == b["i"]
        assert torch.equal(torch.as_tensor(a["sigma"]), torch.as_tensor(b["sigma"]))
        assert torch.equal(torch.as_tensor(a["sigma_hat"]), torch.as_tensor(b["sigma_hat"]))
        _close(a["x"], b["x"], dtype)
        _close(a["denoised"], b["denoised"], dtype)


@needs_peer
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", [{"n": 10}, {"n": 12}, {"n": 11, "eta": 0.5}, {"n": 2}])
def test_dpm_fast_equals_k_diffusion(kwargs, dtype):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype) * 20
    seen = {"ours": [], "peer": []}
    results = [module.sample_dpm_fast(denoiser, x, 0.02, 20.0, disable=True, noise_sampler=Recorded(x),
                                      callback=seen[who].append, **kwargs)
               for who, module in (("ours", K), ("peer", KP))]
    _close(*results, dtype)
    assert [sorted(d) for d in seen["ours"]] == [sorted(d) for d in seen["peer"]]
    assert [float(d["t"]) for d in seen["ours"]] == [float(d["t"]) for d in seen["peer"]]


@needs_peer
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kwargs", [{}, {"order": 2, "rtol": 0.01, "atol": 0.001}, {"eta": 0.5},
                                    {"pcoeff": 0.1, "icoeff": 0.8, "dcoeff": 0.05, "accept_safety": 0.9}])
def test_dpm_adaptive_equals_k_diffusion(kwargs, dtype):
    """Float64 to 1e-10 with the same accepted and rejected steps. In float32 the error norms round
    differently, the controller's step sizes follow them, and k-diffusion's own float32 run lies 1e-3
    from its float64 run with eta = 0.5 (2e-5 without): compared to 5e-3 there, with the same step counts."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype) * 20
    (ours, info), (theirs, their_info) = [
        module.sample_dpm_adaptive(denoiser, x, 0.02, 20.0, disable=True, noise_sampler=Recorded(x), return_info=True,
                                   **kwargs) for module in (K, KP)]
    assert info == their_info
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= (1e-10 if dtype == F64 else 5e-3) * scale


@needs_peer
def test_the_global_generator_gives_k_diffusions_samples():
    """Without a noise sampler both draw torch.randn_like(x) from torch's global generator, in the same order."""
    sigmas = K.get_sigmas_karras(10, 0.02, 20.0).double()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * sigmas[0]
    for name, kwargs in (("sample_euler_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.6}),
                         ("sample_dpmpp_2s_ancestral", {}), ("sample_euler", {"s_churn": 2.0, "s_tmax": 3.0}),
                         ("sample_heun", {"s_churn": 1.0})):
        torch.manual_seed(11)
        ours = getattr(K, name)(denoiser, x, sigmas, disable=True, **kwargs)
        after_ours = torch.rand(1)
        torch.manual_seed(11)
        theirs = getattr(KP, name)(denoiser, x, sigmas, disable=True, **kwargs)
        after_theirs = torch.rand(1)
        _close(ours, theirs, F64)
        assert torch.equal(after_ours, after_theirs), name  # the generator advanced alike


@needs_peer
# k-diffusion asks the tree for sigma_fn(t_fn(sigma_min)), a rounding below the tree's start: torchsde warns
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_the_default_brownian_tree_gives_k_diffusions_samples(name):
    sigmas = K.get_sigmas_karras(8, 0.05, 10.0).double()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * sigmas[0]
    torch.manual_seed(5)
    ours = getattr(K, name)(denoiser, x, sigmas, disable=True)
    torch.manual_seed(5)
    theirs = getattr(KP, name)(denoiser, x, sigmas, disable=True)
    _close(ours, theirs, F64)


@needs_peer
def test_a_stream_noise_sampler_gives_the_same_samples_to_k_diffusion():
    """A bound stream_noise_sampler handed to k-diffusion's own function reproduces seed=: the kernel
    draws inside what the sampler returns when called."""
    sigmas = K.get_sigmas_karras(10, 0.02, 20.0).double()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * sigmas[0]
    for name in ("sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_dpmpp_sde", "sample_dpmpp_3m_sde"):
        ours = getattr(K, name)(denoiser, x, sigmas, disable=True, seed=9)
        theirs = getattr(KP, name)(denoiser, x, sigmas, disable=True, noise_sampler=K.stream_noise_sampler(9, x))
        _close(ours, theirs, F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_euler",
                                  "sample_heun"])
def test_stream_noise_is_the_same_for_any_split_of_the_batch(name, device):
    sigmas = K.get_sigmas_karras(8, 0.02, 20.0, device=device)
    x = torch.randn(12, 3, 4, generator=torch.Generator().manual_seed(4)).to(device) * 20
    kwargs = {"s_churn": 1.0} if name in ("sample_euler", "sample_heun") else {}

    def model(x, sigma):  # per sample: no dependence on the batch
        return x / (1 + sigma.reshape(-1, 1, 1) ** 2)

    whole = getattr(K, name)(model, x, sigmas, disable=True, seed=7, **kwargs)
    parts = [getattr(K, name)(model, x[a:b], sigmas, disable=True, seed=7, sample_offset=a, **kwargs)
             for a, b in ((0, 5), (5, 12))]
    assert torch.equal(torch.cat(parts), whole)


@requires_cuda
def test_cuda_equals_cpu_with_stream_noise_and_no_host_sync():
    sigmas = K.get_sigmas_karras(10, 0.02, 20.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=F64) * 20

    def model(x, sigma):
        return x / (1 + sigma.reshape(-1, 1) ** 2)

    for name in ("sample_euler_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_heun"):
        cpu = getattr(K, name)(model, x, sigmas.double(), disable=True,
                               **({} if name in ("sample_dpmpp_2m", "sample_heun") else {"seed": 3}))
        x_cuda, sigmas_cuda = x.cuda(), sigmas.double().cuda()
        # the run's planning reads the sigmas once, before the loop
        getattr(K, name)(model, x_cuda, sigmas_cuda, disable=True)
        cuda = getattr(K, name)(model, x_cuda, sigmas_cuda, disable=True,
                                **({} if name in ("sample_dpmpp_2m", "sample_heun") else {"seed": 3}))
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-12, atol=1e-12)


def _gaussian_error(name, n, s=1.5, order=None):
    """|x(sigma_min) - exact| for the probability-flow ODE of N(0, s^2) data, whose denoiser is
    x s^2 / (sigma^2 + s^2) and whose solution scales x by sqrt(sigma^2 + s^2)."""
    sigma_max, sigma_min = 10.0, 0.1
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1, dtype=F64))
    x = torch.linspace(-2, 2, 9, dtype=F64).reshape(9, 1) * sigma_max

    def gaussian(x, sigma):
        return x * s ** 2 / (sigma.reshape(-1, 1) ** 2 + s ** 2)

    kwargs = {"order": order} if order else {}
    out = getattr(K, name)(gaussian, x, sigmas, disable=True, **kwargs)
    exact = x * math.sqrt(sigma_min ** 2 + s ** 2) / math.sqrt(sigma_max ** 2 + s ** 2)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name,order,expected", [("sample_euler", None, 1.0), ("sample_heun", None, 2.0),
                                                 ("sample_dpm_2", None, 2.0), ("sample_dpmpp_2m", None, 2.0),
                                                 ("sample_lms", 2, 2.0)])
def test_convergence_orders_on_gaussian_data(name, order, expected):
    """The observed order log2(e(n) / e(2n)) between 32 and 64 steps (log-spaced sigmas) within 0.25 of the
    method's order."""
    e32, e64 = _gaussian_error(name, 32, order=order), _gaussian_error(name, 64, order=order)
    assert abs(math.log2(e32 / e64) - expected) < 0.25, math.log2(e32 / e64)


def test_lms_order_4_is_fourth_order_but_for_its_start():
    """LMS of order 4 starts with orders 1, 2, 3 (as k-diffusion's): its weights integrate cubics exactly
    (fourth-order steps), but the first, Euler, step leaves an O(h^2) error, so the global order falls
    from about 3 (32 -> 64 steps here: 2.95) towards 2 as the steps shrink (2.2 at 256). Both shown."""
    t = [5.0, 3.5, 2.2, 1.4, 0.9]
    for j_poly in range(4):  # the weights of step 3 integrate tau^k, k < 4, through the values at t[0..3]
        exact = (t[4] ** (j_poly + 1) - t[3] ** (j_poly + 1)) / (j_poly + 1)
        weighted = sum(K.linear_multistep_coeff(4, t, 3, j) * t[3 - j] ** j_poly for j in range(4))
        assert abs(weighted - exact) < 1e-12 * max(1.0, abs(exact))
    orders = [math.log2(_gaussian_error("sample_lms", n, order=4) / _gaussian_error("sample_lms", 2 * n, order=4))
              for n in (32, 128)]
    assert orders[0] > 2.7 and 1.9 < orders[1] < orders[0]


def test_extra_args_reach_the_model_and_outputs_are_untouched():
    sigmas = K.get_sigmas_karras(4, 0.1, 5.0).double()
    x = torch.randn(3, 2, dtype=F64) * 5
    seen, outputs = [], []

    def model(x, sigma, cond=None, scale=1.0):
        seen.append((cond, scale))
        out = denoiser(x, sigma)
        outputs.append((out, out.clone()))
        return out

    K.sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": "c", "scale": 2.0}, disable=True)
    assert seen and all(s == ("c", 2.0) for s in seen)
    assert all(torch.equal(out, copy) for out, copy in outputs)


def test_helpers_equal_their_definitions():
    sigmas = K.get_sigmas_karras(5, 0.1, 10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 5, dtype=F64)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas[:-1].double(), expected, rtol=1e-6, atol=0)
    assert sigmas[-1] == 0 and sigmas.dtype == torch.float32
    torch.testing.assert_close(K.get_sigmas_exponential(4, 0.1, 10.0)[:-1].double().log(),
                               torch.linspace(math.log(10.0), math.log(0.1), 4, dtype=F64), rtol=1e-6, atol=1e-6)
    down, up = K.get_ancestral_step(torch.tensor(2.0), torch.tensor(1.0), eta=1.0)
    assert abs(float(down) ** 2 + float(up) ** 2 - 1.0) < 1e-6 and abs(float(up) - math.sqrt(0.75)) < 1e-6
    x, d = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(K.to_d(x, torch.tensor([2.0, 4.0]), d), torch.tensor([[0.5] * 3, [0.25] * 3]))
    # the LMS weights integrate polynomials exactly: order 1 is the Euler step
    assert K.linear_multistep_coeff(1, [3.0, 2.0], 0, 0) == -1.0


@needs_peer
def test_helpers_equal_k_diffusions():
    for fn, args in (("get_sigmas_karras", (7, 0.03, 14.6)), ("get_sigmas_exponential", (6, 0.03, 14.6)),
                     ("get_sigmas_polyexponential", (6, 0.03, 14.6, 2.0)), ("get_sigmas_vp", (6,))):
        assert torch.equal(getattr(K, fn)(*args), getattr(KP, fn)(*args)), fn
    # float64 levels: quad on a polynomial is exact to rounding. float32 levels (what sample_lms passes):
    # k-diffusion's integrand divides by differences of float32 numpy scalars, rounded to float32, where
    # ours are exact: 1e-7 relative apart.
    for t, tolerance in ((K.get_sigmas_karras(8, 0.1, 10.0).double().numpy(), 1e-12),
                         (K.get_sigmas_karras(8, 0.1, 10.0).numpy(), 1e-7)):
        for order in (1, 2, 3, 4):
            for j in range(order):
                ours, theirs = K.linear_multistep_coeff(order, t, 5, j), KP.linear_multistep_coeff(order, t, 5, j)
                assert abs(ours - theirs) <= tolerance * max(1.0, abs(theirs))


@pytest.mark.parametrize("call,match", [
    (lambda x: K.sample_euler(denoiser, x, torch.tensor([1.0, 2.0, 0.0]), disable=True), "must not increase"),
    (lambda x: K.sample_euler(denoiser, x, torch.tensor([2.0, float("nan"), 0.0]), disable=True), "finite"),
    (lambda x: K.sample_euler(denoiser, x, torch.tensor([]), disable=True), "non-empty"),
    (lambda x: K.sample_euler(denoiser, x, torch.tensor([2.0, 0.0, 0.0]), disable=True), "positive"),
    (lambda x: K.sample_lms(denoiser, x, torch.tensor([2.0, 1.0, 0.0]), order=0, disable=True), "order"),
    (lambda x: K.sample_dpm_adaptive(denoiser, x, 0.1, 10.0, order=4, disable=True), "order should be 2 or 3"),
    (lambda x: K.sample_dpm_fast(denoiser, x, 0.0, 10.0, 5, disable=True), "must not be 0"),
    (lambda x: K.sample_dpmpp_2m_sde(denoiser, x, torch.tensor([2.0, 0.0]), solver_type="euler"), "solver_type"),
    (lambda x: K.sample_euler_ancestral(denoiser, x, torch.tensor([2.0, 0.0]), seed=1, noise_sampler=Recorded(x)),
     "not both"),
    (lambda x: K.sample_euler_ancestral(denoiser, x, torch.tensor([2.0, 0.0]), sample_offset=3), "sample_offset"),
    (lambda x: K.sample_euler(lambda x, s: x[:, :1], x, torch.tensor([2.0, 0.0]), disable=True), "returned"),
    (lambda x: K.sample_euler(denoiser, x, torch.tensor([2.0, 0.0]), extra_args=[1], disable=True), "extra_args"),
    (lambda x: K.sample_euler(denoiser, x.long(), torch.tensor([2.0, 0.0]), disable=True), "floating"),
    (lambda x: K.stream_noise_sampler(3)(None, None), "not bound"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(4, 2, dtype=F64))
