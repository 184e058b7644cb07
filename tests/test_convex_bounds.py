"""Soundness of the convex bounds: below sampled/PGD margins, below the triangle LP, tighter than IBP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from attacks.pgd import projected_gradient_descent
from bench.core.data import gather, load_split, select_examples
from bench.core.models import ImageClassifier, Normalize
from bench.core.registry import DATASETS, DEFENSES, MODELS
from bench.execution.training import fit
from bench.core.types import ThreatModel
from defenses.convex.bounds import (METHODS, BoundError, ReLU, intermediate_bounds, linearize,
                                    margin_lower_bounds)

TOL = 1e-6


def random_net(seed: int, kind: str = "conv", batchnorm: bool = False) -> ImageClassifier:
    """A small random float64 ImageClassifier on 1x6x6 images (conv) or 1x2x3 images (mlp)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        stem = nn.Conv2d(1, 4, (2, 3), bias=False)  # a dense layer on 2x3 images, as a conv
        body = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    else:
        stem = nn.Conv2d(1, 3, 3, stride=2, padding=1, bias=False)
        layers = [nn.BatchNorm2d(3)] if batchnorm else []
        body = nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    net = ImageClassifier(Normalize([0.3], [0.7]), stem, body).double().eval()
    if batchnorm:
        bn = body[0]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    return net


def images(seed: int, n: int, shape) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sampled_min_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                        draws: int = 64, restarts: int = 3) -> torch.Tensor:
    """(N, K) min over random and PGD points of the ball of z_y - z_j (an upper bound of the true min)."""
    generator = torch.Generator().manual_seed(0)
    best = None
    points = [threat.random_init(x, generator) for _ in range(draws)]
    points += [projected_gradient_descent(model, x, y, threat=threat, steps=30, restarts=restarts, loss="cw",
                                          generator=generator)]
    points.append(x)
    with torch.no_grad():
        for point in points:
            assert bool(threat.contains(point, x).all())
            logits = model(point)
            margin = logits.gather(1, y[:, None]) - logits
            best = margin if best is None else torch.minimum(best, margin)
    return best


def min_off_label(values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) min over j != y of values (N, K)."""
    return values.scatter(1, y[:, None], float("inf")).min(dim=1).values


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_bounds_below_sampled_margins_on_random_nets(norm, eps, kind):
    shape = (1, 6, 6) if kind == "conv" else (1, 2, 3)
    threat = ThreatModel(norm, eps)
    for seed in range(3):
        net = random_net(seed, kind, batchnorm=seed == 1 and kind == "conv")
        x = images(seed, 8, shape)
        y = net(x).argmax(1)
        observed = sampled_min_margins(net, x, y, threat)
        for method in METHODS:
            bounds = margin_lower_bounds(net, x, y, norm=norm, eps=eps, method=method)
            assert bounds.shape == observed.shape
            assert bool((bounds <= observed + TOL).all()), (method, seed, (bounds - observed).max().item())


@pytest.mark.parametrize("method", METHODS)
def test_zero_eps_gives_exact_margins(method):
    net = random_net(4, "conv", batchnorm=True)
    x = images(4, 5, (1, 6, 6))
    y = torch.arange(5) % 4
    logits = net(x)
    exact = logits.gather(1, y[:, None]) - logits
    for norm in ("linf", "l2"):
        bounds = margin_lower_bounds(net, x, y, norm=norm, eps=0.0, method=method)
        torch.testing.assert_close(bounds, exact.detach(), atol=1e-9, rtol=0)


def dense_affine(layer, in_shape) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of an affine layer on flattened inputs, read off by applying it to a basis."""
    size = int(np.prod(in_shape))
    with torch.no_grad():
        basis = torch.eye(size, dtype=torch.float64).view(size, *in_shape)
        zero = torch.zeros(1, *in_shape, dtype=torch.float64)
        bias = layer.forward(zero).flatten(1)
        weight = (layer.forward(basis).flatten(1) - bias).T
    return weight.numpy(), bias[0].numpy()


