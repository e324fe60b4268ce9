"""ResAlign's hypergradient maths (erasekit/erase/hypergrad.py), pinned against closed forms:
Richardson's iteration (Eq. 7) on quadratics, the Moreau-envelope hypergradient (Eq. 5-6) against
autograd through the closed-form minimiser, the divergence guard at spectral radius >= 1, and
Hessian-vector products by double backward against central finite differences on the tiny UNet."""

import pytest
import torch

from erasekit.erase.hypergrad import HessianOperator, implicit_hypergradient, norm, richardson

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def spd(eigenvalues, seed=0):
    """A symmetric matrix with these eigenvalues (float64) and its eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def split(x):
    """A flat vector as a two-entry dict (the parameters of a model are dicts of tensors)."""
    return {"a": x[:3].reshape(3, 1), "b": x[3:]}


def flat(d):
    return torch.cat([d["a"].reshape(-1), d["b"].reshape(-1)])


def quadratic_hvp(a):
    return lambda v: split(a @ flat(v))


def test_richardson_is_the_neumann_series_and_converges_to_the_inverse():
    a, _ = spd([0.05, 0.2, 0.4, 0.6, 0.8, 0.9])
    b = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gamma = 1.0
    three = richardson(quadratic_hvp(a), split(b), gamma, iterations=3)
    neumann = b - gamma * a @ b + gamma ** 2 * a @ a @ b  # z_3 = sum_{j<3} (-gamma A)^j b
    assert torch.allclose(flat(three.z), neumann, atol=1e-12)
    assert three.products == 2 and three.guard == 0 and not three.fallback
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + gamma * a, b)
    many = richardson(quadratic_hvp(a), split(b), gamma, iterations=300, tol=1e-10)
    assert torch.allclose(flat(many.z), exact, atol=1e-9)
    assert 0.8 < many.rho < 0.9 + 1e-6  # the residual ratio never exceeds rho(gamma A) for a symmetric A
    assert many.residual < 1e-10 and many.products < 299  # stopped once converged
    first = implicit_hypergradient(None, None, split(b), gamma, iterations=1)  # K = 1: first order, no product
    assert torch.equal(flat(first.z), b) and first.products == 0


def test_moreau_hypergradient_matches_autograd_through_the_closed_form():
    """Eq. 5-6 end to end: theta* = argmin 1/2 x'Ax - c'x + ||x - theta||^2 / (2 gamma), closed form
    (A + I/gamma)^-1 (c + theta/gamma); d/dtheta of L_h(theta*) = 1/2 ||theta* - u||^2 by autograd."""
    a, _ = spd([-0.3, 0.1, 0.3, 0.5, 0.7, 1.2])  # indefinite, as a network's Hessian may be
    g = torch.Generator().manual_seed(2)
    c, u = (torch.randn(6, dtype=torch.float64, generator=g) for _ in range(2))
    theta = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    gamma = 0.5  # rho(gamma A) = 0.6
    eye = torch.eye(6, dtype=torch.float64)
    star = torch.linalg.solve(a + eye / gamma, c + theta / gamma)
    (expected,) = torch.autograd.grad(0.5 * ((star - u) ** 2).sum(), theta)

    def ft_loss(p):
        x = flat(p)
        return 0.5 * x @ a @ x - c @ x

    b = split((star - u).detach())  # grad L_h at theta*
    solve = implicit_hypergradient(ft_loss, split(star.detach()), b, gamma, iterations=200, tol=1e-13)
    assert solve.guard == 0 and not solve.fallback
    assert torch.allclose(flat(solve.z), expected, atol=1e-10)
    # and the first-order answer (K = 1) is measurably different: the test can fail
    assert (flat(b) - expected).norm() > 0.1 * expected.norm()


@pytest.mark.parametrize("top", [1.0, 1.5, -1.2])
def test_the_guard_fires_when_the_spectral_radius_reaches_one(top):
    a, q = spd([0.1, 0.2, 0.3, 0.4, 0.5, top])
    b = q[:, -1] + 0.1 * q[:, 0]  # mostly along the eigenvector of `top`
    solve = richardson(quadratic_hvp(a), split(b), gamma=1.0, iterations=40)
    assert solve.guard >= 1 and not solve.fallback and solve.rho >= 1.0 - 1e-9
    assert solve.gamma * abs(top) < 1.0  # halved until the iteration contracts
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + solve.gamma * a, b)
    assert (flat(solve.z) - exact).norm() < 1e-3 * exact.norm()  # then solved for that gamma
    gave_up = richardson(quadratic_hvp(a), split(b), gamma=1.0, iterations=40, max_halvings=0)
    assert gave_up.fallback and gave_up.guard == 1 and torch.equal(flat(gave_up.z), b)  # counted, not silent


def test_the_guard_stays_quiet_below_one():
    a, _ = spd([-0.95, 0.1, 0.5, 0.7, 0.9, 0.97])
    for seed in range(5):
        b = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        solve = richardson(quadratic_hvp(a), split(b), gamma=1.0, iterations=60)
        assert solve.guard == 0 and not solve.fallback and solve.rho < 0.97 + 1e-6


def test_hessian_vector_products_match_finite_differences_on_the_unet():
    from torch.func import functional_call

    from erasekit.toyworld.model import build_toy_pipeline

    unet = build_toy_pipeline(0, tiny=True).unet.double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 600])
    c = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    names = [n for n, _ in unet.named_parameters() if n.endswith(("ff.net.2.weight", "attn2.to_k.weight"))][:3]
    params = {n: p.detach().clone() for n, p in unet.named_parameters() if n in names}
    assert len(params) == 3

    def loss(p):
        return ((functional_call(unet, p, (x, t), {"encoder_hidden_states": c}).sample - eps) ** 2).mean()

    def grad(p):
        p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
        return dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))

    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        hv = HessianOperator(loss, params)(v)
        h = 1e-5
        plus = grad({k: params[k] + h * v[k] for k in params})
        minus = grad({k: params[k] - h * v[k] for k in params})
    fd = {k: (plus[k] - minus[k]) / (2 * h) for k in params}
    assert norm(hv) > 1e-6  # not a trivially zero product
    assert norm({k: hv[k] - fd[k] for k in params}) < 1e-6 * norm(fd)
