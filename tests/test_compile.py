"""Whole sampling loops as one graph: every diffkern sampler and a loop of every diffusers drop-in's
steps compile with ``torch.compile(fullgraph=True)`` (one graph, no break, by torch._dynamo.explain),
give what the eager loop gives, and take new seeds (a seed tensor) without recompiling.

How: a run's plan (levels, rows, tables) is a function of Python values that dynamo evaluates once at
trace time (diffkern._graph.plan); the loop is unrolled, its per-step indices and noise steps are
constants of the graph, and the kernels read a tensor seed from device memory. The models here are
plain tensor arithmetic, so a difference could only come from the samplers' plans or launches: the
compiled results must be bitwise equal to eager ones (the fused steps are the same custom ops in both;
inductor leaves them alone).

The CUDA variants run wherever a GPU is present; on an H100 (torch 2.11, 2026-12-05) they showed torch
2.11 refusing schedule and SDE objects as plan arguments (fixed: diffkern._graph.PlanArgument) and
inductor's Triton division in a model (hence same_as_eager).
"""
import functools

import pytest
import torch
from common import requires_cuda
from torch._dynamo.testing import CompileCounter

import diffkern as dk
from diffkern.sampling import registry


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces anew: the functions below are one code object for every sampler, and dynamo
    keeps at most a few traces of one code object."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


NATIVE = [name for name in registry.SAMPLERS if not name.startswith("k_")]
K_DIFFUSION = [name for name in registry.SAMPLERS if name.startswith("k_")]
STEPS = {"pc": 25, "ddpm": 6, "langevin": 3}  # pc: score_sde's VP discretisation needs > 20 steps
OPTIONS = {"ddim": {"eta": 0.5}, "dpmpp": {"eta": 1.0}, "langevin": {"langevin_steps": 2}}


def model_of(kind):
    """A traceable model of each kind: the exact ones of N(0, I) data where that is short."""
    if kind == "epsilon":
        return lambda x, t: 0.1 * x
    if kind in ("score", "velocity"):
        return lambda x, t: -0.5 * x
    if kind in ("denoiser", "noise_level_score"):
        # D(x, sigma) = x / (1 + sigma^2) for N(0, I) data; the score -x / (1 + sigma^2)
        return lambda x, sigma: (x if kind == "denoiser" else -x) / (1 + sigma.reshape(-1, *[1] * (x.dim() - 1)) ** 2)
    assert kind == "field"
    return lambda x, z: (0.1 * x, torch.ones_like(z))


def same_as_eager(compiled, eager, kind: str):
    """Bitwise, but for a model inductor compiles for CUDA that divides: its Triton division need not
    round as eager CUDA's does (seen on an H100: the 4-step Heun and DPM-Solver++ runs with the
    denoiser x / (1 + sigma^2) differ in the last bits). That is the model's own compile tolerance; the
    fused steps are the same custom ops either way, and the multiply-only models stay bitwise there."""
    if compiled.device.type == "cuda" and kind in ("denoiser", "noise_level_score"):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(compiled, eager)


def sampler_of(name, **options):
    return registry.make_sampler(name, steps=STEPS.get(name, 4), **dict(OPTIONS.get(name, {}), **options))


def explain(function, *args):
    torch._dynamo.reset()
    result = torch._dynamo.explain(function)(*args)
    return result.graph_count, result.graph_break_count, [str(b.reason).splitlines()[0] for b in result.break_reasons]


@pytest.mark.parametrize("name", NATIVE + K_DIFFUSION)
def test_every_sampler_is_one_graph(name, device):
    sampler, model = sampler_of(name), model_of(registry.ENTRIES[name].model)
    assert explain(lambda: sampler(model, (8, 2), seed=3, device=device)) == (1, 0, [])


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dopri5", "bosh3"])
def test_every_fixed_grid_ode_solver_is_one_graph(solver, device):
    """The adaptive solves are not (their step count is decided on the host, by the error)."""
    sde = dk.VPSDE()
    graphs = explain(lambda: dk.sample_ode(model_of("score"), (8, 2), sde, num_steps=4, solver=solver,
                                           device=device))
    assert graphs == (1, 0, [])


