"""Sub-batches: back-off on out-of-memory errors replays the random draws, sizes from memory, chunks in bytes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import bench.execution.runner
from attacks.template import register_attack
from bench.profile.config import ConfigError, parse_profile
from bench.execution.runner import keyed
from bench.core.registry import ATTACKS, DATASETS, UnknownNameError
from bench.execution.runner import Runner, RunOptions
from bench.execution.store import Store
from bench.core.subbatch import (SubBatches, SubBatchMemoryError, attack_row_bytes, fit_rows, halvings,
                                 is_out_of_memory, peak_bytes, rows_within)
from bench.core.types import ThreatModel
from bench.cli.commands import main
from defenses.pixeldp.defense import PixelDP
from defenses.pixeldp.sampling import CPU_BLOCK_BYTES, block_rows
from defenses.smoothing import RandomizedSmoothing, class_counts

CPU = torch.device("cpu")


def oom(rows: int) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows (injected)")


def test_halvings_and_sizes_that_fit():
    assert halvings(100) == [100, 50, 25, 13, 7, 4, 2, 1]
    assert halvings(1) == [1]
    assert fit_rows(100, row_bytes=1e6, available=30e6) == 25  # 50 rows need 50 MB > 30 MB
    assert fit_rows(100, row_bytes=1e6, available=1e9) == 100
    assert fit_rows(100, row_bytes=1e12, available=1e6) == 1  # one row is always tried (back-off says the rest)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(oom(3))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # only runtime errors come from the device
    assert not is_out_of_memory(SubBatchMemoryError("cell: one example does not fit (CUDA out of memory)"))


def test_back_off_halves_until_it_fits_and_outputs_equal_the_unsplit_ones():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    sizes_seen: list[int] = []

    def per_example(start: int, stop: int) -> torch.Tensor:
        sizes_seen.append(stop - start)
        if stop - start > 30:
            raise oom(stop - start)
        return x[start:stop].square().sum(dim=1)

    logs: list[str] = []
    batches = SubBatches(100, CPU, log=logs.append, what="cell A")
    out = torch.cat(batches.run(per_example, 100))
    assert torch.equal(out, x.square().sum(dim=1))
    assert sizes_seen == [100, 50, 25, 25, 25, 25]  # 100 and 50 failed; 25 is remembered
    assert batches.size == 25 and batches.sizes == [25]
    assert logs == ["cell A: out of memory at 100 examples per sub-batch; retrying with 50",
                    "cell A: out of memory at 50 examples per sub-batch; retrying with 25"]
    sizes_seen.clear()
    batches.run(per_example, 100)  # the same cell's later batches start at the size that fitted
    assert sizes_seen == [25, 25, 25, 25]


def test_a_retried_sub_batch_sees_the_draws_it_would_have_seen():
    """Draws made before the failure are replayed: back-off to 25 rows equals a run given 25 rows."""
    def run(limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        noise = torch.Generator().manual_seed(2)
        torch.manual_seed(3)

        def per_example(start: int, stop: int) -> torch.Tensor:
            n = stop - start
            draws = torch.rand(n, generator=generator) + torch.randn(n, 4, generator=noise).sum(1) + torch.rand(n)
            if n > 30:  # fails after drawing, like an attack whose backward pass runs out of memory
                raise oom(n)
            return draws

        batches = SubBatches(limit, CPU, generators=(generator, noise, generator))
        out = torch.cat(batches.run(per_example, 100))
        return out, generator.get_state(), noise.get_state()

    backed_off, reference = run(100), run(25)
    assert torch.equal(backed_off[0], reference[0])
    assert torch.equal(backed_off[1], reference[1]) and torch.equal(backed_off[2], reference[2])


def test_one_row_that_does_not_fit_names_the_fix_and_restores_the_generator():
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()

    def never_fits(start: int, stop: int) -> None:
        torch.rand(3, generator=generator)
        raise oom(stop - start)

    batches = SubBatches(8, CPU, generators=(generator,), what="mnist/pixeldp/cw_l2_eot")
    with pytest.raises(SubBatchMemoryError, match=r"mnist/pixeldp/cw_l2_eot: one example does not fit .*draws"):
        batches.run(never_fits, 8)
    assert torch.equal(generator.get_state(), before)


def test_other_errors_are_not_retried():
    calls = []

    def broken(start: int, stop: int) -> None:
        calls.append(stop - start)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        SubBatches(16, CPU).run(broken, 16)
    assert calls == [16]


def test_sizes_from_memory_pick_a_back_off_size_and_nothing_on_cpu():
    batches = SubBatches(100, CPU)
    assert batches.fit(row_bytes=1e9) == 100  # no memory information on CPU: the profile's size
    assert batches.fit(row_bytes=1e6, available=20e6) == 13
    assert batches.size == 13
    with pytest.raises(ValueError, match="limit"):
        SubBatches(0, CPU)


# ----------------------------------------------------------------- certification chunks in bytes

def test_chunks_are_sized_in_bytes():
    h = torch.zeros(8, 32, 14, 14)  # 25,088 bytes of noised activations per row
    row = 32 * 14 * 14 * 4
    assert rows_within(nn.Identity(), h, 2048, chunk_bytes=1 << 20) == (1 << 20) // row == 41
    assert rows_within(nn.Identity(), h, 10, chunk_bytes=1 << 20) == 10  # chunk_rows stays an upper bound
    assert rows_within(nn.Identity(), h, 2048, chunk_bytes=1) == 1  # one row always runs
    assert rows_within(nn.Identity(), h, 2048) == 2048  # no budget on CPU unless the caller has one
    assert block_rows(h, 2048) == CPU_BLOCK_BYTES // row == 334  # PixelDP's CPU cache budget
    assert block_rows(h, 2048, chunk_bytes=10 * row) == 10


def _record_blocks(model) -> list[int]:
    rows: list[int] = []
    replicate = model.noise.replicate

    def recorded(h, draws):
        out = replicate(h, draws)
        rows.append(out.shape[0])
        return out

    model.noise.replicate = recorded
    return rows


def test_pixeldp_blocks_respect_chunk_bytes():
    torch.manual_seed(0)
    defense = PixelDP(DATASETS.get("mnist5k"), L=1.0, arch="cnn_small", chunk_bytes=50_000)
    defense.attach(defense.build_model().eval(), torch.Generator().manual_seed(0))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    h = defense.model.pre_noise(x)
    budget_rows = 50_000 // (h[0].numel() * h.element_size())
    rows = _record_blocks(defense.model)
    samples = defense.samples(x, 40)
    assert rows and max(rows) <= max(1, budget_rows) and sum(rows) == 6 * 40
    assert (samples.counts.sum(axis=1) == 40).all()
    with pytest.raises(ValueError, match="chunk_bytes"):
        PixelDP(DATASETS.get("mnist5k"), chunk_bytes=0)


def test_smoothing_blocks_respect_chunk_bytes():
    torch.manual_seed(0)
    defense = RandomizedSmoothing(DATASETS.get("mnist5k"), arch="cnn_small", chunk_bytes=28 * 28 * 4 * 30)
    defense.attach(defense.build_model().eval(), torch.Generator().manual_seed(0))
    seen: list[int] = []
    body = defense.model.body
    handle = body.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    counts = class_counts(defense.model, x, 50, 10, defense.chunk_rows, defense.chunk_bytes)
    handle.remove()
    assert max(seen) <= 30 and (counts.sum(axis=1) == 50).all()
    with pytest.raises(ValueError, match="chunk_bytes"):
        RandomizedSmoothing(DATASETS.get("mnist5k"), chunk_bytes=-1)


# ----------------------------------------------------------------- profiles

PROFILE = """
[run]
datasets = ["mnist5k"]
examples = 24
seed = 0
batch_size = {run_batch}
[defenses.pixeldp]
params = {{ arch = "cnn_small", L = 0.3, steps = 80, draws_certify = 20, draws_attack = 10, draws_predict = 5 }}
[attacks.{attack}]
eps = [0.1]
params = {{ steps = 3 }}
{attack_batch}
"""


def _profile(run_batch="24", attack="pgd_linf", attack_batch=""):
    return parse_profile(PROFILE.format(run_batch=run_batch, attack=attack, attack_batch=attack_batch), "t")


def test_batch_sizes_per_attack_and_per_dataset():
    def sizes(profile):
        return [(c.attack, c.batch_size) for c in profile.cells]

    assert sizes(_profile()) == [("none", None), ("pgd_linf", None)]
    assert _profile().batch_size == 24
    assert sizes(_profile(attack_batch="batch_size = 6")) == [("none", None), ("pgd_linf", 6)]
    assert sizes(_profile(attack_batch="batch_size = { mnist5k = 4 }")) == [("none", None), ("pgd_linf", 4)]
    assert sizes(_profile(attack_batch="batch_size = { mnist = 4 }")) == [("none", None), ("pgd_linf", None)]
    by_dataset = _profile(run_batch="{ mnist5k = 12 }")
    assert sizes(by_dataset) == [("none", 12), ("pgd_linf", 12)] and by_dataset.batch_size == 100
    assert sizes(_profile(run_batch="{ mnist5k = 12 }", attack_batch="batch_size = 3")) == [("none", 12),
                                                                                             ("pgd_linf", 3)]
    # An execution setting, like run.batch_size: the key (and the stored configuration) does not change.
    keys = [k for k, _ in keyed(_profile().cells)]
    assert keys == [k for k, _ in keyed(_profile(attack_batch="batch_size = 6").cells)]


@pytest.mark.parametrize("run_batch, attack_batch, message", [
    ("24", "batch_size = 0", "attacks.pgd_linf.batch_size must be a whole number >= 1, got 0"),
    ("24", "batch_size = 2.5", "attacks.pgd_linf.batch_size must be a whole number >= 1, got 2.5"),
    ("24", 'batch_size = "big"', "attacks.pgd_linf.batch_size must be a whole number >= 1, got 'big'"),
    ("24", "batch_size = true", "attacks.pgd_linf.batch_size must be a whole number >= 1, got True"),
    ("24", "batch_size = { mnist5k = -3 }", "attacks.pgd_linf.batch_size.mnist5k must be a whole number >= 1"),
    ("{ mnist5k = 0 }", "", "run.batch_size.mnist5k must be a whole number >= 1, got 0"),
    ("[10]", "", "run.batch_size must be a whole number >= 1, got [10]"),
])
def test_bad_batch_sizes_are_one_line_config_errors(run_batch, attack_batch, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _profile(run_batch=run_batch, attack_batch=attack_batch)
    path = tmp_path / "bad.toml"
    path.write_text(PROFILE.format(run_batch=run_batch, attack="pgd_linf", attack_batch=attack_batch))
    assert main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "results").exists()


def test_an_unknown_dataset_in_a_batch_size_table_lists_the_datasets():
    with pytest.raises(UnknownNameError, match="mnist5k"):
        _profile(attack_batch="batch_size = { mnsit = 4 }")


# ----------------------------------------------------------------- the runner

MOST_ROWS = 7  # the injected attack "runs out of memory" above this many examples


def _greedy_pgd(model, x, y, *, threat, steps: int = 3, generator=None):
    """PGD that first draws noise and a start, then fails above MOST_ROWS rows (like a backward pass out of memory)."""
    model(x)  # the defense's noise generator moves
    threat.random_init(x, generator)  # so does the cell's
    if x.shape[0] > MOST_ROWS:
        raise oom(x.shape[0])
    return ATTACKS.get("pgd_linf")(model, x, y, threat=threat, steps=steps, generator=generator)


def _records(runner: Runner, cell, key) -> list[tuple]:
    records, info = runner.run_cell(cell, key)
    return [(r.index, r.label, r.clean_pred, r.adv_pred, r.norm, r.radius, r.forward_passes) for r in records], info


def test_runner_back_off_gives_the_records_of_the_size_it_settled_on(tmp_path):
    """A randomized defense (PixelDP) under an attack that runs out of memory above 7 rows: 24 -> 12 -> 6 rows,
    and the records equal those of a run given 6 rows (both generators replayed on every retry)."""
    register_attack("greedy_pgd_test", _greedy_pgd, norm="linf", projected=True)  # pgd_linf projects
    try:
        logs: list[str] = []
        options = RunOptions(results_dir=tmp_path, batch_size=24, progress=False)
        runner = Runner(Store(tmp_path / "store.sqlite"), options, log=logs.append)
        (key, backed_off), = [kc for kc in keyed(_profile(attack="greedy_pgd_test").cells) if kc[1].attack != "none"]
        (_, given), = [kc for kc in keyed(_profile(attack="greedy_pgd_test", attack_batch="batch_size = 6").cells)
                       if kc[1].attack != "none"]
        got, info = _records(runner, backed_off, key)
        assert info["sub_batches"] == {"limit": 24, "sizes": [6]}
        assert sum("out of memory at" in line for line in logs) == 2
        expected, given_info = _records(runner, given, key)
        assert given_info["sub_batches"] == {"limit": 6, "sizes": [6]}
        assert got == expected and len(got) == 24
        again, _ = _records(runner, backed_off, key)
        assert again == got  # the whole cell again: same size path, same draws
        assert len({r[3] for r in got}) > 1 and any(r[5] is not None for r in got)
    finally:
        ATTACKS.unregister("greedy_pgd_test")


def test_a_cells_draws_follow_its_configuration_not_its_key(tmp_path):
    """PixelDP's noise and PGD's random starts are seeded by the cell's configuration: the key a code edit alone
    would give (a refactor) draws the same, so records change only where results do."""
    options = RunOptions(results_dir=tmp_path, batch_size=24, progress=False)
    runner = Runner(Store(tmp_path / "store.sqlite"), options, log=lambda message: None)
    (key, cell), = [kc for kc in keyed(_profile().cells) if kc[1].attack != "none"]
    first, _ = _records(runner, cell, key)
    again, _ = _records(runner, cell, "0" * 20)
    assert again == first and len({r[3] for r in first}) > 1


def test_the_runner_builds_a_defense_once_per_configuration(tmp_path, monkeypatch):
    """The clean and the attack cell of one defense share one object: built once (bench.defense.cell_defense),
    its model plan read from it, not built again."""
    built: list[str] = []
    real = bench.execution.runner.cell_defense

    def counted(cell, *rest):
        built.append(cell.defense)
        return real(cell, *rest)

    monkeypatch.setattr(bench.execution.runner, "cell_defense", counted)
    runner = Runner(Store(tmp_path / "store.sqlite"), RunOptions(results_dir=tmp_path, progress=False),
                    log=lambda message: None)
    for key, cell in keyed(_profile().cells):
        runner.run_cell(cell, key)
    assert built == ["pixeldp"] and runner.model_plan(cell).steps == 80 and built == ["pixeldp"]


# ----------------------------------------------------------------- CUDA


def _capped_memory(extra_bytes: int) -> float:
    """Cap this process's CUDA caching allocator at what it holds now plus `extra_bytes`; returns the old fraction."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = (torch.cuda.memory_reserved(0) + extra_bytes) / total
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return fraction