def triangle_lp(layers, shapes, pre, x: torch.Tensor, eps: float, c: np.ndarray) -> float:
    """min c . logits over the L-inf ball intersected with [0,1] under the triangle ReLU relaxation.

    Variables are every layer's output (flattened); pre-activation bounds (l, u) come from `pre`
    and also bound the ReLU inputs, as in Wong & Kolter (2018), eq. (3).
    """
    x0 = x.flatten().numpy()
    with torch.no_grad():
        out = x[None]
        for layer in layers:
            out = layer.forward(out)
    # Block k holds the input of layer k; the last block holds the logits.
    sizes = [int(np.prod(shape)) for shape in shapes] + [out.numel()]
    offsets = np.cumsum([0] + sizes)
    total = int(offsets[-1])
    bounds = [(None, None)] * total
    for i in range(sizes[0]):
        bounds[i] = (max(x0[i] - eps, 0.0), min(x0[i] + eps, 1.0))
    eq_rows, eq_rhs, ub_rows, ub_rhs = [], [], [], []
    for k, layer in enumerate(layers):
        src, dst = offsets[k], offsets[k + 1]
        if isinstance(layer, ReLU):
            low, high = (t[0].flatten().detach().numpy() for t in pre[k])
            for i in range(sizes[k]):
                z, a = src + i, dst + i
                bounds[z] = (low[i], high[i])
                if low[i] >= 0 or high[i] <= 0:
                    row = np.zeros(total)
                    row[a] = 1.0
                    if low[i] >= 0:
                        row[z] = -1.0
                    eq_rows.append(row)
                    eq_rhs.append(0.0)
                    continue
                slope = high[i] / (high[i] - low[i])
                for coeffs, rhs in (({a: -1.0}, 0.0), ({a: -1.0, z: 1.0}, 0.0),
                                    ({a: 1.0, z: -slope}, -slope * low[i])):
                    row = np.zeros(total)
                    for index, value in coeffs.items():
                        row[index] = value
                    ub_rows.append(row)
                    ub_rhs.append(rhs)
        else:
            weight, bias = dense_affine(layer, shapes[k])
            block = np.zeros((weight.shape[0], total))
            block[:, src:src + sizes[k]] = weight
            block[:, dst:dst + weight.shape[0]] -= np.eye(weight.shape[0])
            eq_rows.extend(block)
            eq_rhs.extend(-bias)
    objective = np.zeros(total)
    objective[offsets[-2]:offsets[-1]] = c
    result = linprog(objective, A_ub=np.array(ub_rows) if ub_rows else None, b_ub=ub_rhs or None,
                     A_eq=np.array(eq_rows), b_eq=eq_rhs, bounds=bounds, method="highs")
    assert result.status == 0, result.message
    return float(result.fun)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_bounds_below_triangle_lp_below_sampled_minimum(kind):
    shape = (1, 2, 3) if kind == "mlp" else (1, 6, 6)
    eps = 0.1 if kind == "mlp" else 0.03
    threat = ThreatModel("linf", eps)
    for seed in range(2):
        net = random_net(10 + seed, kind)
        layers = linearize(net)
        x = images(seed, 2, shape)
        y = net(x).argmax(1)
        observed = sampled_min_margins(net, x, y, threat)
        classes = observed.shape[1]
        for method in METHODS:
            bounds = margin_lower_bounds(layers, x, y, norm="linf", eps=eps, method=method)
            for n in range(len(x)):
                pre, shapes, _ = intermediate_bounds(layers, x[n:n + 1], norm="linf", eps=eps, method=method)
                for j in range(classes):
                    if j == int(y[n]):
                        continue
                    c = np.zeros(classes)
                    c[int(y[n])], c[j] = 1.0, -1.0
                    lp = triangle_lp(layers, shapes, pre, x[n], eps, c)
                    assert float(bounds[n, j].detach()) <= lp + TOL, (method, seed, n, j)
                    assert lp <= float(observed[n, j]) + TOL, (method, seed, n, j)


def test_crown_and_wong_tighter_than_ibp_on_average():
    threat = ThreatModel("linf", 0.03)
    gaps = {method: [] for method in METHODS}
    for seed in range(6):
        net = random_net(20 + seed, "conv")
        x = images(seed, 16, (1, 6, 6))
        y = net(x).argmax(1)
        observed = min_off_label(sampled_min_margins(net, x, y, threat, draws=16), y)
        for method in METHODS:
            bound = min_off_label(margin_lower_bounds(net, x, y, norm="linf", eps=0.03, method=method), y)
            gaps[method].append((observed - bound).detach())
    mean_gap = {method: torch.cat(values).mean().item() for method, values in gaps.items()}
    print("mean gap to the PGD margin on random nets (linf 0.03):",
          ", ".join(f"{m} {g:.4f}" for m, g in mean_gap.items()))
    assert all(g >= -TOL for g in mean_gap.values())
    assert mean_gap["crown"] < mean_gap["ibp"]
    assert mean_gap["wong"] < mean_gap["ibp"]


