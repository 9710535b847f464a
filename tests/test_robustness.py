"""PGD attacks and accuracy under attack (genrep.eval.metrics.robustness, genrep.eval.protocols.robustness)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line, tiny_config
from PIL import Image
from torch import nn

from genrep.data.datasets import load_dataset
from genrep.errors import GenrepError
from genrep.config import EvalConfig, build_dataclass
from genrep.eval.metrics.robustness import L2_EPS, LINF_EPS, _random_start, pgd_attack, pgd_robust
from genrep.eval.protocols.robustness import robust_accuracy
from genrep.eval.report.figures import robustness_figure
from genrep.runs import build_for_data


class Linear2(nn.Module):
    """Binary linear classifier with logits [0, w.x]: the CE gradient w.r.t. x is +-w, known in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        s = x.flatten(1) @ self.w
        return torch.stack([torch.zeros_like(s), s], dim=1)


class TinyNet(nn.Module):
    capabilities = frozenset({"logits"})

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3))

    def logits(self, x):
        return self.net(x * 2 - 1)


@pytest.fixture(scope="module")
def vit_and_data():
    """A tiny supervised ViT whose head is a least-squares fit on its random features: clean accuracy
    well above chance (~60 %) in a fraction of a second, without a training loop."""
    train = load_dataset("digits", "train", image_size=8)
    test = load_dataset("digits", "test", image_size=8)
    method = build_for_data(tiny_config("supervised"), train).eval()
    with torch.no_grad():
        f = method.features(train.images.float() / 255, pool="cls")
        f = torch.cat([f, torch.ones(len(f), 1)], dim=1)
        target = F.one_hot(train.labels, train.num_classes).float() * 4 - 2
        sol = torch.linalg.lstsq(f, target).solution
        method.head.weight.copy_(sol[:-1].T)
        method.head.bias.copy_(sol[-1])
    return method, test.images[:48], test.labels[:48]


def test_default_eps_lists_are_the_papers():
    assert [round(e * 255) for e in LINF_EPS] == [1, 2, 4, 8, 12, 16, 22, 30]
    assert [round(e * 255) for e in L2_EPS] == [50, 100, 150, 200, 250, 300, 350, 400]


def test_eps_zero_is_clean_accuracy_and_mode_restored(vit_and_data):
    method, images, labels = vit_and_data
    method.eval()
    with torch.no_grad():
        clean = int((method.logits(images.float() / 255).argmax(1) == labels).sum()) / len(labels)
    assert 0.3 < clean < 1.0
    method.train()
    for p in method.parameters():
        p.grad = None
    acc = robust_accuracy(method, images, labels, norm="linf", eps_list=[0.0, 8 / 255, 30 / 255], steps=3,
                          batch_size=48)
    assert list(acc) == ["0.0", str(8 / 255), str(30 / 255)]
    assert acc["0.0"] == clean
    assert acc[str(30 / 255)] <= acc[str(8 / 255)] <= clean
    assert acc[str(30 / 255)] < clean            # the attack does something
    assert method.training                        # previous mode back
    assert all(p.grad is None for p in method.parameters())
    acc2 = robust_accuracy(method, images, labels, norm="l2", eps_list=[0], steps=1, batch_size=20)
    assert acc2 == {"0.0": clean}


def test_robust_accuracy_seeded_and_default_list(vit_and_data):
    method, images, labels = vit_and_data
    a = robust_accuracy(method, images[:16], labels[:16], norm="l2", steps=1, batch_size=16, seed=3)
    b = robust_accuracy(method, images[:16], labels[:16], norm="L2", steps=1, batch_size=16, seed=3)
    assert a == b
    assert [float(k) for k in a] == [0.0, *L2_EPS]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_stays_in_ball_and_box(norm):
    net = TinyNet().eval()
    x = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0
    x[1] = 1.0                                    # box constraints bind at the edges
    y = torch.arange(10) % 3
    eps = 0.1 if norm == "linf" else 0.5
    x_adv = pgd_attack(net.logits, x, y, norm=norm, eps=eps, steps=5, step_size=eps,
                       generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps + 1e-5).all()
    assert delta.abs().max() > 0
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_linf_reaches_the_analytic_worst_case():
    # CE of label 0 grows with w.x, of label 1 falls: the worst case in the L-inf ball is x +- eps*sign(w)
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))
    model = Linear2(w)
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 0, 1])
    eps = 0.1
    x_adv = pgd_attack(model, x, y, norm="linf", eps=eps, steps=10, generator=torch.Generator().manual_seed(5))
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1)
    expected = x.flatten(1) + eps * sign * w.sign()
    torch.testing.assert_close(x_adv.flatten(1), expected, atol=1e-6, rtol=0)
    # one step of size eps from the clean point lands on the same corner (FGSM)
    fgsm = pgd_attack(model, x, y, norm="linf", eps=eps, steps=1, step_size=eps, start="none")
    torch.testing.assert_close(fgsm.flatten(1), expected, atol=1e-6, rtol=0)
    assert model.w.grad is None