class _NoisyConvNet(nn.Module):
    """A conv net with a Gaussian noise layer after its stem (pre_noise / noise / post_noise, like ImageClassifier)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(width, 10))
        self.generator: torch.Generator | None = None

    def pre_noise(self, x):
        return self.stem(x)

    def noise(self, h):
        return h + 0.1 * torch.randn(h.shape, device=h.device, generator=self.generator)

    def post_noise(self, h):
        return self.body(h)

    def forward(self, x):
        return self.post_noise(self.noise(self.pre_noise(x)))


@pytest.mark.gpu
def test_real_out_of_memory_backs_off_on_cuda():
    """EOT-PGD (64 draws) on 64 MNIST-sized images needs ~6 GB; capped at ~300 MB it backs off and still
    gives the records of the size it settled on."""
    device = torch.device("cuda")
    model = _NoisyConvNet().to(device).eval()
    model.generator = torch.Generator(device=device)
    x = torch.rand(64, 1, 28, 28, device=device, generator=torch.Generator(device=device).manual_seed(0))
    y = torch.arange(64, device=device) % 10
    eot_pgd = ATTACKS.get("pgd_linf_eot")
    threat = ThreatModel("linf", 0.1)

    def run(limit: int, cap: int | None) -> tuple[torch.Tensor, SubBatches]:
        model.generator.manual_seed(5)
        attack_generator = torch.Generator(device=device).manual_seed(6)

        def per_example(start: int, stop: int) -> torch.Tensor:
            return eot_pgd(model, x[start:stop], y[start:stop], threat=threat, steps=2, draws=64,
                           generator=attack_generator).detach()

        batches = SubBatches(limit, device, (model.generator, attack_generator), what="gpu test")
        old = None
        try:
            if cap is not None:
                old = _capped_memory(cap)
            out = torch.cat(batches.run(per_example, 64))
        finally:
            if old is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, 0)
                torch.cuda.empty_cache()
        return out, batches

    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        capped, batches = run(64, 300 << 20)
        reference, _ = run(batches.size, None)  # the settled size from the start, without a cap
    finally:
        torch.backends.cudnn.deterministic = deterministic
    assert batches.size < 64 and capped.shape == x.shape
    assert bool(threat.contains(capped, x).all())
    # The same random starts and noise: equal up to convolution algorithms that a memory cap may
    # change (a replay that went wrong would move nearly every pixel: other starts).
    assert float((capped == reference).float().mean()) > 0.99


@pytest.mark.gpu
def test_row_cost_estimates_bound_the_measured_peak_on_cuda():
    device = torch.device("cuda")
    model = _NoisyConvNet().to(device).eval()
    model.generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(16, 1, 28, 28, device=device)
    state = model.generator.get_state()
    per_row = attack_row_bytes(model, x, draws=8)
    assert torch.equal(model.generator.get_state(), state)  # the probe leaves the noise where it was
    wrapped = ATTACKS.get("pgd_linf_eot")
    measured = peak_bytes(lambda: wrapped(model, x, torch.zeros(16, dtype=torch.long, device=device),
                                          threat=ThreatModel("linf", 0.1), steps=1, draws=8), device)
    assert 0.5 * measured / 16 <= per_row <= 20 * measured / 16  # about an upper bound, not a wild one
    h = model.pre_noise(x)
    budget = 64 << 20
    rows = rows_within(model.post_noise, h, 10**6, chunk_bytes=budget)
    big = h[:1].expand(rows, *h.shape[1:]).contiguous()
    with torch.no_grad():
        peak = peak_bytes(lambda: model.post_noise(big), device)
    assert peak <= 1.1 * budget and rows > 1


@pytest.mark.gpu
def test_pixeldp_sampling_on_cuda_fits_a_byte_budget():
    device = torch.device("cuda")
    torch.manual_seed(0)
    budget = 8 << 20
    defense = PixelDP(DATASETS.get("mnist5k"), L=1.0, arch="cnn_small", chunk_bytes=budget)
    defense.attach(defense.build_model().to(device).eval(), torch.Generator(device=device).manual_seed(0))
    x = torch.rand(10, 1, 28, 28, device=device)
    rows = _record_blocks(defense.model)
    peak = peak_bytes(lambda: defense.samples(x, 500), device)
    assert max(rows) < 2048  # the byte budget, not chunk_rows, sized the blocks
    assert peak <= 2 * budget


def test_one_example_too_large_for_the_device_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    def too_large(self, cell, key):
        raise SubBatchMemoryError(f"{cell.dataset} / {cell.defense_label}: one example does not fit in the memory "
                                  "of cuda (CUDA out of memory); lower the attack's `draws`")

    monkeypatch.setattr(Runner, "run_cell", too_large)
    path = tmp_path / "p.toml"
    path.write_text(PROFILE.format(run_batch="24", attack="pgd_linf", attack_batch=""))
    assert main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one example does not fit" in err and "draws" in err
