"""Hostile input, from the audit of issue 13: each case here returned a silently wrong answer or an
unclear error before, and must now give the right answer or a clear error that names the argument."""
import os
import subprocess
import sys

import pytest
import torch

import diffkern as dk
from diffkern import coefficients, ops

D = torch.ops.diffkern
WIDTH = len(coefficients.FIELDS)


def identity_table(dtype=torch.float32):
    """out = x (d = 1): a row whose result is easy to predict."""
    table = torch.zeros(1, WIDTH, dtype=dtype)
    table[0, coefficients.INDEX["d"]] = 1.0
    return table


# ---- out= overlapping what the kernel reads ----

def _overlaps():
    buf = torch.randn(8, 16)
    small = torch.randn(4, 16)
    table = identity_table()
    return {
        "strided x": (lambda: ops.fused_step(buf[::2], coefficients=table, out=buf[2:6]), "out overlaps x"),
        "expanded x": (lambda: ops.fused_step(small[:1].expand(4, 16), coefficients=table, out=small),
                       "out overlaps x"),
        "expanded model_output": (lambda: ops.fused_step(torch.randn(4, 16), small[:1].expand(4, 16),
                                                         coefficients=table, out=small),
                                  "out overlaps model_output"),
        "the table": (lambda: ops.fused_step(torch.randn(1, WIDTH), coefficients=table, out=table),
                      "out overlaps coefficients"),
        "aux_out and out": (lambda: ops.fused_step(torch.randn(4, 16), coefficients=table, aux="x0", out=small,
                                                   aux_out=small), "aux_out overlaps"),
    }


@pytest.mark.parametrize("case", list(_overlaps()))
def test_out_overlapping_an_input_is_refused(case):
    call, match = _overlaps()[case]
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


def test_rows_overlap_is_refused_by_the_op():
    rows = torch.zeros(4, dtype=torch.int64)
    out = rows.view(torch.float64)[:, None]  # the memory of the row indices
    with pytest.raises(RuntimeError, match="out overlaps rows"):
        D.fused_step.out(torch.randn(4, 1, dtype=torch.float64), None, None, None, None, None,
                         identity_table(torch.float64), rows, 0, False, 0, False, 0, 0, 0, 0, None, out=out,
                         aux_out=None)


def test_disjoint_parts_of_one_buffer_are_fine():
    buf = torch.randn(8, 16)
    expected = buf[4:].clone()
    ops.fused_step(buf[4:], coefficients=identity_table(), out=buf[:4])
    assert torch.equal(buf[:4], expected)


def test_linear_step_out_overlap_is_refused():
    x = torch.randn(4, 8)
    table = torch.zeros(1, 1 + 3 + 1 * 3)
    with pytest.raises(RuntimeError, match="overlaps"):
        D.linear_step.out([x], None, table, 0, 1, False, False, False, 0, 0, 0, 0, None, out=[x])


@pytest.mark.parametrize("returned", ["the state itself", "an expanded row of it", "a slice of it"])
def test_sampler_survives_a_model_returning_its_own_state(returned):
    """A model that returns (a view of) the state it was given: the loop must not overwrite it while
    the step reads it. Same result as the model returning a copy."""
    view = {"the state itself": lambda x: x, "an expanded row of it": lambda x: x[:1].expand_as(x),
            "a slice of it": lambda x: x[:, :1].expand_as(x)}[returned]
    for sampler in (dk.sample_ddpm, dk.sample_ddim):
        aliased = sampler(lambda x, t: view(x), (4, 3), num_inference_steps=6, seed=1)
        copied = sampler(lambda x, t: view(x).clone(), (4, 3), num_inference_steps=6, seed=1)
        assert torch.equal(aliased, copied)


# ---- meta tensors among real ones; fake kernels that check ----

META = torch.device("meta")


