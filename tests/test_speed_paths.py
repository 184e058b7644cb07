"""GPU-speed code paths checked on the CPU: fp32 noise under bf16 bodies, exact pre-noise, sync-free
bookkeeping with the old results, device-resident batches equal to today's, and the speed profile keys."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from attacks.cw import carlini_wagner_l2
from attacks.pgd import projected_gradient_descent
from bench.execution.cache import ModelCache
from bench.cli.commands import main
from bench.profile.config import ConfigError, parse_profile
from bench.core.data import gather
from bench.core.data.torchvision_sets import ImageTensorDataset
from bench.execution.runner import keyed
from bench.core.models import build_model
from bench.core.registry import DATASETS
from bench.execution.runner import batch_records
from bench.profile.speed import apply_speed
from bench.execution.training import LoaderOptions, batches, fit
from bench.core.types import Record, ThreatModel, derive_seed
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.noise import NoiseLayer
from defenses.undefended import Undefended
from test_cw import Linear

MNIST = DATASETS.get("mnist5k")


# ----------------------------------------------------------------------------- noise and pre-noise
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_noise_is_drawn_in_float32_for_bf16_activations(mechanism):
    layer = NoiseLayer(mechanism, 0.7)
    h32 = torch.rand(3, 4, 5, 5)
    h16 = h32.to(torch.bfloat16)
    layer.generator = torch.Generator().manual_seed(4)
    reference = layer.sample(h32.shape, h32)
    layer.generator = torch.Generator().manual_seed(4)
    drawn = layer.sample(h16.shape, h16)
    assert drawn.dtype == torch.float32
    assert torch.equal(drawn, reference)  # the same float32 draw, not a rounded bf16 one
    layer.generator = torch.Generator().manual_seed(4)
    noisy = layer(h16)
    assert noisy.dtype == torch.float32
    assert torch.equal(noisy, reference + h16.float())
    layer.generator = torch.Generator().manual_seed(4)
    copies = layer.replicate(h16, 3)
    assert copies.dtype == torch.float32 and copies.shape == (9, 4, 5, 5)
    # float64 activations keep float64 noise (never narrower than the activations).
    assert layer.sample(h32.shape, h32.double()).dtype == torch.float64


def _pixeldp_model(seed: int = 0):
    torch.manual_seed(seed)
    defense = PixelDP(MNIST, L=0.3, arch="cnn_small", steps=1)
    return defense, defense.build_model().eval()


def test_bf16_body_keeps_stem_and_noise_in_float32():
    _, model = _pixeldp_model()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    exact_h = model.pre_noise(x)
    seen = {}
    # (Hooks that return None: a returned value would replace the module's input or output.)
    model.body[1].register_forward_pre_hook(lambda _m, args: seen.update(body_input=args[0].dtype))
    model.noise.register_forward_hook(lambda _m, _args, out: seen.update(noise_output=out.dtype))
    assert apply_speed(model, {"autocast": "bf16", "channels_last": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even a caller's autocast does not reach the stem
        h = model.pre_noise(x)
    assert h.dtype == torch.float32 and torch.equal(h, exact_h)
    model.noise.generator = torch.Generator().manual_seed(2)
    logits = model(x)
    assert logits.dtype == torch.float32
    assert seen["noise_output"] == torch.float32  # noise drawn and added in float32
    assert seen["body_input"] == torch.float32  # the noisy activations reach the body unrounded
    exact = copy.deepcopy(model)
    exact.body_autocast, exact.body_channels_last = None, False
    model.noise.generator = torch.Generator().manual_seed(2)
    exact.noise.generator = torch.Generator().manual_seed(2)
    assert torch.allclose(model(x), exact(x), rtol=0.05, atol=0.05)  # bf16 rounding only


def test_speed_settings_keep_gradients_float32_and_checkpoints_plain(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 28, 28), 10).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(3), requires_grad=True)
    exact = model(x)
    fast = copy.deepcopy(model)
    assert apply_speed(fast, {"channels_last": True})
    assert fast.stem.weight.is_contiguous(memory_format=torch.channels_last)  # no noise: the whole model
    assert torch.allclose(fast(x), exact, atol=1e-5)
    assert apply_speed(fast, {"autocast": "bf16", "channels_last": True})
    logits = fast(x)
    grad, = torch.autograd.grad(logits.sum(), x)
    assert logits.dtype == torch.float32 and grad.dtype == torch.float32
    cache = ModelCache(tmp_path)
    config = {"dataset": "mnist5k", "defense": "undefended"}
    path = cache.path(config, "code")
    cache.save(fast, path, config, {})
    loaded = build_model("cnn_small", (1, 28, 28), 10)
    assert cache.load(loaded, path)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name])


# ----------------------------------------------------------------------------- sync-free bookkeeping
def _old_batch_records(indices, y, pred, adv_pred, norms, radius, seconds, passes):
    """The per-element conversion the runner used before (one device sync per value)."""
    def radius_of(i):
        return None if radius is None or math.isnan(float(radius[i])) else float(radius[i])

    def seconds_of(i):
        return float(seconds[i]) if isinstance(seconds, torch.Tensor) else seconds

    return [Record(index=int(indices[i]), label=int(y[i]), clean_pred=int(pred[i]), adv_pred=int(adv_pred[i]),
                   norm=float(norms[i]), radius=radius_of(i), seconds=seconds_of(i),
                   forward_passes=passes) for i in range(len(y))]


@pytest.mark.parametrize("radius_dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("per_row_seconds", [False, True])
def test_batch_records_equal_the_per_element_conversion(radius_dtype, per_row_seconds):
    g = torch.Generator().manual_seed(0)
    n = 7
    indices, y = torch.randperm(50, generator=g)[:n], torch.randint(0, 10, (n,), generator=g)
    pred, adv = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (n,), generator=g)
    norms = torch.rand(n, generator=g) * 3
    norms[2] = math.inf
    radius = None
    if radius_dtype is not None:
        radius = torch.rand(n, generator=g, dtype=radius_dtype) / 3
        radius[1] = math.nan
    seconds = torch.rand(n, dtype=torch.float64, generator=g) if per_row_seconds else 0.125
    new = batch_records(indices, y, pred, adv, norms, radius, seconds, 40)
    old = _old_batch_records(indices, y, pred, adv, norms, radius, seconds, 40)
    assert new == old
    assert all(type(r.index) is int and type(r.norm) is float for r in new)


def _linear_case():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 1, 8, 8, generator=g)
    model = Linear(bias=0.0)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_cw_bookkeeping_gives_the_results_of_the_masked_version():
    # Values computed by the boolean-mask implementation this replaced (same seed, same inputs).
    model, x, y = _linear_case()
    x_adv, norms = carlini_wagner_l2(model, x, y, steps=25, binary_steps=4, c=0.1)
    before = [0.6876298785209656, 0.2560763657093048, 0.33342310786247253, 0.7335532903671265,
              0.243228942155838, 0.70045405626297]
    assert norms.tolist() == pytest.approx(before, rel=1e-6)
    assert float(x_adv.sum()) == pytest.approx(189.7641143798828, rel=1e-6)
    assert torch.allclose((x_adv - x).flatten(1).norm(dim=1), norms, atol=1e-5)


def test_pgd_restarts_give_the_results_of_the_masked_version():
    model, x, y = _linear_case()
    x_adv = projected_gradient_descent(model, x, y, threat=ThreatModel("linf", 0.05), steps=5, restarts=3,
                                       generator=torch.Generator().manual_seed(2))
    assert float(x_adv.sum()) == pytest.approx(190.6875762939453, rel=1e-6)
    assert float((x_adv - x).abs().sum()) == pytest.approx(18.564821243286133, rel=1e-6)


class NaNAt(Undefended):
    """An undefended model whose training loss is NaN from step 7 on; records every loss it returns."""

    bad = 7

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def loss(self, model, x, y, step):
        loss = super().loss(model, x, y, step)
        loss = loss * math.nan if step >= self.bad else loss
        self.seen.append(loss.item())
        return loss


def _noise_data():
    return TensorDataset(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("checkpoint_seconds", [0.0, 1e9])
def test_nan_loss_names_its_step_and_no_checkpoint_follows_it(checkpoint_seconds):
    defense = NaNAt(MNIST, arch="cnn_small", steps=30, batch_size=16)
    saved = []
    with pytest.raises(FloatingPointError, match="loss became nan at step 7; lower the learning rate"):
        fit(defense, defense.build_model(), _noise_data(), steps=30, seed=0, device=torch.device("cpu"),
            progress=False, checkpoint=lambda state: saved.append((state["step"], state["losses"].clone())),
            checkpoint_seconds=checkpoint_seconds)
    # Checked at a checkpoint (every step here) or at the next periodic check (step 20): never later.
    assert len(defense.seen) == (8 if checkpoint_seconds == 0 else 21)
    assert max((step for step, _ in saved), default=0) <= 7  # only states before the NaN: nothing lost
    assert all(torch.isfinite(losses).all() for _, losses in saved)


def test_training_returns_each_steps_loss_in_order():
    class Spy(NaNAt):
        bad = 10 ** 9  # never NaN

    defense = Spy(MNIST, arch="cnn_small", steps=45, batch_size=16)
    losses = fit(defense, defense.build_model(), _noise_data(), steps=45, seed=3, device=torch.device("cpu"),
                 progress=False)
    assert losses == defense.seen and all(type(v) is float for v in losses)


# ----------------------------------------------------------------------------- training batches
def _old_batches(dataset, batch_size, seed, start_step, count):
    """The training stream as it was: per-epoch seeded permutation, bench.core.data.gather on the CPU."""
    n = len(dataset)
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    step, out = start_step, []
    while len(out) < count:
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))
        for index in range(position, per_epoch):
            x, y = gather(dataset, order[index * batch_size:(index + 1) * batch_size])
            out.append((x, y.long()))
            step += 1
            if len(out) == count:
                break
    return out


class Decoded(Dataset):
    """A map-style dataset without tensors (like an image folder): items are decoded one by one."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index].float().div(255.0), int(self.targets[index])