@pytest.mark.parametrize("name", NATIVE)
def test_compiled_sampler_equals_eager_and_new_seeds_do_not_recompile(name, device):
    sampler, model = sampler_of(name), model_of(registry.ENTRIES[name].model)
    counter = CompileCounter()
    compiled = torch.compile(lambda seed: sampler(model, (8, 2), seed=seed, device=device), backend=counter,
                             fullgraph=True)
    for seed in (1, 2, 3):
        eager = sampler(model, (8, 2), seed=seed, device=device)
        assert torch.equal(sampler(model, (8, 2), seed=torch.tensor(seed, device=device), device=device), eager)
        assert torch.equal(compiled(torch.tensor(seed, device=device)), eager)
    assert counter.frame_count == 1  # one trace for every seed (and every step: the loop is unrolled)


@pytest.mark.parametrize("name", K_DIFFUSION)
def test_compiled_k_diffusion_sampler_equals_eager(name, device):
    """The k-diffusion drop-ins take their seed as an int (their stream noise sampler's key): a new seed
    is a new trace."""
    sampler, model = sampler_of(name), model_of("denoiser")
    compiled = torch.compile(lambda: sampler(model, (8, 2), seed=5, device=device), backend=CompileCounter(),
                             fullgraph=True)
    assert torch.equal(compiled(), sampler(model, (8, 2), seed=5, device=device))


def test_k_diffusion_drop_ins_compile_on_a_list_of_levels():
    from diffkern import k_diffusion as K

    sigmas = K.get_sigmas_karras(8, 0.03, 14.6)
    levels, model = sigmas.tolist(), model_of("denoiser")
    x = dk.randn((4, 3), seed=2) * levels[0]
    for sample in (K.sample_dpmpp_2m, K.sample_heun, K.sample_lms):
        run = functools.partial(sample, model, x, disable=True)
        compiled = torch.compile(run, fullgraph=True, backend=CompileCounter())
        assert torch.equal(compiled(levels), run(sigmas))
    with pytest.raises(Exception, match="sigmas is a tensor"):
        torch.compile(lambda: K.sample_euler(model, x, sigmas, disable=True), fullgraph=True)()


@pytest.mark.parametrize("name", ["ddim", "dpmpp", "heun", "pc"])
def test_inductor_compiled_sampler_equals_eager(name, device):
    """Through inductor, as users compile: the fused steps stay the same custom ops, bit for bit."""
    sampler, model = sampler_of(name), model_of(registry.ENTRIES[name].model)
    torch._dynamo.reset()
    compiled = torch.compile(lambda seed: sampler(model, (16, 3), seed=seed, device=device), fullgraph=True)
    for seed in (5, 6):
        same_as_eager(compiled(torch.tensor(seed, device=device)), sampler(model, (16, 3), seed=seed, device=device),
                      registry.ENTRIES[name].model)


def test_guided_and_float64_runs_compile(device):
    """Classifier-free guidance (the doubled batch), a given x_T and float64 tables."""
    sched = dk.DDPMSchedule()
    cond, null = torch.ones(4, 1, device=device), torch.zeros(4, 1, device=device)

    def model(x, t, c):
        return 0.1 * x + 0.01 * c

    def run(x_T):
        return dk.sample_ddim(model, (4, 2), sched, num_inference_steps=5, guidance_scale=3.0, cond=cond,
                              null_cond=null, x_T=x_T, dtype=torch.float64, device=device)

    x_T = dk.randn((4, 2), seed=9, device=device, dtype=torch.float64)
    assert explain(run, x_T) == (1, 0, [])
    assert torch.equal(torch.compile(run, backend=CompileCounter(), fullgraph=True)(x_T), run(x_T))


@pytest.mark.parametrize("schedule", ["sched", "sde"])
def test_dpmpp_on_a_schedule_or_an_sde_compiles(schedule):
    """Objects reach a plan as its own arguments (dynamo hands over the object itself)."""
    if schedule == "sched":
        run = functools.partial(dk.sample_dpmpp, sched=dk.DDPMSchedule(), num_steps=6, eta=1.0)
        model = model_of("epsilon")
    else:
        run = functools.partial(dk.sample_dpmpp, sde=dk.VPSDE(), num_steps=6, order=3)
        model = model_of("score")
    assert explain(lambda: run(model, (4, 2), seed=1)) == (1, 0, [])
    compiled = torch.compile(lambda seed: run(model, (4, 2), seed=seed), backend=CompileCounter(), fullgraph=True)
    assert torch.equal(compiled(torch.tensor(1)), run(model, (4, 2), seed=1))


