"""The sampler registry: every entry runs on the built-in exact mixture through the Python API (and
recovers it at its default steps) and through the command line (bitwise the same samples), its
options are checked and recorded, and what it declares matches what it does."""
import inspect

import numpy as np
import pytest
import torch

import diffkern as dk
from diffkern import cli
from diffkern.demo import mode_statistics
from diffkern.models import MIXTURE_OUTPUTS, GaussianMixture, mixture_model
from diffkern.sampling import registry

RING = GaussianMixture.ring()
NAMES = list(registry.SAMPLERS)


def test_every_entry_is_complete():
    k_names = {"k_euler", "k_euler_ancestral", "k_heun", "k_dpm_2", "k_dpm_2_ancestral", "k_lms",
               "k_dpmpp_2s_ancestral", "k_dpmpp_sde", "k_dpmpp_2m", "k_dpmpp_2m_sde", "k_dpmpp_3m_sde"}
    assert set(NAMES) == {"ddpm", "ddim", "euler_maruyama", "ode", "pc", "euler", "heun", "euler_ancestral",
                          "langevin", "dpmpp", "flow", "pfgm"} | k_names
    for name, entry in registry.ENTRIES.items():
        assert entry.name == name and entry.model in registry.MODELS and entry.model in MIXTURE_OUTPUTS
        module = dk.k_diffusion if name.startswith("k_") else dk  # a public sampler
        assert entry.function is getattr(module, entry.function.__name__), name
        assert set(entry.options) <= set(registry.OPTIONS), name
        assert isinstance(entry.default_steps, int) and entry.default_steps >= 1, name
        # every option an entry reads is a keyword of its function or a schedule option it builds from
        parameters = inspect.signature(entry.function).parameters
        for option in entry.options:
            assert option in parameters or option in ("sde", "sigma_min", "sigma_max", "langevin_steps"), (name, option)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_entry_recovers_the_mixture_at_its_defaults(name):
    sampler = registry.make_sampler(name)
    model = mixture_model(output=sampler.entry.model)
    calls = []

    def counted(*args):
        calls.append(1)
        return model(*args)

    x = sampler(counted, (512, 2), seed=5)
    assert x.shape == (512, 2) and bool(torch.isfinite(x).all())
    covered, tv = mode_statistics(RING, x)
    assert covered == 8 and tv < 0.1, (name, covered, tv)
    assert len(calls) == sampler.model_calls(), name


@pytest.mark.parametrize("name", NAMES)
def test_the_command_line_runs_every_entry_as_the_python_api(name, tmp_path):
    entry = registry.ENTRIES[name]
    steps = 25 if name == "pc" else 3  # score_sde's VP discretisation needs more steps than beta_max
    batch = 4 if entry.batch_invariant else 6  # pc's corrector reads the batch's mean norms
    code = cli.main(["generate", "--model", "diffkern.models:mixture_model", "--model-kwargs",
                     f'{{"output": "{entry.model}"}}', "--sampler", name, "--steps", str(steps), "--num-samples", "6",
                     "--shape", "2", "--batch-size", str(batch), "--seed", "2", "--no-progress", "--device", "cpu",
                     "--out", str(tmp_path)])
    assert code == 0
    with np.load(tmp_path / "samples.npz") as f:
        from_cli = f["samples"]
    direct = registry.make_sampler(name, steps=steps)(mixture_model(output=entry.model), (6, 2), seed=2)
    assert np.array_equal(from_cli, direct.numpy()), name