def test_l2_reaches_the_analytic_worst_case():
    w = torch.randn(16, generator=torch.Generator().manual_seed(1))
    model = Linear2(w)
    x = torch.full((2, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1])
    eps = 0.3
    u = w / w.norm()
    expected = x.flatten(1) + eps * torch.stack([u, -u])
    # steps of 2 eps shrink the off-direction part of the random start at least geometrically
    x_adv = pgd_attack(model, x, y, norm="l2", eps=eps, steps=20, step_size=2 * eps,
                       generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_adv.flatten(1), expected, atol=1e-5, rtol=0)
    # the default step (2.5 eps / steps) ends on the sphere, close to the worst direction
    delta = (pgd_attack(model, x, y, norm="l2", eps=eps, generator=torch.Generator().manual_seed(2)) - x).flatten(1)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((2,), eps))
    assert ((delta * torch.stack([u, -u])).sum(1) / eps > 0.95).all()
    fgm = pgd_attack(model, x, y, norm="l2", eps=eps, steps=1, step_size=eps, start="none")
    torch.testing.assert_close(fgm.flatten(1), expected, atol=1e-6, rtol=0)


def test_random_start_is_seeded():
    net = TinyNet().eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(6, dtype=torch.long)
    for norm in ("linf", "l2"):
        for start in ("uniform", "radius"):
            kw = dict(norm=norm, eps=0.05, steps=1, step_size=1e-3, start=start)
            a = pgd_attack(net.logits, x, y, generator=torch.Generator().manual_seed(7), **kw)
            b = pgd_attack(net.logits, x, y, generator=torch.Generator().manual_seed(7), **kw)
            c = pgd_attack(net.logits, x, y, generator=torch.Generator().manual_seed(8), **kw)
            assert torch.equal(a, b)
            assert not torch.equal(a, c)


def test_l2_starts_uniform_in_the_ball_or_at_a_uniform_radius():
    # in d dimensions a uniform point of the ball lies at radius eps * U^(1/d), mean eps * d / (d + 1); the
    # paper's code draws the radius itself uniform, mean eps / 2
    x = torch.full((4000, 1, 4, 4), 0.5)
    eps = 0.2
    g = torch.Generator().manual_seed(0)
    ball = _random_start(x, "l2", eps, "uniform", g).flatten(1).norm(dim=1)
    radius = _random_start(x, "l2", eps, "radius", g).flatten(1).norm(dim=1)
    assert ball.max() <= eps + 1e-6 and radius.max() <= eps + 1e-6
    assert abs(float(ball.mean()) - eps * 16 / 17) < 0.01 * eps
    assert abs(float(radius.mean()) - eps / 2) < 0.02 * eps
    # L-inf: both are uniform in the cube
    cube = _random_start(x, "linf", eps, "radius", g)
    assert cube.abs().max() <= eps and abs(float(cube.abs().mean()) - eps / 2) < 0.01 * eps


class Scripted(nn.Module):
    """Logits that ignore the image (zero gradient, so PGD stays put) and follow a script, one row per call:
    lets a test say which forward pass of the attack sees a wrong class."""

    def __init__(self, script):
        super().__init__()
        self.script = [torch.tensor(row, dtype=torch.float32) for row in script]
        self.calls = 0

    def forward(self, x):
        row = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return x.flatten(1).sum(1, keepdim=True) * 0 + row


def test_every_iterate_counts_a_break_in_the_middle_that_the_final_iterate_hides():
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    right, wrong = [2.0, 0.0], [0.0, 2.0]
    # steps=2: forwards of iterate 0 and iterate 1 (with their gradients), then the final iterate, then the clean image
    script = [right, wrong, right, right]
    kw = dict(norm="linf", eps=0.1, steps=2, generator=torch.Generator().manual_seed(0))
    assert bool(pgd_robust(Scripted(script), x, y, criterion="final", **kw))
    assert not bool(pgd_robust(Scripted(script), x, y, criterion="every_iterate", **kw))
    # a misclassified clean image is never robust under every_iterate, even if the attack "fixes" it
    assert not bool(pgd_robust(Scripted([right, right, right, wrong]), x, y, criterion="every_iterate", **kw))
    assert bool(pgd_robust(Scripted([right] * 4), x, y, criterion="every_iterate", **kw))