def test_callbacks_compile_with_breaks_and_give_eager_results():
    """A callback (or a progress bar) may break the graph, only when asked for; the results stay."""
    sampler, model = sampler_of("euler_ancestral"), model_of("denoiser")
    seen = []
    run = lambda: sampler(model, (8, 2), seed=2, callback=lambda info: seen.append(info.i))  # noqa: E731
    eager = run()
    torch._dynamo.reset()
    assert torch.equal(torch.compile(run, backend=CompileCounter())(), eager)
    assert seen == [0, 1, 2, 3] * 2


def test_a_tensor_of_levels_is_refused_while_compiling():
    """Its values could change between calls without a retrace: baking them would be silently wrong."""
    sigmas = dk.karras_sigmas(4, 0.002, 80.0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="sigmas is a tensor: under torch.compile give the levels as a list"):
        torch.compile(lambda: dk.sample_euler(model_of("denoiser"), (4, 2), sigmas), fullgraph=True)()
    levels = sigmas.tolist()
    compiled = torch.compile(lambda: dk.sample_euler(model_of("denoiser"), (4, 2), levels), fullgraph=True,
                             backend=CompileCounter())
    assert torch.equal(compiled(), dk.sample_euler(model_of("denoiser"), (4, 2), sigmas))


def test_a_schedule_made_inside_the_compiled_function_is_refused():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="VPSDE was made inside the compiled function: make it outside"):
        torch.compile(lambda: dk.sample_euler_maruyama(model_of("score"), (4, 2), dk.VPSDE(), 5),
                      fullgraph=True)()


def test_a_bad_seed_tensor_is_refused_by_name():
    sampler = sampler_of("ddim")
    for seed, message in ((torch.tensor([1, 2]), "seed given as a tensor must be a one-element integer tensor"),
                          (torch.tensor(1.0), "seed given as a tensor must be a one-element integer tensor")):
        with pytest.raises(ValueError, match=message):
            sampler(model_of("epsilon"), (4, 2), seed=seed)


# ---- the diffusers drop-ins: set_timesteps, then a compiled loop of step calls ----------------------------

DROP_INS = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "LCMScheduler",
            "FlowMatchEulerDiscreteScheduler"]


def drop_in(name, steps=6, device="cpu"):
    pytest.importorskip("diffusers")
    import diffkern.diffusers as D

    scheduler = getattr(D, name)()
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def step_loop(scheduler):
    """A pipeline's loop: scale_model_input (where the scheduler has it), the model, step."""
    def loop(x):
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(0.1 * model_input, t, x).prev_sample
        return x
    return loop


@pytest.mark.parametrize("name", DROP_INS)
def test_every_drop_in_step_loop_is_one_graph_and_equals_eager(name, device):
    scheduler = drop_in(name, device=device)
    loop = step_loop(scheduler)
    x = dk.randn((2, 4, 8, 8), seed=1, device=device)
    assert explain(loop, x) == (1, 0, [])
    scheduler.set_timesteps(6, device=device)
    eager = loop(x)
    counter = CompileCounter()
    compiled = torch.compile(loop, backend=counter, fullgraph=True)
    for _ in range(2):  # a new run: set_timesteps again, and the same graph
        scheduler.set_timesteps(6, device=device)
        assert torch.equal(compiled(x), eager)
    assert counter.frame_count == 1


def test_a_compiled_drop_in_loop_starts_at_set_begin_index():
    scheduler = drop_in("EulerDiscreteScheduler", steps=8)
    x = dk.randn((2, 3), seed=4)

    def loop(x):
        for t in scheduler.timesteps[3:]:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x).prev_sample
        return x

    scheduler.set_begin_index(3)
    eager = loop(x)
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(3)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(loop, backend=CompileCounter(), fullgraph=True)(x), eager)


def test_a_compiled_drop_in_loop_refuses_a_timestep_out_of_order():
    """Compiled, the steps follow scheduler.timesteps in order; another timestep fails the graph's
    assertion (no host read) rather than stepping with another timestep's coefficients."""
    scheduler = drop_in("DDIMScheduler")
    x = dk.randn((2, 3), seed=4)

    def loop(x):
        for t in scheduler.timesteps.flip(0):
            x = scheduler.step(0.1 * x, t, x).prev_sample
        return x

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="a compiled drop-in step got a timestep other than the schedule's next"):
        torch.compile(loop, fullgraph=True)(x)