def test_options_are_checked_and_recorded():
    sampler = registry.make_sampler("ddim", steps=7, eta=0.5)
    assert sampler.config() == {"sampler": "ddim", "steps": 7, "options": {"eta": 0.5, "prediction_type": "epsilon"}}
    assert registry.make_sampler("ddpm").config()["steps"] == 1000  # the default, not None
    for kwargs, match in [(dict(eta=0.5), "eta does not apply to the ddpm sampler"),
                          (dict(order=4), "order"), (dict(frobnicate=1), "unknown option"),
                          (dict(steps=0), "steps"), (dict(steps=2.0), "steps")]:
        name = "dpmpp" if "order" in kwargs else "ddpm"
        with pytest.raises(ValueError, match=match):
            registry.make_sampler(name, **kwargs)
    with pytest.raises(ValueError, match="solver"):
        registry.make_sampler("flow", solver="dopri5")
    with pytest.raises(ValueError, match="sigma_min goes with sde='ve'"):
        registry.make_sampler("ode", sigma_min=0.1)
    with pytest.raises(ValueError, match="smaller than sigma_max"):
        registry.make_sampler("heun", sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        registry.make_sampler("nope")


def test_only_pc_depends_on_the_batch(tmp_path):
    assert [n for n, e in registry.ENTRIES.items() if not e.batch_invariant] == ["pc"]
    score = mixture_model(output="score")
    sampler = registry.make_sampler("pc", steps=25)
    whole = sampler(score, (6, 2), seed=1)
    halves = torch.cat([sampler(score, (3, 2), seed=1), sampler(score, (3, 2), seed=1, sample_offset=3)])
    assert not torch.equal(whole, halves)  # why the batch size is part of a pc run's configuration
    from diffkern import distributed
    kwargs = dict(sampler=sampler, num_samples=6, shape=(2,), seed=1, out=str(tmp_path), progress=False)
    distributed.generate(score, batch_size=6, **kwargs)
    with pytest.raises(ValueError, match="another configuration"):
        distributed.generate(score, batch_size=3, **kwargs)


def test_pc_refuses_too_few_steps_for_its_vp_discretisation():
    with pytest.raises(ValueError, match="too few"):
        dk.sample_pc(mixture_model(output="score"), (4, 2), dk.VPSDE(), 20)


def test_the_probe_names_a_model_that_does_not_fit():
    sampler = registry.make_sampler("ddim")
    sampler.probe(mixture_model(), (2,))
    with pytest.raises(ValueError, match=r"fails on samples of shape \(3,\)"):
        sampler.probe(mixture_model(), (3,))
    with pytest.raises(ValueError, match="returned shape"):
        sampler.probe(lambda x, t: x[:, :1], (2,))


def test_the_help_lists_every_sampler_and_who_reads_each_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in NAMES:
        assert name in text
    assert "(ddim, dpmpp: default 0.0; k_euler_ancestral," in text  # --eta, each sampler's own default
    assert "k_dpmpp_3m_sde: default 1.0)" in text


@pytest.mark.parametrize("name", NAMES)
def test_one_callback_record_for_every_sampler(name):
    """Every sampler calls callback(info) once per step with the same fields: the step index, the level
    before the step (named), the state after it and the x0 estimate made before it; the last state is
    what the sampler returns, and the last x0 estimate is close to it (the mixture's scale is 4)."""
    sampler = registry.make_sampler(name, steps={"pc": 25, "pfgm": 30, "euler_maruyama": 50, "ddpm": 50}.get(name, 8))
    seen = []
    x = sampler(mixture_model(output=sampler.entry.model), (64, 2), seed=3, dtype=torch.float64,
                callback=seen.append)
    assert [info.i for info in seen] == list(range(len(seen))) and len(seen) >= 5
    names = {info.level_name for info in seen}
    assert len(names) == 1 and names <= {"timestep", "t", "sigma", "z"}
    for info in seen:
        assert info.x.shape == x.shape and info.denoised.shape == x.shape and bool(torch.isfinite(info.denoised).all())
        assert info[info.level_name] == info.level and info["x"] is info.x and info["denoised"] is info.denoised
    levels = [info.level for info in seen]
    if name == "pfgm":  # z runs down too, from z_max
        assert levels[0] == pytest.approx(40.0)
    assert all(a > b for a, b in zip(levels, levels[1:])) and all(i.level_next < i.level for i in seen)
    if name != "langevin":  # Langevin's returned x has one more (denoising) step after its last level
        assert torch.equal(seen[-1].x, x)
    assert (seen[-1].denoised - x).abs().mean() < 0.3, name


def test_positional_callbacks_still_work_with_a_warning():
    seen = []
    with pytest.warns(FutureWarning, match="StepInfo"):
        dk.sample_ddim(mixture_model(), (4, 2), num_inference_steps=3, callback=lambda i, t, x, x0: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == dk.DDPMSchedule().timesteps(3)[0]
    with pytest.raises(ValueError, match="callback must be callable"):
        dk.sample_ddim(mixture_model(), (4, 2), num_inference_steps=3, callback=3)
