"""The fused step op (torch.ops.diffkern.fused_step): kernels vs the reference, every option and
dtype, every CPU instruction set bitwise, layouts, per-sample rows, noise, opcheck, compile."""

import pytest
import torch
from common import DTYPES, TOLERANCES, cpu_isas, requires_cuda

import diffkern as dk
from diffkern import coefficients, ops, reference

SHAPE = (5, 3, 7, 3)  # 63 features per sample: not a multiple of 4, 8 or 16


def realistic_rows():
    """DDPM/DDIM rows at a few timesteps, plus random rows, with a clip range and guidance weight."""
    sched = dk.DDPMSchedule()
    t = torch.tensor([999, 500, 10, 1, 0])
    abar, abar_prev = sched.alphas_cumprod_at(t), sched.alphas_cumprod_at(t - 1)
    table = torch.cat([
        coefficients.ddpm_rows(abar, abar_prev, prediction_type="epsilon", clip_range=(-1.5, 1.2),
                               guidance_scale=3.0, classifier_scale=0.7),
        coefficients.ddpm_rows(abar, abar_prev, prediction_type="v_prediction", variance_type="learned_range",
                               clip_range=(-1.5, 1.2), guidance_scale=2.0),
        coefficients.ddim_rows(abar, abar_prev, eta=0.5, prediction_type="sample", guidance_scale=0.5,
                               classifier_scale=1.0, clip_range=(-2.0, 2.0)),
    ])
    generic = torch.randn(3, len(coefficients.FIELDS), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    generic[:, coefficients.INDEX["clip_lo"]], generic[:, coefficients.INDEX["clip_hi"]] = -0.5, 0.7
    generic[:, coefficients.INDEX["sigma"]] = generic[:, coefficients.INDEX["sigma"]].abs()
    generic[:, coefficients.INDEX["var_alpha"]] = -1.0
    generic[:, coefficients.INDEX["var_beta"]] = 0.5
    return torch.cat([table, generic])


ROWS = realistic_rows()
VARIANTS = {
    "plain": {},
    "guided": {"model_output_uncond"},
    "classifier": {"guidance_grad"},
    "learned": {"predicted_variance"},
    "all": {"model_output_uncond", "guidance_grad", "predicted_variance"},
}


def make_inputs(variant, dtype, device, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(lo=None):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if lo is not None:
            t = t.tanh()
        return t.to(dtype=dtype, device=device)

    kwargs = {"model_output": rand()}
    for name in VARIANTS[variant]:
        kwargs[name] = rand(lo=-1) if name == "predicted_variance" else rand()
    return rand(), kwargs


def table_for(dtype, device):
    return ROWS.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


def per_sample_rows(batch, device):
    return (torch.arange(batch) * 7 % len(ROWS)).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("noise", ["none", "tensor", "stream"])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(device, dtype, variant, noise, clip):
    x, kwargs = make_inputs(variant, dtype, device)
    if noise == "tensor":
        kwargs["noise"] = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).to(dtype=dtype, device=device)
    aux = ["none", "x0", "noise"][(len(variant) + len(noise)) % 3]
    common = dict(coefficients=table_for(dtype, device), rows=per_sample_rows(SHAPE[0], device), clip=clip, aux=aux,
                  stream_noise=noise == "stream", seed=11, step=4, sample_offset=2, stream=1)
    out, aux_out = ops.fused_step(x, **kwargs, **common)
    if noise == "stream":  # the reference's normals are float64 Box-Muller; give it the kernels' own
        z = dk.randn(SHAPE, seed=11, step=4, sample_offset=2, stream=1, device=device, dtype=torch.float64)
        sigma_on = table_for(torch.float64, device)[common["rows"], coefficients.INDEX["sigma"]] != 0
        kwargs["noise"] = (z * sigma_on.reshape(-1, 1, 1, 1)).to(dtype)
        common["stream_noise"] = False
    ref, ref_aux = reference.fused_step(x, **kwargs, **common)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    if aux == "none":
        assert aux_out is None
    elif aux == "noise" and noise == "stream" and dtype in (torch.float32, torch.float64):
        assert torch.equal(aux_out, kwargs["noise"])
    else:
        torch.testing.assert_close(aux_out, ref_aux, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("shape", [(3, 1), (4, 5), (2, 3, 37), (9, 2, 16, 16), (1, 513), (17,)])
def test_cpu_instruction_sets_agree_bitwise(dtype, variant, shape):
    x, kwargs = make_inputs(variant, dtype, "cpu", shape=shape)
    table = table_for(dtype, "cpu")
    rows = per_sample_rows(shape[0], "cpu")
    results = []
    for isa in cpu_isas():  # "scalar" runs the CUDA thread body index by index
        results.append(torch.ops.diffkern._fused_step_cpu_isa(
            x, kwargs["model_output"], kwargs.get("model_output_uncond"), kwargs.get("guidance_grad"),
            kwargs.get("predicted_variance"), None, table, rows, 0, True, 1, True, 5, 6, 7, 2, None, isa))
    for out, aux in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(aux, results[0][1])


def _fused_step_on_every_isa(x, kwargs, table, rows, row, aux, noise=None, stream_noise=True):
    """(out, aux) of the op on each CPU instruction set ("scalar" is the CUDA thread body)."""
    return {isa: torch.ops.diffkern._fused_step_cpu_isa(
        x, kwargs["model_output"], kwargs.get("model_output_uncond"), kwargs.get("guidance_grad"),
        kwargs.get("predicted_variance"), noise, table, rows, row, True, aux, stream_noise, 5, 6, 7, 2, None, isa)
        for isa in cpu_isas()}


# Small samples are processed many per SIMD group (the CPU vectorises across samples); these sizes
# take each of its paths: samples of 1-3 features (one Philox block each, part used), multiples of
# 4 (blocks across samples), others (row tails), around a work item (512 elements) and the lanes.
FEATURE_COUNTS = [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 63, 64, 65, 511, 513]


@pytest.mark.parametrize("features", FEATURE_COUNTS)
@pytest.mark.parametrize("batch", [1, 37, 1029])
@pytest.mark.parametrize("rows_kind", ["one", "per_sample", "runs"])
def test_cpu_instruction_sets_agree_bitwise_for_every_feature_count(features, batch, rows_kind):
    """One row for all, a different row per sample (some with sigma = 0: no noise), or runs of
    samples sharing a row; in-kernel noise and the noise as auxiliary output."""
    x, kwargs = make_inputs("all", torch.float32, "cpu", shape=(batch, features))
    table = table_for(torch.float32, "cpu")
    rows, row = None, 3
    if rows_kind == "per_sample":
        rows = per_sample_rows(batch, "cpu")
    elif rows_kind == "runs":
        rows = (torch.arange(batch) // 5 % len(ROWS)).contiguous()
    results = _fused_step_on_every_isa(x, kwargs, table, rows, row, aux=2)
    for isa, (out, aux) in results.items():
        assert torch.equal(out, results["scalar"][0]), f"{isa} differs from the scalar path"
        assert torch.equal(aux, results["scalar"][1]), f"{isa}: noise differs from the scalar path"
    sigma = table[rows if rows is not None else row, coefficients.INDEX["sigma"]].reshape(-1, 1)
    expected_noise = dk.randn((batch, features), seed=5, step=6, sample_offset=7, stream=2) * (sigma != 0)
    assert torch.equal(results["scalar"][1], expected_noise.expand(batch, features))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", [1, 3, 8, 17])
@pytest.mark.parametrize("aux", [1, 2])
def test_cpu_small_samples_every_dtype_and_strided_samples(dtype, features, aux):
    """Samples that are views into wider rows (the row stride is not the sample size) are gathered;
    half types are converted; the results stay bitwise those of the CUDA thread body."""
    batch = 531
    wide_x, wide = make_inputs("all", dtype, "cpu", shape=(batch, 2 * features))
    x = wide_x[:, features:]
    kwargs = {name: t[:, :features] for name, t in wide.items()}
    noise = torch.randn(batch, features, generator=torch.Generator().manual_seed(2)).to(dtype)[:, :]
    for stream_noise, given in ((True, None), (False, noise), (False, None)):
        results = _fused_step_on_every_isa(x, kwargs, table_for(dtype, "cpu"), per_sample_rows(batch, "cpu"), 0, aux,
                                           noise=given, stream_noise=stream_noise)
        for isa, (out, aux_out) in results.items():
            assert torch.equal(out, results["scalar"][0]) and torch.equal(aux_out, results["scalar"][1]), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stream_noise_is_the_randn_stream(device, dtype):
    """In-kernel noise is exactly dk.randn(x.shape, seed, step, sample_offset, stream)."""
    x, kwargs = make_inputs("all", dtype, device)
    common = dict(coefficients=table_for(dtype, device), rows=per_sample_rows(SHAPE[0], device), clip=True, aux="x0")
    stream_out = ops.fused_step(x, **kwargs, **common, stream_noise=True, seed=8, step=3, sample_offset=5, stream=2)
    sigma_on = table_for(torch.float64, device)[common["rows"], coefficients.INDEX["sigma"]] != 0
    z = dk.randn(SHAPE, seed=8, step=3, sample_offset=5, stream=2, device=device, dtype=dtype)
    given = ops.fused_step(x, **kwargs, **common, noise=z * sigma_on.reshape(-1, 1, 1, 1).to(dtype))
    assert torch.equal(stream_out[0], given[0]) and torch.equal(stream_out[1], given[1])


def test_batch_split_invariance(device):
    x, kwargs = make_inputs("plain", torch.float32, device, shape=(16, 3, 5, 5))
    common = dict(coefficients=table_for(torch.float32, device), row=1, stream_noise=True, seed=4, step=9)
    whole = ops.fused_step(x, **kwargs, **common)[0]
    first = ops.fused_step(x[:8], model_output=kwargs["model_output"][:8], **common)[0]
    rest = ops.fused_step(x[8:], model_output=kwargs["model_output"][8:], **common, sample_offset=8)[0]
    assert torch.equal(torch.cat([first, rest]), whole)


def test_row_selection():
    """rows [B], rows [1], row k and row -1 (row n for sample n) pick the same coefficients."""
    x, kwargs = make_inputs("plain", torch.float32, "cpu")
    table = table_for(torch.float32, "cpu")
    rows = per_sample_rows(SHAPE[0], "cpu")
    by_rows = ops.fused_step(x, **kwargs, coefficients=table, rows=rows)[0]
    by_table = ops.fused_step(x, **kwargs, coefficients=table[rows].contiguous(), row=-1)[0]
    assert torch.equal(by_rows, by_table)
    one = ops.fused_step(x, **kwargs, coefficients=table, rows=torch.tensor([3]))[0]
    assert torch.equal(one, ops.fused_step(x, **kwargs, coefficients=table, row=3)[0])


def test_layouts_give_the_same_result():
    """Strided samples (views of a wider tensor), non-contiguous and channels_last inputs."""
    x, kwargs = make_inputs("all", torch.float32, "cpu", shape=(4, 6, 5, 5))
    table = table_for(torch.float32, "cpu")
    common = dict(coefficients=table, row=4, clip=True, aux="x0", stream_noise=True, seed=1, step=2)
    expected, expected_x0 = ops.fused_step(x, **kwargs, **common)
    # model outputs as views of a [B, 2C, ...] tensor (the learned-variance layout): no copy needed
    wide = torch.cat([kwargs["model_output"], kwargs["predicted_variance"]], dim=1)
    views = dict(kwargs, model_output=wide[:, :6], predicted_variance=wide[:, 6:])
    assert torch.equal(ops.fused_step(x, **views, **common)[0], expected)
    # non-contiguous within samples: copied
    transposed = {k: v.transpose(2, 3).contiguous().transpose(2, 3) for k, v in kwargs.items()}
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(ops.fused_step(xt, **transposed, **common)[0], expected)
    # channels_last: same values, and the outputs keep the memory format
    cl = {k: v.contiguous(memory_format=torch.channels_last) for k, v in kwargs.items()}
    out, x0 = ops.fused_step(x.contiguous(memory_format=torch.channels_last), **cl, **common)
    assert out.is_contiguous(memory_format=torch.channels_last) and x0.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected) and torch.equal(x0, expected_x0)


@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0), (0,), ()])
def test_empty_and_scalar(device, shape):
    x, kwargs = make_inputs("plain", torch.float32, device, shape=shape)
    out, _ = ops.fused_step(x, **kwargs, coefficients=table_for(torch.float32, device), row=2, aux="x0",
                             stream_noise=True)
    ref, _ = reference.fused_step(x, **kwargs, coefficients=table_for(torch.float32, device), row=2, aux="x0",
                                       noise=dk.randn(shape, device=device))
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32])


