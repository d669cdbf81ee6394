"""The shipped digits models (diffkern.training.pretrained), the ConvUNet they are, the sampler table
(diffkern.training.sampler_table) and the digits' command-line surfaces (generate / evaluate / demo
--data digits)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import diffkern as dk
from diffkern import sampler_table
from diffkern.training import ConvUNet, cnf_report, pretrained
from diffkern.training.data import DIGITS_LEVELS, digits


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffkern", *args], capture_output=True, text=True, timeout=timeout)


# ---- ConvUNet -------------------------------------------------------------------------------------------

def test_conv_unet_shapes_and_time():
    torch.manual_seed(0)
    net = ConvUNet((1, 8, 8), (16, 32), norm_num_groups=8)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.tensor([1.0, 500.0, 999.0]))
    assert out.shape == x.shape
    # the time reaches the output (a network blind to it could not denoise), and per sample
    assert not torch.allclose(net(x, torch.full((3,), 1.0)), net(x, torch.full((3,), 900.0)))
    torch.testing.assert_close(net(x[1:2], torch.tensor([500.0])), out[1:2], rtol=1e-5, atol=1e-6)
    assert ConvUNet((3, 8, 12), (8, 16, 16), extra_channels=1)(torch.randn(2, 3, 8, 12), 0.5).shape == (2, 4, 8, 12)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sample_shape=(64,)), "takes images"),
    (dict(sample_shape=(1, 6, 6), block_out_channels=(8, 16, 16)), "divisible by 4"),
    (dict(sample_shape=(1, 8, 8), block_out_channels=(12, 16)), "norm_num_groups=8 divides"),
    (dict(sample_shape=(1, 8, 8), embedding=7), "embedding must be an even"),
])
def test_conv_unet_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvUNet(**kwargs)


def test_convunet_trains_with_the_train_command(tmp_path):
    config = dk.training.TrainConfig(data="digits", objective="ddpm", model="convunet",
                                     model_kwargs={"block_out_channels": [8, 16]}, steps=3, batch_size=16)
    summary = dk.training.train(config, str(tmp_path), progress=False)
    assert math.isfinite(summary["final_loss"])
    model = dk.training.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert model.diffkern_trained["kind"] == "epsilon"
    assert dk.sample_ddim(model, (2, 1, 8, 8), num_inference_steps=2).shape == (2, 1, 8, 8)


# ---- the shipped models -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", pretrained.PRETRAINED)
def test_shipped_model_reproduces_its_recorded_metrics(name):
    """Loading checks the sha256; the recorded sampler run on the same seed gives the recorded scores.
    Tolerances: the same samples up to float rounding of the convolutions on another CPU (instruction set,
    thread count), which moves 500 samples' scores by far less than 3% FD / 0.01 coverage / 0.02 in
    precision and recall (a different seed moves FD by about 10% and precision by 0.03)."""
    entry = pretrained.manifest()[name]
    assert entry["bytes"] < 3e6 and entry["sha256"] == pretrained._sha256(pretrained.path_of(name))
    recorded = entry["recorded"]
    model = pretrained.load_pretrained(name)
    again = pretrained.recorded_metrics(model, name)
    assert again["sampler"] == recorded["sampler"]
    assert abs(again["fd"] - recorded["fd"]) <= 0.03 * recorded["fd"]
    assert abs(again["coverage_tv"] - recorded["coverage_tv"]) <= 0.01
    for key in ("precision", "recall"):
        assert abs(again[key] - recorded[key]) <= 0.02, key
    # and the recorded scores are those of a trained model: a few times real digits' floor (10.3), two
    # orders below noise's (about 1100), every class present
    assert recorded["fd"] < 40 and recorded["coverage_tv"] < 0.15 and recorded["precision"] > 0.6


def test_shipped_file_is_checked(tmp_path, monkeypatch):
    shutil.copy(pretrained.MANIFEST, tmp_path / "manifest.json")
    with open(pretrained.path_of("digits-flow"), "rb") as f:
        data = bytearray(f.read())
    data[-100] ^= 1
    (tmp_path / "digits-flow.pt").write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(pretrained, "MANIFEST", str(tmp_path / "manifest.json"))
    with pytest.raises(ValueError, match="not the manifest's"):
        pretrained.load_pretrained("digits-flow")
    with pytest.raises(ValueError, match="is not in this installation"):
        pretrained.load_pretrained("digits-vp")
    with pytest.raises(ValueError, match="name must be one of"):
        pretrained.load_pretrained("digits-gan")


def test_recorded_command_is_the_configuration():
    for name in pretrained.PRETRAINED:
        state = torch.load(pretrained.path_of(name), map_location="cpu", weights_only=False)
        config = dk.training.TrainConfig(**state["config"])
        assert state["command"] == pretrained.command_of(config) == pretrained.manifest()[name]["command"]
        assert config.model == "convunet" and config.data == "digits"
        assert "--data digits" in state["command"] and f"--steps {config.steps}" in state["command"]
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "train_digit_models.sh")) as f:
        script = f.read()
    assert "--model convunet" in script and "export_digit_models.py" in script


def test_denoiser_of_the_ddpm_model():
    wrapped, sigma_min, sigma_max = pretrained.denoiser("digits-ddpm")
    schedule = dk.DDPMSchedule()
    abar = schedule.alphas_cumprod.to(torch.float64)
    assert sigma_min == pytest.approx(float(((1 - abar[0]) / abar[0]).sqrt()))
    assert sigma_max == pytest.approx(float(((1 - abar[-1]) / abar[-1]).sqrt()))
    # D(x, sigma) at a level of the schedule is x - sigma eps(x / sqrt(1 + sigma^2), t)
    model = pretrained.load_pretrained("digits-ddpm")
    x = dk.randn((4, 1, 8, 8), seed=1) * 3
    t = 321
    sigma = float(((1 - abar[t]) / abar[t]).sqrt())
    expected = x - sigma * model(x / math.sqrt(1 + sigma ** 2), torch.full((4,), float(t)))
    torch.testing.assert_close(wrapped(x, torch.full((4,), sigma)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a DDPM epsilon model"):
        pretrained.denoiser("digits-flow")


# ---- the sampler table --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def context():
    return sampler_table.models()


def test_every_table_sampler_spends_its_budget(context):
    """Counted model calls equal the budget for every sampler (EDM's and flow's Heun: 2 n - 1 calls;
    predictor-corrector and the Heun ODE: 2 per step), on 8 samples; and the registry's model_calls counts
    the same."""
    jobs = sampler_table.plan(evals=(10,)) + [("predictor-corrector (VP)", 50)]
    assert {name for name, _ in jobs} == set(sampler_table.samplers()) - {"probability-flow ODE, dopri5"}
    rows = sampler_table.run(jobs, samples=8, progress=False, context=context)
    for (name, budget), row in zip(jobs, rows):
        assert row.evals == budget, name
        assert math.isfinite(row.fd), name
    from diffkern.sampling import registry

    for name, options in [("flow", {"solver": "heun"}), ("flow", {"solver": "euler"}), ("ode", {"solver": "heun"}),
                          ("heun", {}), ("pc", {}), ("ddim", {})]:
        sampler = registry.make_sampler(name, steps=25, **options)
        model = sampler_table.Counted(context["flow" if name == "flow" else "denoiser" if name == "heun" else "vp"
                                              if name in ("ode", "pc") else "ddpm"])
        sampler(model, (2, 1, 8, 8))
        assert model.calls == sampler.model_calls(), (name, options)
    # dopri5 spends more at a tighter tolerance
    loose, tight = sampler_table.run([("probability-flow ODE, dopri5", 0), ("probability-flow ODE, dopri5", 3)],
                                     samples=8, progress=False, context=context)
    assert 0 < loose.evals < tight.evals


def test_table_bad_names():
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_table.plan(names=["DDIM", "DDIMM"])
    with pytest.raises(ValueError, match="evals must be an int >= 1"):
        sampler_table.plan(evals=(0,))
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        sampler_table.run([("DDIM", 5)], samples=0, context={})


# ---- the command line ---------------------------------------------------------------------------------

def test_generate_digits_scores_its_samples(tmp_path):
    result = run_cli("generate", "--model", "diffkern.training.pretrained:load_pretrained", "--model-kwargs",
                     '{"name": "digits-ddpm"}', "--sampler", "ddim", "--steps", "10", "--num-samples", "200",
                     "--data", "digits", "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "digit_metrics.json").read_text())
    assert "digits-FD" in result.stdout and scores["fd"] < 60 and scores["coverage_tv"] < 0.2


def test_evaluate_digits_is_the_dequantized_test_split(tmp_path):
    result = run_cli("evaluate", "--model", "diffkern.training.pretrained:load_pretrained", "--model-kwargs",
                     '{"name": "digits-vp"}', "--data", "digits", "--steps", "3", "--solver", "euler",
                     "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    import numpy as np

    with np.load(tmp_path / "likelihood.npz") as f:
        bits = torch.from_numpy(f["bits_per_dim"])
    width = 2 / DIGITS_LEVELS
    direct = dk.log_likelihood(pretrained.load_pretrained("digits-vp"), cnf_report.dequantized(digits("test"), width),
                               dk.VPSDE(), 3, solver="euler", bits_offset=math.log2(1 / width))
    assert bits.shape == (300,)
    torch.testing.assert_close(bits, direct.bits_per_dim.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "m:m", "--sampler", "ddim", "--num-samples", "4", "--data", "ring", "--out", "x"],
     "only digits has one"),
    (["generate", "--model", "m:m", "--sampler", "ddim", "--num-samples", "4", "--data", "digits", "--shape", "3,8,8",
      "--out", "x"], "not the digits' 1,8,8"),
    (["generate", "--model", "m:m", "--sampler", "ddim", "--num-samples", "4", "--out", "x"], "--shape is required"),
    (["evaluate", "--model", "m:m", "--data", "digitz", "--out", "x"], "built-in: digits"),
    (["train", "--data", "digitz", "--out", "x"], "digits"),
    (["demo", "--data", "cifar"], "--data must be one of all, mixtures, digits"),
])
def test_digits_bad_data(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_demo_digits_quick(tmp_path):
    result = run_cli("demo", "--data", "digits", "--quick", "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "demo.json").read_text())["digits"]
    assert [r["sampler"] for r in report["samplers"]] == [name for name, _ in
                                                          __import__("diffkern.demo_digits").demo_digits.QUICK_PLAN]
    for r in report["samplers"]:
        assert r["fd"] < 80 and r["coverage_tv"] < 0.25, r
    assert 1.5 < report["likelihood"]["bits_per_dim"] < 4.0
    assert (tmp_path / "digits.png").stat().st_size > 10_000
    assert "digits-FD" in result.stdout and "bits/dim of the VP model" in result.stdout


def test_demo_digits_skips_what_needs_a_missing_package(tmp_path, monkeypatch, capsys):
    """The demo installs with matplotlib alone: the UniPC drop-in needs diffusers, and without it the
    digits part says so and runs the rest."""
    from diffkern import demo_digits

    real = sampler_table.available
    monkeypatch.setattr(sampler_table, "available", lambda name: name != "UniPC (drop-in)" and real(name))
    monkeypatch.setattr(demo_digits, "QUICK_PLAN", [("UniPC (drop-in)", 5), ("DDIM", 5)])
    monkeypatch.setattr(demo_digits, "QUICK_LIKELIHOOD_IMAGES", 4)
    report = demo_digits.run(str(tmp_path), 16, 0, True, False)
    assert [r["sampler"] for r in report["samplers"]] == ["DDIM"]
    assert "UniPC (drop-in) needs diffusers, which is not installed" in capsys.readouterr().out
    assert sampler_table.samplers()["UniPC (drop-in)"].needs == "diffusers"

