"""The widened fused step (ops.linear_step): SIMD units against the per-thread body (bitwise), both
against the float64 reference, opcheck, and bad arguments."""
import pytest
import torch
from common import DEVICES, TOLERANCES, cpu_isas

from diffkern import ops, reference
from diffkern.coefficients import linear_row

SHAPES = [(1, 1), (3, 5), (37, 1), (1029, 2), (5, 3, 7, 9), (2, 4, 64, 64), (0, 4)]


def table_for(n, outputs, dtype, device="cpu"):
    a = [0.5 - 0.3 * i for i in range(n)]
    out = [(0.7 - 0.2 * j, [0.1 * (i + 1) * (-1) ** (i + j) for i in range(n)], 0.3 * (1 - j)) for j in range(outputs)]
    rows = [linear_row(a, out, x0_noise=0.1, clip=(-1.0, 1.0)),
            linear_row([1.0] * n, [(1.0, [0.0] * n, 0.0)] * outputs)]  # a row without noise
    return torch.tensor(rows, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,outputs", [(1, 1), (2, 1), (4, 2), (8, 2)])
@pytest.mark.parametrize("noise", ["stream", "tensor", "none"])
def test_isas_equal_the_thread_body_and_the_reference(dtype, shape, n, outputs, noise):
    gen = torch.Generator().manual_seed(n * 7 + outputs)
    inputs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]
    z = torch.randn(shape, generator=gen).to(dtype) if noise == "tensor" else None
    table = table_for(n, outputs, dtype)
    for row in (0, 1):
        args = (inputs, z, table, row, outputs, True, True, noise == "stream", 11, 3, 5, 0, None)
        body = torch.ops.diffkern._linear_step_cpu_isa(*args, "scalar")
        for isa in cpu_isas()[1:]:
            got = torch.ops.diffkern._linear_step_cpu_isa(*args, isa)
            for g, b in zip(got, body):
                assert torch.equal(g, b), isa
        expected = reference.linear_step(inputs, z, coefficients=table, row=row, outputs=outputs, x0=True, clip=True,
                                         stream_noise=noise == "stream", seed=11, step=3, sample_offset=5)
        got = ops.linear_step(inputs, z, coefficients=table, row=row, outputs=outputs, x0=True, clip=True,
                              stream_noise=noise == "stream", seed=11, step=3, sample_offset=5)
        assert len(got) == outputs + 1
        for g, e in zip(got, expected):
            # float64: the stream's normals are float32 values whose Box-Muller differs from the
            # reference's by an ulp of float32 (1e-7), times coefficients below 1
            tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else TOLERANCES[dtype]
            torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_the_stream_whatever_the_batch_split(device):
    x = torch.randn(6, 3, 5, device=device)
    table = torch.tensor([linear_row([0.0], [(0.0, [0.0], 1.0)])], device=device)
    whole = ops.linear_step([x], coefficients=table, stream_noise=True, seed=4, step=9)[0]
    parts = [ops.linear_step([x[i:i + 2]], coefficients=table, stream_noise=True, seed=4, step=9, sample_offset=i)[0]
             for i in range(0, 6, 2)]
    assert torch.equal(whole, torch.cat(parts))
    import diffkern as dk
    torch.testing.assert_close(whole, dk.randn(x.shape, seed=4, step=9, device=device))


def test_channels_last_and_strided_inputs():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    m = torch.randn(2, 6, 8, 8)[:, :3]
    table = table_for(2, 1, torch.float32)
    got = ops.linear_step([x, m], coefficients=table, outputs=1, x0=True, clip=True)
    expected = ops.linear_step([x.contiguous(), m.contiguous()], coefficients=table, outputs=1, x0=True, clip=True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_opcheck():
    x, m = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    table = table_for(2, 2, torch.float32)
    torch.library.opcheck(torch.ops.diffkern.linear_step.default,
                          ([x, m], None, table, 0, 2, True, True, True, 1, 2, 0, 0, None))
    out = [torch.empty_like(x) for _ in range(3)]
    torch.library.opcheck(torch.ops.diffkern.linear_step.out,
                          ([x, m], None, table, 0, 2, True, True, False, 1, 2, 0, 0, None), {"out": out})


def test_compiles_fullgraph():
    x, m = torch.randn(3, 4), torch.randn(3, 4)
    table = table_for(2, 1, torch.float32)

    def step(x, m):
        return ops.linear_step([x, m], coefficients=table, outputs=1, stream_noise=True, seed=3)[0]

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x, m), step(x, m))


