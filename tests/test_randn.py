"""dk.randn: the kernels against the reference, against each other, and against the normal law."""
import math

import numpy as np
import pytest
import torch
from common import cpu_isas, requires_cuda
from scipy import stats

import diffkern as dk
from diffkern import reference

ODD_SHAPES = [(1,), (37,), (5, 1), (9, 2), (17, 3), (4, 5), (3, 37), (2, 64), (3, 4, 33), (1, 129), (6, 2, 3, 5)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def assert_normals_close(kernel: torch.Tensor, ref: torch.Tensor):
    """The kernels' float32 transform vs float64 Box-Muller of the same words (reference.py states
    the bound: about two float32 ulps, measured over 2^22 words in csrc/tests/test_noise_math.cpp)."""
    kernel, ref = kernel.double(), ref.double()
    bound = reference.NORMAL_ATOL + reference.NORMAL_RTOL * ref.abs()
    excess = ((kernel - ref).abs() - bound).max().item() if kernel.numel() else 0.0
    assert excess <= 0, f"error exceeds the stated bound by {excess:.3g}"


# ---- kernel vs reference ----

@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 3, 16, 16)])
def test_matches_reference(device, shape):
    z = dk.randn(shape, seed=2024, step=3, sample_offset=7, stream=5, device=device)
    words = reference.random_bits(shape, 2024, 3, 7, 5)
    assert torch.equal(dk.random_bits(shape, seed=2024, step=3, sample_offset=7, stream=5, device=device).cpu(),
                       words)
    assert z.shape == torch.Size(shape) and z.dtype == torch.float32 and z.device.type == device
    assert_normals_close(z.cpu(), reference.randn(shape, 2024, 3, 7, 5, dtype=torch.float64))