def test_opcheck():
    x, kwargs = make_inputs("all", torch.float32, "cpu", shape=(3, 2, 5))
    table = table_for(torch.float32, "cpu")
    op = torch.ops.diffkern.fused_step.default
    torch.library.opcheck(op, (x, kwargs["model_output"], kwargs["model_output_uncond"], kwargs["guidance_grad"],
                               kwargs["predicted_variance"], None, table, torch.tensor([0, 3, 7]), 0, True, 1, True,
                               1, 2, 3, 4, None))
    torch.library.opcheck(op, (x, kwargs["model_output"], None, None, None, torch.randn(3, 2, 5), table, None, 5,
                               False, 0, False, 0, 0, 0, 0, None))
    torch.library.opcheck(op, (x, None, None, None, None, None, table, None, 1, False, 2, True, 0, 0, 0, 0,
                               torch.tensor([3, 4])))


def test_torch_compile_fullgraph_ddpm_step():
    sched = dk.DDPMSchedule()
    x = torch.randn(4, 3, 8, 8)
    m = torch.randn(4, 3, 8, 8)

    def step(x, m):
        return dk.ddpm_step(m, 500, x, sched, seed=1, clip_sample=True)

    step(x, m)  # builds and caches the coefficient table
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(x, m), step(x, m))


