"""Pure-PyTorch twins of the compiled ops: the executable specification of diffkern.

Each function has the signature and semantics of its kernel. They are written for clarity, not
speed, and are the fallback on devices the kernels do not cover. Philox is reproduced in int64
integer arithmetic, so reference.random_bits equals the kernels' words bit for bit; the normal
transform is Box-Muller evaluated in float64, so reference.randn is the mathematically intended
value of each normal and the kernels (float32 polynomials) agree with it to within
NORMAL_ATOL + NORMAL_RTOL * |z| (see tests/test_randn.py for how that bound was measured).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

# Kernel normals vs this float64 reference: |kernel - reference| <= NORMAL_ATOL + NORMAL_RTOL * |z|.
NORMAL_ATOL = 3.0e-7
NORMAL_RTOL = 2.0e-7


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a constant a and b in [0, 2^32), in int64 math."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo                      # < 2^48
    p_hi = a * b_hi                      # < 2^48, weight 2^16
    s = ((p_hi & 0xFFFF) << 16) + p_lo   # < 2^49
    return ((p_hi >> 16) + (s >> 32)) & _MASK32, s & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counters [..., 4] and keys [..., 2] (low 32 bits of int64) -> int64 [..., 4]."""
    c = [(counter[..., i].to(torch.int64) & _MASK32) for i in range(4)]
    k0 = key[..., 0].to(torch.int64) & _MASK32
    k1 = key[..., 1].to(torch.int64) & _MASK32
    for round_ in range(PHILOX_ROUNDS):
        if round_ > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo32(PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return torch.stack(c, dim=-1)


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _noise_words(shape: Sequence[int], seed, step, sample_offset: int, stream: int,
                 device) -> tuple[torch.Tensor, list[int], int]:
    """The Philox blocks of every (sample, block) of `shape`: int64 [rows, blocks, 4] and the layout."""
    shape = [int(s) for s in shape] if not isinstance(shape, int) else [int(shape)]
    rows = shape[0] if shape else 1
    features = math.prod(shape[1:])
    blocks = (features + 3) // 4
    seed = _as_int(seed) % (1 << 64)
    step = _as_int(step) % (1 << 32)
    n = torch.arange(rows, dtype=torch.int64, device=device) + sample_offset
    q = torch.arange(blocks, dtype=torch.int64, device=device)
    counter = torch.stack(torch.broadcast_tensors(q[None, :], n[:, None],
                                                  torch.tensor(step, device=device),
                                                  torch.tensor(stream, device=device)), dim=-1)
    key = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64, device=device)
    return philox4x32_10(counter, key.expand(rows, blocks, 2)), shape, features


def random_bits(shape: Sequence[int], seed=0, step=0, sample_offset: int = 0, stream: int = 0,
                device=None) -> torch.Tensor:
    """Word j % 4 of Philox((j / 4, sample_offset + n, step, stream), seed) for element (n, j), as int32."""
    words, shape, features = _noise_words(shape, seed, step, sample_offset, stream, device)
    flat = words.reshape(words.shape[0], 4 * words.shape[1])[:, :features]
    flat = torch.where(flat >= 1 << 31, flat - (1 << 32), flat)
    return flat.to(torch.int32).reshape(shape)


def box_muller(words: torch.Tensor) -> torch.Tensor:
    """Normals [..., 4] from Philox words [..., 4] (int64 in [0, 2^32)), computed in float64.

    Words (0, 1) and (2, 3) are (radius, angle) pairs. The radius uniform is the float32 value the
    kernels form, u = fl32(fl32(w >> 1) * 2^-31 + 2^-32) in (0, 1]; the angle is 2 pi w / 2^32.
    """
    def pair(radius_word, angle_word):
        u = torch.floor_divide(radius_word, 2).to(torch.float32).to(torch.float64)
        u = (u * 2.0**-31 + 2.0**-32).to(torch.float32).to(torch.float64)
        radius = torch.sqrt(-2.0 * torch.log(u))
        angle = angle_word.to(torch.float64) * (2.0 * math.pi / 2.0**32)
        return radius * torch.cos(angle), radius * torch.sin(angle)

    z0, z1 = pair(words[..., 0], words[..., 1])
    z2, z3 = pair(words[..., 2], words[..., 3])
    return torch.stack([z0, z1, z2, z3], dim=-1)


