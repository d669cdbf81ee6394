"""FFJORD's CNF pieces (Grathwohl et al. 2019, github.com/rtqichen/ffjord, lib/layers/odefunc.py,
diffeq_layers/basic.py and cnf.py), transcribed on FFJORD's own conventions for the tests and the
benchmark: a scalar time t passed to every concat-squash layer, the ODE state the tuple (z, logpz)
with d logpz/dt = -divergence, the Hutchinson divergence e^T (d f/d y) e from one autograd.grad with
create_graph, the probe e drawn once per solve ("before_odeint") and held for the whole trajectory,
and the loss -mean(logp_base(z(T)) - logpz(T)) integrated by torchdiffeq's odeint / odeint_adjoint.
Only the training-mode path of the 2-d toy models is transcribed (FFJORD evaluates 2-d data with a
brute-force divergence in eval mode)."""
import math

import torch


class ConcatSquashLinear(torch.nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = torch.nn.Linear(dim_in, dim_out)
        self._hyper_bias = torch.nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = torch.nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(t.view(1, 1))


class ODEnet(torch.nn.Module):
    """FFJORD's ODEnet with layer_type "concatsquash" and a tanh nonlinearity."""

    def __init__(self, hidden_dims, input_dim):
        super().__init__()
        dims = [input_dim] + list(hidden_dims) + [input_dim]
        self.layers = torch.nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = torch.tanh(dx)
        return dx


def divergence_approx(f, y, e):
    e_dzdx = torch.autograd.grad(f, y, e, create_graph=True)[0]
    return (e_dzdx * e).view(y.shape[0], -1).sum(dim=1)


class ODEfunc(torch.nn.Module):
    def __init__(self, diffeq):
        super().__init__()
        self.diffeq = diffeq
        self._e = None
        self._num_evals = 0

    def before_odeint(self, e):
        self._e = e  # FFJORD samples it here (Gaussian unless rademacher); the test gives it
        self._num_evals = 0

    def forward(self, t, states):
        y = states[0]
        self._num_evals += 1
        t = torch.as_tensor(t).type_as(y)
        with torch.set_grad_enabled(True):
            y.requires_grad_(True)
            t.requires_grad_(True)
            dy = self.diffeq(t, y)
            divergence = divergence_approx(dy, y, e=self._e).view(y.shape[0], 1)
        return dy, -divergence


def standard_normal_logprob(z):
    return -0.5 * math.log(2 * math.pi) - z.pow(2) / 2


def ffjord_log_p(odefunc, x, e, end_time, *, rtol, atol, adjoint, method="dopri5"):
    """log p(x) per sample as FFJORD's CNF computes it with torchdiffeq."""
    import torchdiffeq

    odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    odefunc.before_odeint(e)
    zero = torch.zeros(x.shape[0], 1, dtype=x.dtype)
    times = torch.tensor([0.0, end_time], dtype=x.dtype)
    z_t, logpz_t = odeint(odefunc, (x, zero), times, rtol=rtol, atol=atol, method=method)
    z, delta_logp = z_t[-1], logpz_t[-1]
    return standard_normal_logprob(z).view(z.shape[0], -1).sum(1) - delta_logp.view(-1)