def _mixed_meta_calls():
    x, table = torch.randn(4, 16), identity_table()
    meta = torch.empty(4, 16, device=META)
    return {
        "fused_step model_output": lambda: D.fused_step(x, meta, None, None, None, None, table, None, 0, False, 0,
                                                        False, 0, 0, 0, 0, None),
        "fused_step table": lambda: D.fused_step(x, None, None, None, None, None, table.to(META), None, 0, False, 0,
                                                 False, 0, 0, 0, 0, None),
        "fused_step rows": lambda: D.fused_step(x, None, None, None, None, None, table,
                                                torch.zeros(4, dtype=torch.int64, device=META), 0, False, 0, False, 0,
                                                0, 0, 0, None),
        "fused_step seed_step": lambda: D.fused_step(x, None, None, None, None, None, table, None, 0, False, 0, True,
                                                     0, 0, 0, 0, torch.zeros(2, dtype=torch.int64, device=META)),
        "philox4x32_10 key": lambda: D.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64),
                                                     torch.zeros(1, 2, dtype=torch.int64, device=META)),
        "probe_trace products": lambda: D.probe_trace(torch.randn(1, 4, 3), torch.empty(1, 4, 3, device=META), 1.0),
        "randn seed_step": lambda: D.randn([2, 3], 0, 0, 0, 0, torch.zeros(2, dtype=torch.int64, device=META),
                                           torch.float32, torch.device("cpu")),
        "likelihood_step delta_logp": lambda: D.likelihood_step(
            torch.randn(2, 3), torch.randn(2, 3), None, torch.randn(1, 2, 3), torch.randn(1, 2, 3),
            torch.zeros(2, dtype=torch.float64, device=META), None, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
        "linear_step input": lambda: D.linear_step([x, meta], None, torch.zeros(1, 2 + 3 + 4), 0, 1, False, False,
                                                   False, 0, 0, 0, 0, None),
    }


@pytest.mark.parametrize("case", list(_mixed_meta_calls()))
def test_one_meta_tensor_among_cpu_ones_is_refused(case):
    with pytest.raises(RuntimeError, match="meta"):
        _mixed_meta_calls()[case]()


def _bad_meta_calls():
    m = lambda *shape, dtype=torch.float32: torch.empty(*shape, device=META, dtype=dtype)  # noqa: E731
    return {
        "fused_step table width": (lambda: D.fused_step(m(4, 16), m(4, 16), None, None, None, None, m(1, 5), None, 0,
                                                        False, 0, False, 0, 0, 0, 0, None), "coefficients"),
        "fused_step shape": (lambda: D.fused_step(m(4, 16), m(4, 15), None, None, None, None, m(1, WIDTH), None, 0,
                                                  False, 0, False, 0, 0, 0, 0, None), "model_output has shape"),
        "fused_step dtype": (lambda: D.fused_step(m(4, 16), m(4, 16, dtype=torch.float16), None, None, None, None,
                                                  m(1, WIDTH), None, 0, False, 0, False, 0, 0, 0, 0, None),
                             "model_output is"),
        "linear_step table width": (lambda: D.linear_step([m(4, 8)], None, m(1, 3), 0, 1, False, False, False, 0, 0,
                                                          0, 0, None), "coefficients"),
        "probe_trace shapes": (lambda: D.probe_trace(m(1, 4, 3), m(1, 5, 3), 1.0), "one shape"),
        "likelihood_step x": (lambda: D.likelihood_step(m(2, 4), m(2, 4), None, m(1, 2, 3), m(1, 2, 3),
                                                        m(2, dtype=torch.float64), None, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
                                                        1.0), "x's shape"),
        "likelihood_step delta dtype": (lambda: D.likelihood_step(m(2, 3), m(2, 3), None, m(1, 2, 3), m(1, 2, 3),
                                                                  m(2), None, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
                                        "delta_logp"),
        "philox shapes": (lambda: D.philox4x32_10(m(1, 3, dtype=torch.int64), m(1, 2, dtype=torch.int64)), "counter"),
        "randn seed_step size": (lambda: D.randn([2, 3], 0, 0, 0, 0, m(3, dtype=torch.int64), torch.float32, META),
                                 "seed_step"),
    }


@pytest.mark.parametrize("case", list(_bad_meta_calls()))
def test_fake_kernels_check_what_the_real_ones_check(case):
    call, match = _bad_meta_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call()


def test_fake_kernels_accept_good_meta_inputs():
    out, aux = D.fused_step(torch.empty(4, 16, device=META), None, None, None, None, None,
                            torch.empty(2, WIDTH, device=META), None, 0, False, 1, False, 0, 0, 0, 0, None)
    assert out.device == META and out.shape == (4, 16) and aux.shape == (4, 16)


# ---- per-sample timesteps get the checks ints get ----

SCHED = dk.DDPMSchedule()
M, X, Z = (torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(k)) for k in range(3))
T4 = torch.tensor([10] * 4)


