"""ResAlign's implicit hypergradient (seed 003, Sec. 3.2, Eq. 5-7, Alg. 1), on dicts of tensors.

The simulated fine-tune theta* is read as the Moreau-envelope minimiser (Eq. 5)

    theta*(theta) = argmin_theta' L_FT(theta') + ||theta' - theta||^2 / (2 gamma),

whose stationarity condition grad L_FT(theta*) + (theta* - theta) / gamma = 0 gives, by the
implicit function theorem (Appendix, Eq. 10-13), d theta* / d theta = (I + gamma H)^-1 with
H = hess L_FT(theta*) (symmetric). The hypergradient of the harm loss after fine-tuning is then

    grad_theta L_h(theta*) = (I + gamma H)^-1 b,   b = grad L_h(theta*)                 (Eq. 6)

solved by Richardson's iteration with Hessian-vector products only (Eq. 7, Alg. 1):

    z_0 = 0,   z_{k+1} = b - gamma H z_k                                                 (Eq. 7)

K iterations cost K - 1 HVPs (z_1 = b); K = 1 is the first-order approximation (Jacobian = I).
The residual of z_k is r_k = b - (I + gamma H) z_k = z_{k+1} - z_k, free once z_{k+1} is known, and
r_{k+1} = -gamma H r_k: the iteration converges iff the spectral radius rho(gamma H) < 1, and for a
symmetric H ||r_{k+1}|| / ||r_k|| <= rho. So a residual that does not shrink *proves* rho >= 1.

The divergence guard (unlike the official code, which silently returns the direct gradient): a
residual ratio >= 1 shrinks gamma (a smaller Moreau envelope, Fig. 5: gamma <= 1 works) to at most
half, and to 0.8 / the ratio seen where that is smaller, and solves again, up to ``max_halvings``
times; then it falls back to z = b (first order). Every firing and
every fall-back is in the returned :class:`Solve`, which the objective logs per step.
"""

from __future__ import annotations

from dataclasses import dataclass


def norm(v: dict) -> float:
    """The Euclidean norm of a dict of tensors, as one flat vector."""
    return float(sum(float((t.double() ** 2).sum()) for t in v.values()) ** 0.5)


class HessianOperator:
    """v -> H v for H = hess loss_fn(params), by double backward (Pearlmutter): the gradient graph is
    built once and reused for every product (``retain_graph``), so K - 1 products cost one backward
    with ``create_graph`` plus K - 1 backwards of the scalar g . v.

    loss_fn(params) -> scalar, where params is ``{name: tensor}`` (e.g. through
    :func:`torch.func.functional_call`). The points are detached copies: nothing of the caller's
    graph is touched. Call it inside :meth:`~.objective.StepContext.double_backward` for a UNet.
    """

    def __init__(self, loss_fn, params: dict):
        import torch

        self.names = list(params)
        self.point = {k: params[k].detach().requires_grad_(True) for k in self.names}
        self.loss = loss_fn(self.point)
        self.grads = torch.autograd.grad(self.loss, [self.point[k] for k in self.names], create_graph=True,
                                         allow_unused=True)  # a weight the loss never reaches has H = 0
        self.products = 0

    def __call__(self, v: dict) -> dict:
        import torch

        dot = sum((g * v[k].to(g.dtype)).sum() for g, k in zip(self.grads, self.names) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:  # H = 0 (a loss linear in params)
            return {k: torch.zeros_like(self.point[k]) for k in self.names}
        hv = torch.autograd.grad(dot, [self.point[k] for k in self.names], retain_graph=True, allow_unused=True)
        self.products += 1
        return {k: (h.detach() if h is not None else torch.zeros_like(self.point[k])) for k, h in zip(self.names, hv)}


@dataclass
class Solve:
    """The result of :func:`richardson` and what the guard did (all of it is logged)."""

    z: dict  # ~ (I + gamma H)^-1 b
    products: int  # Hessian-vector products spent
    residual: float  # ||r_{K-1}|| / ||b||: the last residual known without one more product (0 for K = 1)
    rho: float  # the largest residual ratio seen, scaled to the gamma asked for: a lower bound of rho(gamma H)
    gamma: float  # the gamma finally used
    guard: int = 0  # times the guard fired (gamma shrunk)
    fallback: bool = False  # the guard gave up: z = b, the first-order hypergradient


def richardson(hvp, b: dict, gamma: float = 1.0, iterations: int = 5, max_halvings: int = 3,
               tol: float = 1e-7) -> Solve:
    """Eq. 7 / Alg. 1: K = ``iterations`` Richardson steps for (I + gamma H) z = b, with the
    divergence guard of the module docstring. ``hvp(v) -> H v`` on dicts like ``b``. The iteration
    stops early once the relative residual is below ``tol``: there, rounding alone moves the
    residual and its ratio would no longer measure rho."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    b_norm = norm(b) or 1.0
    products, guard, rho, gamma0 = 0, 0, 0.0, gamma
    for _ in range(max_halvings + 1):
        z, prev, diverged = dict(b), b_norm, False  # z_1 = b; r_0 = b
        last = 0.0
        for _k in range(1, iterations):
            hz = hvp(z)
            products += 1
            z_next = {k: b[k] - gamma * hz[k].to(b[k].dtype) for k in b}
            res = norm({k: z_next[k] - z[k] for k in b})  # ||r_k||
            rho = max(rho, res / prev * gamma0 / gamma)  # as a bound of rho(gamma_0 H), the gamma asked for
            if not res < prev:  # rho(gamma H) >= 1 (or a NaN): this gamma diverges
                diverged, ratio = True, res / prev
                break
            z, prev, last = z_next, res, res / b_norm
            if last < tol:
                break
        if not diverged:
            return Solve(z, products, last, rho, gamma, guard)
        guard += 1
        # at least halved; at once below 0.8 / the ratio seen where that is smaller (a lower bound of
        # rho, so the next try may still diverge, and is counted again)
        gamma *= min(0.5, 0.8 / ratio) if ratio == ratio and ratio > 0 else 0.5
    return Solve(dict(b), products, 1.0, rho, gamma, guard, fallback=True)


def implicit_hypergradient(ft_loss, theta_star: dict, b: dict, gamma: float = 1.0, iterations: int = 5,
                           max_halvings: int = 3, tol: float = 1e-7) -> Solve:
    """Eq. 6: (I + gamma hess L_FT(theta*))^-1 b. ``ft_loss(params) -> scalar`` is L_FT on a fixed
    batch (fixed noise and timesteps: one Hessian for all K iterations). K = 1 spends no product."""
    if iterations == 1:
        return Solve(dict(b), 0, 0.0, 0.0, gamma)
    return richardson(HessianOperator(ft_loss, theta_star), b, gamma, iterations, max_halvings, tol)