def test_autocast_is_refused():
    net = random_net(0, "conv").float()
    x = images(0, 2, (1, 6, 6)).float()
    y = torch.zeros(2, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(BoundError, match="autocast"):
        margin_lower_bounds(net, x, y, norm="linf", eps=0.1, method="crown")


def test_only_float32_and_float64():
    net = random_net(0, "conv")
    y = torch.zeros(2, dtype=torch.long)
    x = images(0, 2, (1, 6, 6))
    assert margin_lower_bounds(net.float(), x.float(), y, norm="linf", eps=0.1).dtype == torch.float32
    assert margin_lower_bounds(net.double(), x, y, norm="linf", eps=0.1).dtype == torch.float64
    with pytest.raises(BoundError, match="float32 or float64"):
        margin_lower_bounds(net.half(), x.half(), y, norm="linf", eps=0.1)
    with pytest.raises(BoundError, match="dtype"):
        margin_lower_bounds(net.double(), x.float(), y, norm="linf", eps=0.1)


def test_unsupported_layers_and_noise_are_refused():
    net = random_net(0, "conv")
    net.noise = nn.Dropout(0.5)  # any non-identity noise slot is randomized
    with pytest.raises(BoundError, match="noise"):
        linearize(net)
    with pytest.raises(BoundError, match="MaxPool2d"):
        linearize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)))
    bn_net = random_net(0, "conv", batchnorm=True).train()
    with pytest.raises(BoundError, match="eval mode"):
        linearize(bn_net)


def test_wk_models_are_image_classifiers():
    for name in ("wk_small", "wk_large"):
        for shape in ((1, 28, 28), (3, 32, 32)):
            net = MODELS.get(name)(shape, 10)
            assert isinstance(net, ImageClassifier)
            assert net(torch.rand(2, *shape)).shape == (2, 10)
            assert net.stem.bias is None
            assert len(linearize(net)) > 5


@pytest.fixture(scope="module")
def smoke_convex():
    """The smoke profile's convex defense, briefly trained (CROWN-IBP, L-inf 0.1) on mnist5k."""
    spec = DATASETS.get("mnist5k")
    defense = DEFENSES.get("wong_kolter")(spec, norm="linf", eps=0.1, bound="crown_ibp", steps=60, batch_size=32,
                                          lr=2e-3, bisection_steps=5)
    torch.manual_seed(0)
    model = defense.build_model()
    fit(defense, model, load_split("mnist5k", "train"), steps=60, seed=0, device=torch.device("cpu"), progress=False)
    defense.attach(model)
    test = load_split("mnist5k", "test")
    x, y = gather(test, select_examples(test, 40, seed=0))
    return defense, x, y


@pytest.mark.slow
def test_bounds_sound_on_trained_smoke_model(smoke_convex):
    defense, x, y = smoke_convex
    threat = ThreatModel("linf", 0.1)
    for method, n in (("ibp", 40), ("crown_ibp", 40), ("wong", 3), ("crown", 2)):
        observed = sampled_min_margins(defense.model, x[:n], y[:n], threat, draws=16, restarts=2)
        bounds = margin_lower_bounds(defense.model, x[:n], y[:n], norm="linf", eps=0.1, method=method)
        assert bool((bounds <= observed + 1e-4).all()), method


@pytest.mark.slow
def test_certified_radius_resists_pgd(smoke_convex):
    defense, x, y = smoke_convex
    pred, radius = defense.certify(x)
    assert pred.shape == radius.shape == (len(x),)
    assert bool((radius >= 0).all()) and bool((radius <= defense.radius_max).all())
    assert (radius > 0).float().mean() > 0.5  # the trained model certifies most points at some radius
    for i in torch.nonzero(radius > 0).flatten()[:10].tolist():
        threat = ThreatModel("linf", float(radius[i]))
        x_adv = projected_gradient_descent(defense.model, x[i:i + 1], pred[i:i + 1], threat=threat, steps=30,
                                           restarts=2, generator=torch.Generator().manual_seed(i))
        assert int(defense.predict(x_adv)[0]) == int(pred[i])
    _, flags = defense.certified_at(x, eps=0.0)
    assert bool(flags.all())