@pytest.mark.parametrize("change,error,match", [
    (dict(model_output=torch.zeros(5, 3)), ValueError, "shape"),
    (dict(model_output=torch.zeros(SHAPE, dtype=torch.float64)), ValueError, "float64"),
    (dict(model_output=torch.zeros(SHAPE, device="meta")), ValueError, "meta"),
    (dict(model_output=None, model_output_uncond=torch.zeros(SHAPE)), ValueError, "needs model_output"),
    (dict(coefficients=torch.zeros(3, 13, dtype=torch.float64)), ValueError, "coefficients"),
    (dict(coefficients=torch.zeros(3, 12)), RuntimeError, "coefficients"),
    (dict(row=99), RuntimeError, "outside the table"),
    (dict(rows=torch.tensor([0, 1, 99, 0, 0])), RuntimeError, "outside the table"),
    (dict(rows=torch.tensor([0, 1])), RuntimeError, "rows"),
    (dict(row=-1), RuntimeError, "one row per sample"),
    (dict(aux="x1"), ValueError, "aux"),
    (dict(step=-1), ValueError, "step"),
])
def test_bad_inputs(change, error, match):
    x = torch.zeros(SHAPE)
    kwargs = dict(model_output=torch.zeros(SHAPE), coefficients=table_for(torch.float32, "cpu"), row=0)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        ops.fused_step(x, **kwargs)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_equals_cpu_bitwise(dtype, variant):
    """The same formula and the same normals: CUDA and CPU give identical bits (float64 aside,
    whose learned-variance exp is each platform's)."""
    x, kwargs = make_inputs(variant, dtype, "cpu", shape=(6, 3, 33, 5))
    common = dict(rows=per_sample_rows(6, "cpu"), clip=True, aux="x0", stream_noise=True, seed=3, step=1)
    cpu = ops.fused_step(x, **kwargs, coefficients=table_for(dtype, "cpu"), **common)
    cuda_kwargs = {k: v.cuda() for k, v in kwargs.items()}
    cuda = ops.fused_step(x.cuda(), **cuda_kwargs, coefficients=table_for(dtype, "cuda"),
                          **dict(common, rows=common["rows"].cuda()))
    if dtype == torch.float64 and variant in ("learned", "all"):
        torch.testing.assert_close(cuda[0].cpu(), cpu[0], **TOLERANCES[dtype])
    else:
        assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])