def _datasets():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (45, 3, 6, 6), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, 10, (45,), generator=g)
    return {"uint8": ImageTensorDataset(images, targets),
            "float": TensorDataset(images.float() / 255, targets),
            "decoded": Decoded(images, targets)}


@pytest.mark.parametrize("kind", ["uint8", "float", "decoded"])
@pytest.mark.parametrize("start_step", [0, 5])
def test_training_batches_are_todays_batches(kind, start_step):
    dataset = _datasets()[kind]
    stream = batches(dataset, 8, seed=11, device=torch.device("cpu"), start_step=start_step)
    got = [next(stream) for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    stream.close()
    for (x, y), (x_old, y_old) in zip(got, _old_batches(dataset, 8, 11, start_step, 12), strict=True):
        assert x.dtype == torch.float32 and torch.equal(x, x_old) and torch.equal(y, y_old)


def test_dataloader_workers_give_todays_batches():
    dataset = _datasets()["decoded"]
    stream = batches(dataset, 8, seed=11, device=torch.device("cpu"), start_step=3,
                     loader=LoaderOptions(workers=2, pin_memory=True))
    got = [next(stream) for _ in range(9)]
    stream.close()
    for (x, y), (x_old, y_old) in zip(got, _old_batches(dataset, 8, 11, 3, 9), strict=True):
        assert torch.equal(x, x_old) and torch.equal(y, y_old)


def test_loader_options_are_checked():
    with pytest.raises(ValueError, match="whole number >= 0"):
        LoaderOptions(workers=-1)


# ----------------------------------------------------------------------------- profile keys and CLI
PROFILE = """
[run]
examples = 4
seed = 0
{run}
[defenses.pixeldp]
defense = "pixeldp"
params = {{ steps = 1, L = 0.1 }}
[defenses.plain]
defense = "undefended"
params = {{ steps = 1 }}
[defenses.convex]
defense = "wong_kolter"
params = {{ steps = 1 }}
"""


def test_speed_keys_go_into_cells_that_they_change():
    plain = keyed(parse_profile(PROFILE.format(run=""), "t").cells)
    fast = keyed(parse_profile(PROFILE.format(run='autocast = "bf16"\nchannels_last = true'), "t").cells)
    for (key, cell), (fast_key, fast_cell) in zip(plain, fast, strict=True):
        assert cell.speed == {} and "speed" not in cell.config()
        if cell.defense == "wong_kolter":  # a deterministic certificate: never touched, same key
            assert fast_cell.speed == {} and fast_key == key
        else:
            assert fast_cell.speed == {"autocast": "bf16", "channels_last": True}
            assert fast_key != key and fast_cell.defense_config() != cell.defense_config()
    # The CLI's overrides win over the profile.
    override = parse_profile(PROFILE.format(run='autocast = "bf16"'), "t", autocast="none", channels_last=True)
    assert override.cells[0].speed == {"channels_last": True}


def test_run_options_parse_without_changing_keys():
    profile = parse_profile(PROFILE.format(run="cudnn_benchmark = true\nloader_workers = 4\npin_memory = false"), "t")
    assert (profile.cudnn_benchmark, profile.loader_workers, profile.pin_memory) == (True, 4, False)
    assert [k for k, _ in keyed(profile.cells)] == [k for k, _ in keyed(parse_profile(PROFILE.format(run=""),
                                                                                      "t").cells)]


@pytest.mark.parametrize("line, message", [
    ('autocast = "fp8"', "autocast must be one of"),
    ("autocast = true", "autocast must be one of"),
    ('channels_last = "yes"', "channels_last must be true or false"),
    ("cudnn_benchmark = 1", "cudnn_benchmark must be true or false"),
    ("pin_memory = 0", "pin_memory must be true or false"),
    ("loader_workers = -1", "loader_workers must be a whole number >= 0"),
    ("loader_workers = 1.5", "loader_workers must be a whole number >= 0"),
])
def test_bad_speed_settings_are_config_errors(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_profile(PROFILE.format(run=line), "t")


def test_bf16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_text(PROFILE.format(run=""))
    code = main(["run", str(path), "--autocast", "bf16", "--device", "cpu", "--results", str(tmp_path / "r"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "runs on CUDA devices only" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_smoothing_base_classifier_takes_the_settings_behind_its_input_noise():
    from defenses.smoothing import RandomizedSmoothing

    defense = RandomizedSmoothing(MNIST, arch="cnn_small", steps=1)
    model = defense.build_model()
    assert apply_speed(model, {"channels_last": True})
    assert model.body.body_channels_last and model.body.stem.weight.is_contiguous(memory_format=torch.channels_last)