@pytest.mark.parametrize("norm, eps", [("linf", [0, 2 / 255, 8 / 255, 30 / 255]), ("l2", [0, 50 / 255, 200 / 255])])
def test_every_iterate_is_clean_at_eps_zero_and_never_above_the_final_iterate(vit_and_data, norm, eps):
    method, images, labels = vit_and_data
    with torch.no_grad():
        clean = int((method.logits(images.float() / 255).argmax(1) == labels).sum()) / len(labels)
    # the paper's attack: a fixed step of 20/255, its start, 5 steps here (50 in the paper) to stay fast
    kw = dict(norm=norm, eps_list=eps, steps=5, step_size=20 / 255, start="radius", batch_size=48, seed=1)
    final = robust_accuracy(method, images, labels, criterion="final", **kw)
    every = robust_accuracy(method, images, labels, criterion="every_iterate", **kw)
    assert final["0.0"] == every["0.0"] == clean
    assert all(every[k] <= final[k] for k in final)
    assert every[str(eps[-1])] < clean
    # per image, on the same attack (same seed): robust on every iterate implies robust on the final one
    x, y = images.float() / 255, labels
    for e in eps:
        a = pgd_robust(method.logits, x, y, norm=norm, eps=e, steps=5, step_size=20 / 255, start="radius",
                       criterion="final", generator=torch.Generator().manual_seed(3))
        b = pgd_robust(method.logits, x, y, norm=norm, eps=e, steps=5, step_size=20 / 255, start="radius",
                       criterion="every_iterate", generator=torch.Generator().manual_seed(3))
        assert not (b & ~a).any()


def test_robustness_settings_refuse_bad_values_in_one_line():
    for section, fragment in [({"criterion": "best"}, "eval.robustness.criterion 'best' is unknown; choose final, "
                                                      "every_iterate"),
                              ({"start": "gauss"}, "eval.robustness.start 'gauss' is unknown; choose uniform, radius, none"),
                              ({"step_size": 0}, "eval.robustness.step_size must be above 0, got 0"),
                              ({"step_size": -20}, "eval.robustness.step_size must be above 0"),
                              ({"steps": 0}, "eval.robustness.steps must be at least 1, got 0")]:
        with pytest.raises(GenrepError) as e:
            build_dataclass(EvalConfig, {"robustness": section}, "eval")
        assert fragment in one_line(e)
    paper = build_dataclass(EvalConfig, {"robustness": {"steps": 50, "step_size": 20, "start": "radius",
                                                        "criterion": "every_iterate"}}, "eval").robustness
    assert (paper.steps, paper.step_size, paper.start, paper.criterion) == (50, 20, "radius", "every_iterate")
    assert build_dataclass(EvalConfig, {"robustness": {"step_size": None}}, "eval").robustness.step_size is None


def test_eps_zero_returns_the_input_exactly():
    net = TinyNet().eval()
    x = torch.rand(3, 3, 4, 4)
    out = pgd_attack(net.logits, x, torch.zeros(3, dtype=torch.long), norm="l2", eps=0, steps=4)
    assert torch.equal(out, x) and out is not x


def test_bad_arguments_are_one_line_errors():
    net = TinyNet().eval()
    x, y = torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    for kw, fragment in [({"norm": "l1", "eps": 0.1}, "norm"), ({"norm": "linf", "eps": -0.1}, "eps"),
                         ({"norm": "linf", "eps": 0.1, "steps": 0}, "steps"),
                         ({"norm": "linf", "eps": 0.1, "step_size": 0.0}, "step_size"),
                         ({"norm": "linf", "eps": 0.1, "start": "gauss"}, "start")]:
        with pytest.raises(GenrepError) as e:
            pgd_attack(net.logits, x, y, **kw)
        assert fragment in one_line(e)
    with pytest.raises(GenrepError) as e:
        pgd_attack(net.logits, x * 255, y, norm="linf", eps=0.1)
    assert "[0, 1]" in one_line(e)
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(GenrepError) as e:
        robust_accuracy(net, images, y, norm="linf", eps_list=[-1.0])
    assert "eps" in one_line(e)
    with pytest.raises(GenrepError) as e:
        robust_accuracy(net, images, y, norm="linf", eps_list=[])
    one_line(e)
    with pytest.raises(GenrepError) as e:
        robust_accuracy(net, images.float(), y, norm="linf")
    assert "uint8" in one_line(e)
    with pytest.raises(GenrepError) as e:
        robust_accuracy(net, images, y, norm="linf", criterion="best")
    assert "criterion" in one_line(e) and "every_iterate" in one_line(e)


def test_method_without_classifier_head_is_refused():
    train = load_dataset("digits", "test", image_size=8)
    genvit = build_for_data(tiny_config("genvit"), train)
    with pytest.raises(GenrepError) as e:
        robust_accuracy(genvit, train.images[:4], train.labels[:4], norm="linf")
    assert "classifier head" in one_line(e)


def test_robustness_figure(tmp_path):
    results = {"linf": {"0.0": 0.9, str(8 / 255): 0.3, str(30 / 255): 0.0},
               "l2": {"vit": {0.0: 0.9, 100 / 255: 0.2}, "hybvit": {0.0: 0.8, 100 / 255: 0.4}}}
    path = robustness_figure(results, tmp_path / "robust.png", title="digits")
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(GenrepError) as e:
        robustness_figure({"l3": {0.0: 1.0}}, tmp_path / "bad.png")
    one_line(e)