def randn(shape: Sequence[int], seed=0, step=0, sample_offset: int = 0, stream: int = 0,
          device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normals of the noise stream: element j % 4 of box_muller of block (j / 4, n).

    As in the kernels, each value is a float32 normal cast to `dtype`, so all dtypes share the numbers.
    """
    dtype = dtype or torch.get_default_dtype()
    words, shape, features = _noise_words(shape, seed, step, sample_offset, stream, device)
    z = box_muller(words).reshape(words.shape[0], 4 * words.shape[1])[:, :features]
    return z.to(torch.float32).to(dtype).reshape(shape)


def rademacher(shape: Sequence[int], seed=0, step=0, sample_offset: int = 0, stream: int = 0,
               device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """-1 where the word of random_bits has its sign bit set, +1 elsewhere."""
    dtype = dtype or torch.get_default_dtype()
    bits = random_bits(shape, seed, step, sample_offset, stream, device)
    return torch.where(bits < 0, -1.0, 1.0).to(dtype)


def probe_trace(probes: torch.Tensor, products: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * sum over probes and features of probes * products per sample, in float64."""
    terms = probes.double() * products.double()
    return (terms.flatten(2) if terms.dim() > 2 else terms[..., None]).sum((0, 2)) * scale


def likelihood_step(x, model_output, model_output_prev, probes, products, delta_logp, trace_prev, *, c_x, c_model,
                    c_prev=0.0, l0=0.0, l_prev=0.0, l_trace=0.0, trace_scale=1.0):
    """diffkern.ops.likelihood_step in float64: (x_next, delta_next, trace)."""
    trace = probe_trace(probes, products, trace_scale)
    x_next = c_x * x.double() + c_model * model_output.double()
    if model_output_prev is not None:
        x_next = x_next + c_prev * model_output_prev.double()
    delta_next = delta_logp + l0 + l_trace * trace
    if trace_prev is not None:
        delta_next = delta_next + l_prev * trace_prev
    return x_next.to(x.dtype), delta_next, trace


def rk_stage(inputs, coefficients, *, probes=None, products=None, traces=(), log_density=None, outputs=1,
             error=False, trace_scale=1.0, atol=1e-5, rtol=1e-5):
    """ops.rk_stage in float64 PyTorch: (outputs, trace, log_density_next, norm), from the formulas of
    csrc/include/diffkern/rk_stage.h (sums in any order)."""
    u = torch.stack([t.double().flatten(1) for t in inputs])  # [n, B, F]
    n, batch = u.shape[0], u.shape[1]
    rows = coefficients.double().expand(batch, -1)
    outs = [torch.einsum("bi,ibf->bf", rows[:, 2 + j * n:2 + (j + 1) * n], u).to(inputs[0].dtype).view(inputs[0].shape)
            for j in range(outputs)]
    raw = ((probes.double() * products.double()).flatten(2).sum((0, 2)) if probes is not None
           else torch.zeros(batch, dtype=torch.float64))
    trace = rows[:, 0] + (rows[:, 1] * raw * trace_scale if probes is not None else 0.0)
    empty = torch.zeros(0, dtype=torch.float64)
    if not error:
        return outs, trace, empty, empty
    e = torch.einsum("bi,ibf->bf", rows[:, 2 + outputs * n:2 + (outputs + 1) * n], u)
    scale = atol + rtol * torch.maximum(u[0].abs(), u[2].abs())
    norm = (e / scale).pow(2).mean(1).sqrt()
    q_next = empty
    if log_density is not None:
        m = len(traces)
        beta = rows[:, 2 + (outputs + 1) * n:][:, :m + 1]
        eps = rows[:, 2 + (outputs + 1) * n + m + 1:][:, :m + 1]
        all_traces = torch.stack(list(traces) + [trace], 1)
        q_next = log_density + (beta * all_traces).sum(1)
        q_err = (eps * all_traces).sum(1)
        r_q = q_err.abs() / (u.shape[2] * atol + rtol * torch.maximum(log_density.abs(), q_next.abs()))
        norm = torch.maximum(norm, r_q)
    return outs, trace, q_next, norm


def training_loss(x0: torch.Tensor, model_output: torch.Tensor, noise: Optional[torch.Tensor] = None, *,
                  coefficients: torch.Tensor, stream_noise: bool = False, seed=0, step=0, sample_offset: int = 0,
                  stream: int = 0, seed_step: Optional[torch.Tensor] = None) -> torch.Tensor:
    """diffkern.ops.training_loss in plain PyTorch, in float64: per-sample losses
    weight_n sum_j (p_m m + p_x0 x0 + p_z z)^2 (a term whose coefficient is 0 is absent). Stream noise
    is reference.randn(x0.shape, seed, step, sample_offset, stream) (the kernels' normals agree with it
    to NORMAL_ATOL / NORMAL_RTOL); the sum is torch's, not the kernels' fixed order."""
    from .coefficients import LOSS_INDEX  # late: coefficients needs the compiled library

    batch = x0.shape[0]
    features = math.prod(x0.shape[1:])
    f64 = torch.float64
    table = coefficients.to(f64).expand(batch, -1)
    if noise is not None:
        z = noise.reshape(batch, features).to(f64)
    elif stream_noise:
        if seed_step is not None:
            seed, step = seed_step.tolist()
        z = randn((batch, features), seed, step, sample_offset, stream, device=x0.device, dtype=f64)
    else:
        z = torch.zeros(batch, features, dtype=f64, device=x0.device)

    def term(name, value):
        c = table[:, LOSS_INDEX[name]].reshape(batch, 1)
        return torch.where(c != 0, c * value, torch.zeros_like(value))

    r = (term("model_output", model_output.reshape(batch, features).to(f64))
         + term("x0", x0.reshape(batch, features).to(f64)) + term("noise", z))
    return table[:, LOSS_INDEX["weight"]] * (r * r).sum(1)


def fused_step(x: torch.Tensor, model_output: Optional[torch.Tensor] = None,
               model_output_uncond: Optional[torch.Tensor] = None, guidance_grad: Optional[torch.Tensor] = None,
               predicted_variance: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None, *,
               coefficients: torch.Tensor, rows: Optional[torch.Tensor] = None, row: int = 0, clip: bool = False,
               aux: str = "none", stream_noise: bool = False, seed=0, step=0, sample_offset: int = 0,
               stream: int = 0, seed_step: Optional[torch.Tensor] = None):
    """diffkern.ops.fused_step in plain PyTorch, evaluated in float64 and rounded once to x's dtype:

        m = m_uncond + w (m - m_uncond);  x0 = clip(a x + b m + e g);
        out = c x0 + d x + f m + h g + sigma z,
    sigma = exp(var_alpha + var_beta v) for learned variances (0 where the row's sigma is 0); a term
    whose coefficient is 0 is absent (an inf input there gives no nan).
    Stream noise is reference.randn(x.shape, seed, step, sample_offset, stream), used only in rows
    with sigma != 0 (elsewhere z = 0, as in the kernels).
    """
    from .coefficients import INDEX  # late: coefficients needs the compiled library

    batch = x.shape[0] if x.dim() else 1
    features = math.prod(x.shape[1:])
    f64 = torch.float64

    def flat(t):
        return None if t is None else t.reshape(batch, features).to(f64)

    if rows is not None:
        index = rows.reshape(-1).expand(batch) if rows.numel() == 1 else rows.reshape(-1)
    elif row >= 0:
        index = torch.full((batch,), row, dtype=torch.int64, device=x.device)
    else:
        index = torch.arange(batch, device=x.device)
    table = coefficients.to(f64)[index]

    def col(name):
        return table[:, INDEX[name]].reshape(batch, 1)

    X, M, MU, G, V = (flat(t) for t in (x, model_output, model_output_uncond, guidance_grad, predicted_variance))
    zero = torch.zeros_like(X)
    M = zero if M is None else M
    G = zero if G is None else G
    if MU is not None:
        M = MU + col("w") * (M - MU)
    def term(name, value):  # a term whose coefficient is 0 is absent (inf * 0 would be nan), as in the kernels
        c = col(name)
        return torch.where(c != 0, c * value, torch.zeros_like(value))

    x0 = term("a", X) + term("b", M) + term("e", G)
    if clip:
        x0 = torch.minimum(torch.maximum(x0, col("clip_lo")), col("clip_hi"))
    sigma = col("sigma").expand(batch, features)
    if V is not None:
        sigma = torch.where(sigma != 0, torch.exp(col("var_alpha") + col("var_beta") * V), torch.zeros_like(sigma))
    if noise is not None:
        z = flat(noise)
    elif stream_noise:
        if seed_step is not None:
            seed, step = seed_step.tolist()
        z = randn((batch, features), seed, step, sample_offset, stream, device=x.device, dtype=f64)
        z = torch.where(col("sigma") != 0, z, torch.zeros_like(z))
    else:
        z = zero
    out = term("c", x0) + term("d", X) + term("f", M) + term("h", G) + torch.where(sigma != 0, sigma * z, 0.0)
    aux_out = {"none": None, "x0": x0, "noise": z}[aux]
    out = out.to(x.dtype).reshape(x.shape)
    return out, None if aux_out is None else aux_out.to(x.dtype).reshape(x.shape)


def linear_step(inputs, noise: Optional[torch.Tensor] = None, *, coefficients: torch.Tensor, row: int = 0,
                outputs: int = 1, x0: bool = False, clip: bool = False, stream_noise: bool = False, seed=0, step=0,
                sample_offset: int = 0, stream: int = 0, seed_step: Optional[torch.Tensor] = None):
    """diffkern.ops.linear_step in plain PyTorch, in float64, rounded once to the inputs' dtype:

        x0 = clip(a_z z + sum_i a_i u_i);   out_j = c_j x0 + sum_i d_ji u_i + s_j z
    with the row layout of diffkern.coefficients.linear_row. Terms whose coefficient is 0 are left
    out (so an inf or nan there does not reach the result), as in the kernels. Stream noise is drawn
    only when the row has a nonzero noise coefficient (elsewhere z = 0, as in the kernels).
    """
    x = inputs[0]
    n = len(inputs)
    f64 = torch.float64
    r = coefficients[row].to(f64).tolist()
    u = [t.to(f64) for t in inputs]
    noisy = r[n] != 0 or any(r[n + 3 + j * (n + 2) + n + 1] != 0 for j in range(outputs))
    if noise is not None:
        z = noise.to(f64)
    elif stream_noise and noisy:
        if seed_step is not None:
            seed, step = seed_step.tolist()
        batch = x.shape[0] if x.dim() else 1
        z = randn((batch, math.prod(x.shape[1:])), seed, step, sample_offset, stream, device=x.device,
                  dtype=f64).reshape(x.shape)
    else:
        z = torch.zeros_like(u[0])
    def total(pairs):
        return sum((c * v for c, v in pairs if c != 0), torch.zeros_like(u[0]))

    value = total([(r[n], z)] + [(r[i], u[i]) for i in range(n)])
    if clip:
        value = value.clamp(r[n + 1], r[n + 2])
    results = []
    for j in range(outputs):
        c = r[n + 3 + j * (n + 2):n + 3 + (j + 1) * (n + 2)]
        results.append(total([(c[0], value)] + [(c[1 + i], u[i]) for i in range(n)] + [(c[n + 1], z)]).to(x.dtype))
    if x0:
        results.append(value.to(x.dtype))
    return results


def pfgm_integrate(field_fn, x: torch.Tensor, z_start: float, z_end: float, num_steps: int, solver: str = "heun",
                   time: str = "log_z") -> torch.Tensor:
    """The PFGM ODE dx/dz = E_x / E_z (diffkern.pfgm) from z_start to z_end in plain PyTorch: Euler or
    Heun steps, even in z or in log z (where dx/dlog z = z E_x / E_z), each update computed in float32
    (float64 for float64 states) and rounded once to x's dtype, as the fused step does."""
    if time == "log_z":
        levels = torch.linspace(math.log(z_start), math.log(z_end), num_steps + 1, dtype=torch.float64).exp()
        levels[0], levels[-1] = z_start, z_end
        taus, jac = levels.log().tolist(), levels.tolist()
    else:
        levels = torch.linspace(z_start, z_end, num_steps + 1, dtype=torch.float64)
        taus, jac = levels.tolist(), [1.0] * (num_steps + 1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, features = x.shape[0], x[0].numel()

    def slope(x_now, i):
        out = field_fn(x_now, torch.full((batch,), levels[i].item(), dtype=acc, device=x.device))
        if isinstance(out, torch.Tensor):
            field_x, field_z = out[:, :features], out[:, features]
        else:
            field_x, field_z = out
        field_x = field_x.reshape(batch, -1).to(x.dtype).to(acc)
        return field_x / field_z.reshape(batch, 1).to(acc) * jac[i]

    for i in range(num_steps):
        h = taus[i + 1] - taus[i]
        x_acc = x.reshape(batch, -1).to(acc)
        k1 = slope(x, i)
        x_next = (x_acc + h * k1).to(x.dtype)
        if solver == "heun":
            k2 = slope(x_next.reshape(x.shape), i + 1)
            x_next = (x_acc + h / 2 * k2 + h / 2 * k1).to(x.dtype)
        x = x_next.reshape(x.shape)
    return x


def poisson_field(points: torch.Tensor, dz: torch.Tensor, charges: torch.Tensor) -> tuple:
    """ops.poisson_field in float64, directly: log w_ij = -(N+1)/2 log(|y_i - x_j|^2 + dz_i^2), the mean
    weighted by softmax_j(log w_ij) and logsumexp_j(log w_ij) (a [batch, M] matrix: for tests)."""
    p, c, h = points.double(), charges.double(), dz.double()
    d2 = ((p[:, None, :] - c[None, :, :]) ** 2).sum(-1) + h[:, None] ** 2
    log_w = -(p.shape[1] + 1) / 2 * d2.log()
    return (torch.softmax(log_w, 1) @ c).to(points.dtype), torch.logsumexp(log_w, 1)