# ---------------------------------------------------------------------------------------------
# The fast paths (patches for convolutional prefixes, chunking) against plain references.
# ---------------------------------------------------------------------------------------------

def wk_mnist_net(seed: int, size: int = 28) -> nn.Sequential:
    """conv16(4,s2,p1)-conv32(4,s2,p1)-fc100-fc10 (the Wong & Kolter MNIST net) on size x size inputs, float64."""
    torch.manual_seed(seed)
    flat = 32 * (size // 4) ** 2
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, 10)).double().eval()


def explicit_wong_margins(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> np.ndarray:
    """(N, K) Wong-Kolter lower bounds of z_y - z_j from explicit dense matrices (eqs. 6-10 of the paper).

    Every affine layer is read off as a matrix; each ReLU's pre-activation bounds come from the
    identity propagated backwards through the matrices (u/(u-l) slopes, -u l/(u-l) intercepts on
    the unstable neurons); the input set is the L-inf ball intersected with [0,1].
    """
    layers = linearize(net)
    with torch.no_grad():
        shapes = []
        h = x[:1]
        for layer in layers:
            shapes.append(tuple(h.shape[1:]))
            h = layer.forward(h)
    ops = ["relu" if isinstance(layer, ReLU) else dense_affine(layer, shapes[i]) for i, layer in enumerate(layers)]
    classes = h.shape[1]
    out = np.zeros((len(x), classes))
    for n in range(len(x)):
        x0 = x[n].flatten().numpy()
        low_x, high_x = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
        lines: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def bounds(rows: np.ndarray, upto: int, lines=lines, low_x=low_x,
                   high_x=high_x) -> tuple[np.ndarray, np.ndarray]:
            a, const, icpt_lo, icpt_hi = rows, np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
            for j in range(upto - 1, -1, -1):
                if isinstance(ops[j], str):
                    slope, icpt = lines[j]
                    icpt_lo += np.minimum(a, 0) @ icpt
                    icpt_hi += np.maximum(a, 0) @ icpt
                    a = a * slope
                else:
                    weight, bias = ops[j]
                    const += a @ bias
                    a = a @ weight
            mid, rad = (low_x + high_x) / 2, (high_x - low_x) / 2
            return a @ mid - np.abs(a) @ rad + const + icpt_lo, a @ mid + np.abs(a) @ rad + const + icpt_hi

        for j, op in enumerate(ops):
            if isinstance(op, str):
                low, high = bounds(np.eye(int(np.prod(shapes[j]))), j)
                unstable = (low < 0) & (high > 0)
                slope = np.where(low >= 0, 1.0, np.where(unstable, high / np.where(unstable, high - low, 1), 0.0))
                lines[j] = (slope, np.where(unstable, -slope * low, 0.0))
        spec = np.eye(classes)[int(y[n])] - np.eye(classes)
        out[n] = bounds(spec, len(ops))[0]
    return out


def test_wong_matches_explicit_dual_on_the_mnist_architecture():
    """float64 to 1e-9 and float32 to 1e-5 (relative) of the explicit dense dual, on 12x12 and 28x28 inputs."""
    for seed, size, n in ((0, 12, 6), (1, 12, 6), (2, 28, 1)):
        net = wk_mnist_net(seed, size)
        x = images(seed, n, (1, size, size))
        y = net(x).argmax(1)
        eps = 0.1 if size == 28 else 0.05
        reference = explicit_wong_margins(net, x, y, eps)
        scale = np.abs(reference).max()
        ours = margin_lower_bounds(net, x, y, norm="linf", eps=eps, method="wong").detach().numpy()
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9 * scale)
        single = margin_lower_bounds(net.float(), x.float(), y, norm="linf", eps=eps, method="wong").detach().numpy()
        np.testing.assert_allclose(single, reference, rtol=0, atol=1e-5 * scale)