def test_out_variant_writes_the_same_numbers(device):
    x, kwargs = make_inputs("all", torch.float32, device)
    common = dict(coefficients=table_for(torch.float32, device), rows=per_sample_rows(SHAPE[0], device), clip=True,
                  aux="x0", stream_noise=True, seed=2, step=5)
    expected, expected_x0 = ops.fused_step(x, **kwargs, **common)
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    returned = ops.fused_step(x, **kwargs, **common, out=out, aux_out=x0)
    assert returned[0] is out and returned[1] is x0
    assert torch.equal(out, expected) and torch.equal(x0, expected_x0)


def test_out_variant_checks_its_buffers():
    x, kwargs = make_inputs("plain", torch.float32, "cpu")
    common = dict(coefficients=table_for(torch.float32, "cpu"), row=0)
    with pytest.raises(RuntimeError, match="out overlaps x"):  # out may not alias an input
        ops.fused_step(x, **kwargs, **common, out=x)
    with pytest.raises(ValueError, match="contiguous"):
        ops.fused_step(x, **kwargs, **common, out=torch.empty(SHAPE[::-1]).permute(3, 2, 1, 0))
    with pytest.raises(ValueError, match="aux_out"):
        ops.fused_step(x, **kwargs, **common, aux="x0", out=torch.empty_like(x))