def test_two_runs_in_one_compiled_function():
    """The same plan twice in one graph (its tables are inputs of their own, not clashing constants)."""
    sampler, model = sampler_of("heun"), model_of("denoiser")

    def twice(seed):
        return sampler(model, (4, 2), seed=seed), sampler(model, (4, 3), seed=seed)

    compiled = torch.compile(twice, fullgraph=True)
    for got, want in zip(compiled(torch.tensor(3)), twice(3)):
        assert torch.equal(got, want)


# ---- dk.capture: one graph, replayed for any seed ---------------------------------------------------------

def test_capture_replays_any_seed_without_recompiling(device):
    counter = CompileCounter()
    sampler, model = sampler_of("ddim"), model_of("epsilon")  # eta = 0.5: every step draws noise
    sample = dk.capture(sampler, model, (8, 3), device=device, backend=counter)
    for seed in (0, 7, 2 ** 64 - 1):
        assert torch.equal(sample(seed), sampler(model, (8, 3), seed=seed, device=device))
    assert counter.frame_count == 1


def test_capture_of_a_partial_sampler_with_inductor():
    levels = dk.karras_sigmas(6, 0.002, 80.0).tolist()
    sampler, model = functools.partial(dk.sample_dpmpp, sigmas=levels, eta=1.0), model_of("denoiser")
    sample = dk.capture(sampler, model, (4, 2, 3))
    assert torch.equal(sample(11), sampler(model, (4, 2, 3), seed=11))


def test_capture_names_what_cannot_be_one_graph():
    sampler = sampler_of("euler")

    def branching_model(x, sigma):  # a Python branch on a value of the state
        return x / 2 if x.abs().max() > 100 else x / (1 + sigma.reshape(-1, 1) ** 2)

    with pytest.raises(ValueError, match="cannot be captured as one graph: .*[Dd]ata-dependent"):
        dk.capture(sampler, branching_model, (4, 2))(0)
    for name, value in (("callback", print), ("progress", True), ("seed", 3)):
        with pytest.raises(ValueError, match=f"{name}= does not go with capture"):
            dk.capture(sampler, model_of("denoiser"), (4, 2), **{name: value})


@requires_cuda
def test_capture_refuses_a_model_that_syncs_the_gpu():
    """A model that takes a value through host memory traces (the copies are graph ops, and on the CPU
    capture takes it), but a CUDA graph cannot hold the copy to the host: refused, not replayed without
    its graph. (``float(x.max())`` used only in arithmetic is not such a model: torch 2.11 traces it as
    a scalar of the graph, and on an H100 capture took it without an error.)"""
    def host_model(x, sigma):
        scale = x.abs().max().to("cpu")
        return x / (1 + scale.to(x.device))

    assert dk.capture(sampler_of("euler"), host_model, (4, 2))(0).shape == (4, 2)
    with pytest.raises(ValueError, match="cannot be captured as one graph"):
        dk.capture(sampler_of("euler"), host_model, (4, 2), device="cuda")(0)


@requires_cuda
def test_capture_records_a_cuda_graph_and_replays_new_seeds():
    counters = torch._dynamo.utils.counters
    skips = counters["inductor"]["cudagraph_skips"]
    sampler, model = sampler_of("dpmpp"), model_of("denoiser")
    sample = dk.capture(sampler, model, (16, 4), device="cuda")
    for seed in (1, 2, 3):
        same_as_eager(sample(seed), sampler(model, (16, 4), seed=seed, device="cuda"), "denoiser")
    assert counters["inductor"]["cudagraph_skips"] == skips


def test_capture_refuses_bad_arguments_by_name():
    sampler, model = sampler_of("ddim"), model_of("epsilon")
    for kwargs, message in (({"sampler": 3}, "sampler must be callable"), ({"model": None}, "model must be callable"),
                            ({"shape": (4, -1)}, "shape"), ({"dtype": torch.int64}, "dtype must be"),
                            ({"sample_offset": -1}, "sample_offset"), ({"mode": "fast"}, "mode")):
        arguments = dict(sampler=sampler, model=model, shape=(4, 2))
        arguments.update(kwargs)
        with pytest.raises(ValueError, match=message):
            dk.capture(arguments.pop("sampler"), arguments.pop("model"), arguments.pop("shape"), **arguments)
    with pytest.raises(ValueError, match="seed"):
        dk.capture(sampler, model, (4, 2))(-1)