@pytest.mark.parametrize("call,match", [
    (lambda: dk.ddpm_step(M, T4, X, SCHED, noise=Z, prev_t=20), "prev_t must be smaller than t"),
    (lambda: dk.ddim_step(M, T4, 20, X, SCHED), "t_prev must be smaller than t"),
    (lambda: dk.ddpm_step(M, T4, X, SCHED, noise=Z, prev_t=5000), "prev_t=5000"),
    (lambda: dk.ddpm_step(M, T4, X, SCHED, noise=Z, prev_t=torch.tensor([5] * 3)), "prev_t as a tensor"),
    (lambda: dk.ddpm_step(M, T4, X, SCHED, noise=Z, prev_t=torch.tensor([5.0] * 4)), "prev_t as a tensor"),
    (lambda: dk.ddpm_step(M, T4, X, SCHED, noise=Z, prev_t=torch.tensor([5, 5, 5, 5000])), "prev_t has values"),
    (lambda: dk.ddpm_step(M, torch.tensor([10.0] * 4), X, SCHED, noise=Z), "t as a tensor"),
    (lambda: dk.ddpm_step(M, torch.tensor([10] * 3), X, SCHED, noise=Z), "t as a tensor"),
    (lambda: dk.euler_maruyama_step(M, X, torch.full((3,), 0.5), -0.01, dk.VPSDE(), noise=Z), r"t as a tensor.*\(4\)"),
])
def test_per_sample_timesteps_are_checked(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_per_sample_prev_t_steps_like_the_int_path():
    per_sample = dk.ddim_step(M, T4, torch.tensor([5] * 4), X, SCHED)
    assert torch.allclose(per_sample, dk.ddim_step(M, 10, 5, X, SCHED), rtol=1e-6, atol=1e-6)


# ---- ranges ----

SIGMAS = dk.karras_sigmas(5, 0.1, 10.0)


def zero_denoiser(x, sigma):
    return torch.zeros_like(x)


@pytest.mark.parametrize("call,error,match", [
    (lambda: D.randn([2, 3], 0, 0, 2 ** 63 - 1, 0, None, torch.float32, torch.device("cpu")), RuntimeError,
     "sample_offset"),
    (lambda: dk.randn((2, 3), step=torch.tensor(2 ** 32)), RuntimeError, r"step in seed_step must lie in \[0, 2\^32\)"),
    (lambda: dk.randn((2, 3), step=torch.tensor(-1)), RuntimeError, r"step in seed_step"),
    (lambda: dk.randn((2.7, 3)), TypeError, "shape"),
    (lambda: dk.randn((2, True)), TypeError, "shape"),
    (lambda: dk.ddpm_step(M, 10, X, SCHED, noise=Z, clip_sample=float("nan")), ValueError, "clip_sample"),
    (lambda: dk.ddpm_step(M, 10, X, SCHED, noise=Z, clip_sample=(0.5, float("nan"))), ValueError, "clip_sample"),
    (lambda: dk.ddpm_step(M, 10, X, SCHED, noise=Z, clip_sample="yes"), ValueError, "clip_sample"),
    (lambda: dk.sample_heun(zero_denoiser, (2, 3), SIGMAS, s_churn=-10), ValueError, "s_churn"),
    (lambda: dk.sample_euler(zero_denoiser, (2, 3), SIGMAS, s_noise=float("nan")), ValueError, "s_noise"),
    (lambda: dk.sample_euler_ancestral(zero_denoiser, (2, 3), SIGMAS, eta=-1), ValueError, "eta"),
    (lambda: dk.sample_ddim(lambda x, t: x, (2, 3), eta=float("nan")), ValueError, "eta"),
    (lambda: dk.sample_pc(lambda x, t: -x, (2, 3), dk.VPSDE(), 5, snr=-0.1), ValueError, "snr"),
    (lambda: dk.sample_pc(lambda x, t: -x, (2, 3), dk.VPSDE(), 5, n_corrector_steps=0), ValueError,
     "n_corrector_steps"),
    (lambda: dk.langevin_step(M, X, torch.tensor([0.1, -0.1, 0.1, 0.1]), noise=Z), ValueError, "step_size"),
    (lambda: dk.langevin_step(M, X, float("nan"), noise=Z), ValueError, "step_size"),
    (lambda: dk.euler_step(M, X, 0.0, 1.0), ValueError, "sigma"),
    (lambda: dk.euler_step(M, X, torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5), ValueError, "sigma"),
    (lambda: dk.euler_ancestral_step(M, X, 1.0, 0.5, eta=-1, noise=Z), ValueError, "eta"),
    (lambda: dk.cnf_log_likelihood(lambda x, t: -x, torch.randn(2, 3), t0=float("nan")), ValueError, "t0"),
    (lambda: dk.cnf_log_likelihood(lambda x, t: -x, torch.randn(2, 3), t1=float("inf")), ValueError, "t1"),
    (lambda: dk.ddpm_step(torch.randn(4, 8, dtype=torch.complex64), 10, torch.randn(4, 8), SCHED,
                          noise=torch.randn(4, 8)), ValueError, "model_output must be a real"),
])
def test_out_of_range_values_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_learned_variance_nan_gives_nan_without_undefined_behaviour():
    """exp_fixed used to convert NaN to an integer (UB, found by UBSan); now NaN in, NaN out, and only
    where the variance output is NaN. Checked on every CPU instruction set and the thread body."""
    x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    v = torch.rand(2, 3, 4) * 2 - 1
    v[0, 1, 2] = float("nan")
    out = dk.ddpm_step(torch.cat([eps, v], 1), 500, x, SCHED, variance_type="learned_range", noise=torch.randn(2, 3, 4))
    nan = out.isnan()
    assert nan[0, 1, 2] and int(nan.sum()) == 1


# ---- empty batches work and return empty ----

@pytest.mark.parametrize("name,call", [
    ("sample_ddpm", lambda: dk.sample_ddpm(lambda x, t: x, (0, 3), num_inference_steps=3)),
    ("sample_ddim", lambda: dk.sample_ddim(lambda x, t: x, (0, 3), num_inference_steps=3)),
    ("sample_pc", lambda: dk.sample_pc(lambda x, t: -x, (0, 3), dk.VPSDE(), 25)),  # > beta_max: see sample_pc
    ("sample_ode", lambda: dk.sample_ode(lambda x, t: -x, (0, 3), dk.VPSDE(), 5)),
    ("sample_heun", lambda: dk.sample_heun(zero_denoiser, (0, 3), SIGMAS)),
    ("sample_langevin", lambda: dk.sample_langevin(lambda x, s: -x, (0, 3), [1.0, 0.5], 2)),
    ("hutchinson_trace", lambda: dk.hutchinson_trace(lambda x: x, torch.randn(0, 3))),
    ("exact_trace", lambda: dk.exact_trace(lambda x: x, torch.randn(0, 3))),
    ("log_likelihood", lambda: dk.log_likelihood(lambda x, t: -x, torch.randn(0, 3), dk.VPSDE(), 4).log_p),
    ("cnf_log_likelihood", lambda: dk.cnf_log_likelihood(lambda x, t: -x, torch.randn(0, 3), num_steps=3).log_p),
])
def test_empty_batches_return_empty(name, call):
    out = call()
    assert out.shape[0] == 0


# ---- errors that name the problem ----

@pytest.mark.parametrize("call,error,match", [
    (lambda: dk.hutchinson_trace(lambda x: (x,), torch.randn(2, 3)), TypeError, "fn must return one tensor"),
    (lambda: dk.hutchinson_trace(lambda x: x.detach(), torch.randn(2, 3)), ValueError, "does not depend on x"),
    (lambda: ops.likelihood_step(torch.randn(2, 3), torch.randn(2, 3), None, torch.randn(1, 2, 3),
                                 torch.randn(1, 2, 3), 0.0, None, c_x=1.0, c_model=1.0), ValueError, "delta_logp"),
    (lambda: ops.probe_trace(torch.tensor(1.0), torch.tensor(1.0), 1.0), ValueError, "probes must be"),
    (lambda: D.fused_step(torch.randn(4, 2), None, None, None, None, None, identity_table(), None, -2, False, 0,
                          False, 0, 0, 0, 0, None), RuntimeError, "got -2"),
])
def test_errors_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- the command line and the environment ----

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffkern", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,match", [
    (("--seed", "-1"), "--seed"),
    (("--seed", str(2 ** 64)), "--seed"),
    (("--seed", "abc"), "--seed"),
    (("demo", "--out", "/proc/diffkern-demo"), "--out"),
    (("demo", "--samples", "0"), "--samples"),
])
def test_cli_checks_arguments_up_front(args, match):
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert match in result.stderr, result.stderr


@pytest.mark.parametrize("isa", ["SCALAR", "Scalar", "auto"])
def test_cpu_isa_variable_is_case_insensitive(isa):
    result = subprocess.run([sys.executable, "-c", "import diffkern as dk; print(dk.build_info()['cpu_isa'])"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "DIFFKERN_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("scalar" if isa != "auto" else dk.build_info()["cpu_isa"])


def test_unknown_cpu_isa_names_the_variable():
    result = subprocess.run([sys.executable, "-c", "import diffkern"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DIFFKERN_CPU_ISA": "sse9"})
    assert result.returncode != 0 and "DIFFKERN_CPU_ISA" in result.stderr and "sse9" in result.stderr