@pytest.mark.parametrize("change,message", [
    (dict(inputs=[]), "inputs"),
    (dict(inputs=[torch.randn(2, 3), torch.randn(2, 4)]), "inputs\\[1\\]"),
    (dict(inputs=[torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)]), "inputs\\[1\\]"),
    (dict(noise=torch.randn(3, 3)), "noise"),
    (dict(coefficients=torch.zeros(1, 3)), "coefficients"),
    (dict(coefficients=torch.zeros(1, 9, dtype=torch.float64)), "coefficients"),
    (dict(row=5), "row"),
    (dict(outputs=3), "outputs"),
    (dict(seed=-1), "seed"),
    (dict(step=1 << 32), "step"),
])
def test_bad_arguments_are_named(change, message):
    x = torch.randn(2, 3)
    args = dict(inputs=[x, x], noise=None, coefficients=table_for(2, 1, torch.float32), row=0, outputs=1, seed=0,
                step=0)
    args.update(change)
    inputs, noise = args.pop("inputs"), args.pop("noise")
    with pytest.raises((ValueError, TypeError), match=message):
        ops.linear_step(inputs, noise, **args)


def test_outputs_do_not_overlap_inputs():
    x = torch.randn(2, 3)
    table = table_for(1, 1, torch.float32)
    with pytest.raises(RuntimeError):
        torch.ops.diffkern.linear_step.out([x], None, table, 0, 1, False, False, False, 0, 0, 0, 0, None, out=[x])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("want_x0", [False, True])
def test_zero_coefficients_drop_their_terms(device, want_x0):
    """A term with coefficient 0 is not in the formula, so an inf or nan input there must not reach the
    result (diffusers' Euler step is sample + dt * model_output: it never reads an x0)."""
    x = torch.randn(3, 70, device=device)
    m = torch.randn(3, 70, device=device)
    history = torch.full((3, 70), float("inf"), device=device)
    history[1, 5] = float("nan")
    table = torch.tensor([linear_row([0.0, 0.0, 0.0], [(0.0, [1.0, 0.25, 0.0], 0.0)])], device=device)
    results = [ops.linear_step([x, m, history], coefficients=table, x0=want_x0)]
    if device == "cpu":
        args = ([x, m, history], None, table, 0, 1, want_x0, False, False, 0, 0, 0, 0, None)
        results += [torch.ops.diffkern._linear_step_cpu_isa(*args, isa) for isa in cpu_isas()]
    for got in results:
        assert torch.equal(got[0], torch.addcmul(x, m, torch.tensor(0.25, device=device)))
        if want_x0:
            assert torch.equal(got[1], torch.zeros_like(x))  # an empty sum is +0


def test_the_direct_call_equals_the_dispatched_op():
    """ops.linear_step calls the kernel without torch's dispatcher (csrc/python_module.cpp) for plain
    tensors outside any dispatch mode: the same numbers as the op through the dispatcher, the outputs'
    version counters moved, and the dispatcher kept where it routes elsewhere (a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(5, 7, generator=gen) for _ in range(4)]
    table = table_for(4, 2, torch.float32)
    for row, x0 in ((0, True), (1, False)):
        got = ops.linear_step(inputs, coefficients=table, row=row, outputs=2, x0=x0, clip=True, stream_noise=True,
                              seed=2 ** 63 + 5, step=9, sample_offset=4)
        want = torch.ops.diffkern.linear_step(inputs, None, table, row, 2, x0, True, True, -(2 ** 63) + 5, 9, 4, 0,
                                              None)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    out = [torch.empty(5, 7)]
    version = out[0]._version
    ops._direct_linear_step_into(inputs[:2], None, table_for(2, 1, torch.float32), 0, 1, False, False, False, 0, 0, 0,
                                 out)
    assert out[0]._version > version

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as mode:
        ops.linear_step(inputs[:2], coefficients=table_for(2, 1, torch.float32), row=0)
    assert "diffkern.linear_step.out" in mode.seen