def test_matches_reference_many_values():
    """4M normals: the bound holds over the whole range, tails included."""
    shape = (1024, 4096)
    z = dk.randn(shape, seed=11)
    words = reference.random_bits(shape, 11).to(torch.int64) & 0xFFFFFFFF
    ref = reference.box_muller(words.reshape(1024, 1024, 4)).reshape(shape)
    assert_normals_close(z, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_are_the_float32_normals_cast(device, dtype):
    shape = (5, 3, 7)
    z32 = dk.randn(shape, seed=9, device=device, dtype=torch.float32)
    z = dk.randn(shape, seed=9, device=device, dtype=dtype)
    assert z.dtype == dtype
    assert torch.equal(z, z32.to(dtype))
    assert torch.equal(reference.randn(shape, 9, dtype=dtype), reference.randn(shape, 9).to(dtype))


# ---- the CPU instruction sets are bitwise identical ----

@pytest.mark.parametrize("shape", ODD_SHAPES + [(1000,), (513, 2), (257, 3), (3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_instruction_sets_agree_bitwise(shape, dtype):
    results = {isa: torch.ops.diffkern._noise_cpu_isa(list(shape), 77, 1, 3, 2, dtype, isa,
                                                      False) for isa in cpu_isas()}
    scalar = results["scalar"]  # the CUDA thread body, run index by index
    for isa, z in results.items():
        assert torch.equal(z, scalar), f"{isa} differs from the scalar path"


# Feature counts around the SIMD widths (4 words per block, 8 or 16 lanes) and batches that are not
# multiples of the lane count: each takes another of the fill's paths (short rows, rows of 4 k
# features across samples, row tails).
FEATURE_COUNTS = [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 63, 64, 65]


@pytest.mark.parametrize("features", FEATURE_COUNTS)
@pytest.mark.parametrize("batch", [1, 37, 4099])
@pytest.mark.parametrize("rademacher", [False, True])
def test_cpu_instruction_sets_agree_bitwise_for_every_feature_count(features, batch, rademacher):
    results = {isa: torch.ops.diffkern._noise_cpu_isa([batch, features], 5, 2, 11, 0, torch.float32, isa, rademacher)
               for isa in cpu_isas()}
    for isa, z in results.items():
        assert torch.equal(z, results["scalar"]), f"{isa} differs from the scalar path"


def test_half_conversion_agrees_bitwise_including_subnormals():
    """The SIMD paths convert to float16 in hardware; 2^20 normals include ~50 below float16's
    smallest normal (6.1e-5), where rounding mistakes would show."""
    results = [torch.ops.diffkern._noise_cpu_isa([1024, 1024], 5, 0, 0, 0, torch.float16, isa,
                                                 False) for isa in cpu_isas()]
    assert (results[0].abs() < 6.1e-5).sum() > 10
    for z in results[1:]:
        assert torch.equal(z, results[0])


def test_default_path_is_the_best_isa():
    shape = (4, 100)
    assert torch.equal(dk.randn(shape, seed=1), torch.ops.diffkern._noise_cpu_isa(shape, 1, 0, 0, 0, torch.float32,
                                                                                  "auto", False))


# ---- reproducibility contract ----

@pytest.mark.parametrize("split", [8, 3, 1, 15])
def test_batch_split_invariance(device, split):
    shape = (16, 3, 5, 7)
    whole = dk.randn(shape, seed=5, step=2, device=device)
    first = dk.randn((split,) + shape[1:], seed=5, step=2, device=device)
    rest = dk.randn((16 - split,) + shape[1:], seed=5, step=2, sample_offset=split, device=device)
    assert torch.equal(torch.cat([first, rest]), whole)


def test_features_are_row_major(device):
    """Only the number of features per sample matters, not how they are shaped."""
    a = dk.randn((4, 3, 8, 8), seed=1, device=device)
    assert torch.equal(a.reshape(4, 192), dk.randn((4, 192), seed=1, device=device))


def test_same_arguments_same_numbers_and_each_argument_matters(device):
    shape = (8, 33)
    base = dict(seed=1, step=2, sample_offset=3, stream=4)
    z = dk.randn(shape, device=device, **base)
    assert torch.equal(z, dk.randn(shape, device=device, **base))
    for name in base:
        changed = dict(base, **{name: base[name] + 1})
        assert not torch.equal(z, dk.randn(shape, device=device, **changed)), name


def test_tensor_seed_and_step(device):
    shape = (6, 10)
    expected = dk.randn(shape, seed=2**64 - 5, step=9, device=device)
    seed = torch.tensor(-5, device=device)  # the int64 with the bits of 2^64 - 5
    step = torch.tensor(9, device=device)
    assert torch.equal(dk.randn(shape, seed=seed, step=step, device=device), expected)
    assert torch.equal(dk.randn(shape, seed=2**64 - 5, step=step, device=device), expected)
    assert torch.equal(dk.random_bits(shape, seed=seed, step=9, device=device),
                       dk.random_bits(shape, seed=2**64 - 5, step=9, device=device))


def test_scalar_and_empty_shapes(device):
    assert dk.randn((), seed=3, device=device).shape == torch.Size([])
    assert torch.equal(dk.randn((), seed=3, device=device).reshape(1), dk.randn((1,), seed=3, device=device))
    for shape in [(0,), (0, 5), (5, 0), (2, 0, 3)]:
        z = dk.randn(shape, device=device)
        assert z.shape == torch.Size(shape) and z.numel() == 0


def test_meta_device():
    z = dk.randn((2, 3), seed=torch.tensor(1, device="meta"), device="meta", dtype=torch.float16)
    assert z.device.type == "meta" and z.shape == (2, 3) and z.dtype == torch.float16


# ---- the normal law, at a fixed seed ----

N_STAT = 1 << 21


def test_normality():
    """Moments within 5 standard errors (n = 2^21), a KS test, and the 3-sigma tail frequency."""
    z = dk.randn((N_STAT // 64, 64), seed=12345).double().flatten().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    p3 = 2 * stats.norm.sf(3)
    tail = np.mean(np.abs(z) > 3)
    assert abs(tail - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)


def test_one_feature_per_sample_is_normal():
    """(N,) draws word 0 of a block per sample: a different code path, the same law."""
    z = dk.randn((N_STAT,), seed=7).double().numpy()
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def test_independence_across_seeds_steps_streams_and_samples():
    shape = (N_STAT // 64, 64)
    base = dk.randn(shape, seed=1, step=0, stream=0)
    bound = 5 / math.sqrt(base.numel())
    for other in [dict(seed=2), dict(seed=1, step=1), dict(seed=1, stream=1), dict(seed=1, sample_offset=1),
                  dict(seed=1 + 2**32)]:  # the high word of the seed matters too
        assert abs(corr(base, dk.randn(shape, **other))) < bound, other
    # neighbouring samples, and neighbouring features within and across Philox blocks
    assert abs(corr(base[1:], base[:-1])) < bound
    for lag in (1, 2, 3, 4):
        assert abs(corr(base[:, lag:], base[:, :-lag])) < 5 / math.sqrt(base[:, lag:].numel()), lag
    # a Box-Muller pair shares its radius: its squares must still be uncorrelated
    assert abs(corr(base[:, 0::2] ** 2, base[:, 1::2] ** 2)) < 5 / math.sqrt(base.numel() / 2)


# ---- torch.compile, opcheck ----

def test_opcheck_randn():
    cpu = torch.device("cpu")
    torch.library.opcheck(torch.ops.diffkern.randn.default, ([3, 5], 1, 2, 3, 4, None, torch.float32, cpu))
    torch.library.opcheck(torch.ops.diffkern.randn.default,
                          ([2, 7], 0, 0, 0, 0, torch.tensor([5, 6]), torch.bfloat16, cpu))
    torch.library.opcheck(torch.ops.diffkern._noise_cpu_isa.default, ([3, 5], 1, 2, 3, 4, torch.float32, "auto", True))


def test_torch_compile_fullgraph():
    def noisy(x):
        return x * 0.5 + dk.randn(x.shape, seed=3, step=1, device=x.device, dtype=x.dtype)

    x = torch.linspace(-1, 1, 60).reshape(4, 15)
    compiled = torch.compile(noisy, fullgraph=True)
    assert torch.equal(compiled(x), noisy(x))


# ---- bad inputs ----

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shape=(-1, 3)), ValueError, "negative"),
    (dict(shape=(2, 3), dtype=torch.int32), ValueError, "dtype"),
    (dict(shape=(2,), seed=-1), ValueError, "seed"),
    (dict(shape=(2,), seed=2**64), ValueError, "seed"),
    (dict(shape=(2,), seed=1.5), TypeError, "seed"),
    (dict(shape=(2,), step=2**32), ValueError, "step"),
    (dict(shape=(2,), stream=-1), ValueError, "stream"),
    (dict(shape=(4,), sample_offset=2**32 - 3), ValueError, "sample_offset"),
    (dict(shape=(1, 2**34 + 1)), ValueError, "features"),
    (dict(shape="abc"), TypeError, "shape"),
    (dict(shape=(2,), seed=torch.tensor(1.0)), ValueError, "integer"),
    (dict(shape=(2,), seed=torch.tensor([1, 2])), ValueError, "one-element"),
])
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        dk.randn(**kwargs)


def test_bad_inputs_reach_cpp_checks_too():
    """Direct torch.ops calls skip the Python checks; the C++ ones still name the problem."""
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="step must lie"):
        torch.ops.diffkern.randn([3], 0, 2**32, 0, 0, None, torch.float32, cpu)
    with pytest.raises(RuntimeError, match="seed_step"):
        torch.ops.diffkern.randn([3], 0, 0, 0, 0, torch.zeros(3, dtype=torch.int64), torch.float32, cpu)
    with pytest.raises(RuntimeError, match="sample_offset"):
        torch.ops.diffkern.randn([3], 0, 0, 2**32 - 1, 0, None, torch.float32, cpu)
    with pytest.raises(RuntimeError, match="is not a CPU instruction set"):
        torch.ops.diffkern._noise_cpu_isa([3], 0, 0, 0, 0, torch.float32, "sse9", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError):
        dk.randn((2, 3), device="cuda")


# ---- more than 2^31 elements (int64 indexing) ----

@pytest.mark.slow
def test_more_than_2_31_elements():
    features = 2**30 + 3
    z = dk.randn((2, features), seed=8, dtype=torch.float16)  # 2^31 + 6 elements, 4 GiB
    for n, j in [(0, 0), (0, features - 1), (1, 0), (1, 2**29), (1, features - 2), (1, features - 1)]:
        counter = torch.tensor([[j // 4, n, 0, 0]])
        word = reference.philox4x32_10(counter, torch.tensor([[8, 0]]))
        expected = reference.box_muller(word)[0, j % 4].to(torch.float32).to(torch.float16)
        assert float(z[n, j]) == pytest.approx(float(expected), abs=2e-3), (n, j)
    del z


# ---- CUDA ----

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", ODD_SHAPES + [(64, 3, 64, 64), (100000,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_bitwise(shape, dtype):
    cpu = dk.randn(shape, seed=31, step=4, sample_offset=2, stream=1, dtype=dtype)
    cuda = dk.randn(shape, seed=31, step=4, sample_offset=2, stream=1, dtype=dtype, device="cuda")
    assert torch.equal(cuda.cpu(), cpu)


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_replays_draw_new_noise():
    shape = (8, 3, 16, 16)
    seed = torch.tensor(7, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dk.randn(shape, seed=seed, step=step, device="cuda")  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dk.randn(shape, seed=seed, step=step, device="cuda")
    for k in range(3):
        step.fill_(k)
        graph.replay()
        assert torch.equal(out, dk.randn(shape, seed=7, step=k, device="cuda")), k