def test_mnist_architecture_bounds_below_sampled_points():
    """No point of the ball (random, vertices, PGD) has a margin below any method's bound (28x28, eps 0.1)."""
    threat = ThreatModel("linf", 0.1)
    for seed in range(2):
        net = wk_mnist_net(10 + seed)
        x = images(seed, 4, (1, 28, 28))
        y = net(x).argmax(1)
        observed = sampled_min_margins(net, x, y, threat, draws=32, restarts=1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(32):  # vertices of the box, where linear pieces take their extremes
                signs = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.float64) * 2 - 1
                logits = net((x + 0.1 * signs).clamp(0, 1))
                observed = torch.minimum(observed, logits.gather(1, y[:, None]) - logits)
        for method in METHODS:
            bounds = margin_lower_bounds(net, x, y, norm="linf", eps=0.1, method=method)
            assert bool((bounds <= observed + TOL).all()), (method, seed, (bounds - observed).max().item())


def odd_conv_net(seed: int, variant: int) -> nn.Module:
    """Random conv nets whose windows hit padding, floor-rounded strides, dilation and affine layers mid-way."""
    torch.manual_seed(seed)
    if variant == 0:  # 13x13: strided convs round down; batch norm after a ReLU (a ChannelAffine with a shift)
        bn = nn.BatchNorm2d(4)
        convs = [nn.Conv2d(2, 4, 3, stride=1, padding=1), nn.ReLU(), bn, nn.Conv2d(4, 5, 4, stride=2, padding=1),
                 nn.ReLU(), nn.Conv2d(5, 3, 3, stride=2, padding=0)]
        shape = (2, 13, 13)
    else:  # 11x10: dilation, a 5x5 padding-2 kernel, a bias-free conv
        bn = None
        convs = [nn.Conv2d(2, 3, 5, stride=1, padding=2), nn.ReLU(),
                 nn.Conv2d(3, 4, 3, stride=1, padding=2, dilation=2), nn.ReLU(),
                 nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)]
        shape = (2, 11, 10)
    features = nn.Sequential(*convs)
    with torch.no_grad():
        flat = features(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(Normalize([0.4, 0.5], [0.3, 0.6]), features, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 6),
                        nn.ReLU(), nn.Linear(6, 4)).double().eval()
    if bn is not None:
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.3, 0.3)
    net.input_shape = shape
    return net


@pytest.mark.parametrize("variant", [0, 1])
def test_patches_equal_dense_identity(variant, monkeypatch):
    """Patches give the dense identity's bounds and gradients, for every method and both norms."""
    import defenses.convex.bounds as bounds_module

    net = odd_conv_net(variant, variant)
    x = images(variant, 5, net.input_shape)
    y = net(x).argmax(1)
    layers = linearize(net)
    shapes, _ = bounds_module._input_shapes(layers, x)
    relus = [k for k, layer in enumerate(layers) if isinstance(layer, ReLU)]
    assert all(bounds_module._patch_windows(layers, shapes, k) is not None for k in relus[1:-1])  # all but the FC's

    def run(method, norm):
        net.zero_grad()
        bounds = margin_lower_bounds(net, x, y, norm=norm, eps=0.05 if norm == "linf" else 0.3, method=method)
        bounds.sum().backward()
        return bounds.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    cases = [(method, norm) for method in ("wong", "crown") for norm in ("linf", "l2")]
    fast = {case: run(*case) for case in cases}
    monkeypatch.setattr(bounds_module, "_patch_windows", lambda *args: None)
    for case in cases:
        bounds, grads = run(*case)
        torch.testing.assert_close(fast[case][0], bounds, rtol=1e-10, atol=1e-10)
        for fast_grad, grad in zip(fast[case][1], grads, strict=True):
            torch.testing.assert_close(fast_grad, grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["wong", "crown"])
def test_chunks_give_the_unchunked_bounds(method, monkeypatch):
    """Splitting identity specifications into many chunks (positions for patches, rows for dense) changes nothing."""
    import defenses.convex.bounds as bounds_module

    for net, shape in ((wk_mnist_net(3, 12), (1, 12, 12)), (odd_conv_net(4, 0), (2, 13, 13))):
        x = images(3, 3, shape)
        y = net(x).argmax(1)
        whole = margin_lower_bounds(net, x, y, norm="linf", eps=0.05, method=method)
        monkeypatch.setattr(bounds_module, "CHUNK_BYTES", 1)  # one position / one row per chunk
        chunked = margin_lower_bounds(net, x, y, norm="linf", eps=0.05, method=method)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