def test_opcheck_out_variant():
    x, kwargs = make_inputs("all", torch.float32, "cpu", shape=(3, 2, 5))
    table = table_for(torch.float32, "cpu")
    torch.library.opcheck(torch.ops.diffkern.fused_step.out,
                          (x, kwargs["model_output"], None, kwargs["guidance_grad"], None, None, table, None, 2, True,
                           1, True, 1, 2, 3, 4, None),
                          {"out": torch.empty_like(x), "aux_out": torch.empty_like(x)})


def test_fused_step_into_is_the_out_op_without_the_dispatcher():
    """The run engine's direct call (csrc/python_module.cpp): the same numbers as the op with out=, for
    every optional input, clipping, x0 and in-kernel noise; the outputs' version counters move as the
    op's do (a tensor saved for a backward and overwritten is then refused); bad inputs raise the op's
    RuntimeError (the run engine then names the argument through the checked call)."""
    x, m, u, g, v = (dk.randn((6, 5), seed=s) for s in range(5))
    table = dk.coefficients.ddpm_rows(torch.tensor([0.5, 0.3], dtype=torch.float64),
                                      torch.tensor([0.6, 0.5], dtype=torch.float64), variance_type="learned_range",
                                      clip_range=(-1.0, 1.0), guidance_scale=2.0, classifier_scale=0.5).float()
    for clip, seed64 in ((False, 7), (True, -3)):
        want, want_x0 = torch.empty_like(x), torch.empty_like(x)
        dk.ops.fused_step(x, m, u, g, v, None, coefficients=table, row=1, clip=clip, aux="x0", stream_noise=True,
                          seed=seed64 % 2 ** 64, step=4, sample_offset=2, out=want, aux_out=want_x0)
        out, x0 = torch.empty_like(x), torch.empty_like(x)
        versions = out._version, x0._version
        dk.ops.fused_step_into(out, x, m, coefficients=table, row=1, seed64=seed64, step=4, sample_offset=2,
                               stream_noise=True, inputs=(u, g, v, None), clip=clip, aux_code=dk.ops.AUX["x0"],
                               aux_out=x0)
        assert torch.equal(out, want) and torch.equal(x0, want_x0)
        assert out._version > versions[0] and x0._version > versions[1]
    with pytest.raises(RuntimeError):
        dk.ops.fused_step_into(torch.empty(6, 4), x, m, coefficients=table, row=0, seed64=0, step=0, sample_offset=0,
                               stream_noise=False)
    with pytest.raises(TypeError, match="coefficients must be a tensor"):
        dk.ops.fused_step_into(torch.empty_like(x), x, m, coefficients=[1.0], row=0, seed64=0, step=0,
                               sample_offset=0, stream_noise=False)
