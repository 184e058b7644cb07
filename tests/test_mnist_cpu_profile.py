"""The `mnist-cpu` profile: the paper's MNIST comparison at CPU size resolves, and its whole grid runs on tiny files."""
from __future__ import annotations

from dataset_files import write_fashion_mnist, write_mnist

from bench.cli.commands import main
from bench.profile.config import load_profile


def test_profile_holds_the_papers_comparison():
    profile = load_profile("mnist-cpu")
    clean = {c.defense_label: c.defense_params for c in profile.cells if c.attack == "none"}
    assert set(clean) == {"undefended", "pixeldp_L0.03", "pixeldp_L0.1", "pixeldp_L0.3", "pixeldp_L1.0", "madry",
                          "wong_kolter", "undefended_fashion", "pixeldp_L0.1_fashion"}
    assert {clean[f"pixeldp_L{L}"]["L"] for L in ("0.03", "0.1", "0.3", "1.0")} == {0.03, 0.1, 0.3, 1.0}
    assert all(clean[f"pixeldp_L{L}"]["draws_certify"] == 2000 and clean[f"pixeldp_L{L}"]["arch"] == "mnist_cnn"
               for L in ("0.03", "0.1", "0.3", "1.0"))
    assert clean["madry"]["eps"] == 0.3 and clean["wong_kolter"]["eps"] == 0.1
    # Clean accuracy on the whole test set; certificates and deterministic attacks on the same stratified
    # 1,000, EOT attacks on PixelDP on a nested 200.
    assert {c.examples for c in profile.cells if c.attack == "none"} == {10000}
    assert {c.examples for c in profile.cells if c.attack != "none" and c.defense != "pixeldp"} == {1000}
    assert {c.examples for c in profile.cells if c.attack != "none" and c.defense == "pixeldp"} == {200}
    certified = {c.defense_label: c.certify_examples for c in profile.cells if c.attack == "none"}
    assert {k for k, v in certified.items() if v == 1000} == {"pixeldp_L0.03", "pixeldp_L0.1", "pixeldp_L0.3",
                                                              "pixeldp_L1.0", "wong_kolter", "pixeldp_L0.1_fashion"}
    assert {c.dataset for c in profile.cells} == {"mnist", "fashion_mnist"}
    assert {c.defense_label for c in profile.cells if c.dataset == "fashion_mnist"} == {"undefended_fashion",
                                                                                       "pixeldp_L0.1_fashion"}
    attacked = {(c.defense_label, c.attack_label) for c in profile.cells if c.attack != "none"}
    for label in ("undefended", "madry", "wong_kolter"):
        assert {(label, a) for a in ("apgd_ce_linf", "apgd_t_linf", "apgd_ce_l2", "apgd_t_l2")} <= attacked
    # The randomized defense is attacked with EOT only (20 draws per gradient), never the deterministic versions.
    assert {a for d, a in attacked if d == "pixeldp_L0.1"} == {"apgd_ce_l2_eot", "apgd_dlr_l2_eot", "apgd_ce_linf_eot",
                                                               "apgd_dlr_linf_eot"}
    eot = [c for c in profile.cells if c.defense == "pixeldp" and c.attack != "none"]
    assert eot and all(c.attack_params["draws"] == 20 for c in eot)


def test_whole_grid_runs_on_tiny_files(tmp_path, capsys):
    write_mnist(tmp_path / "data", classes=range(4), per_class=1)
    write_fashion_mnist(tmp_path / "data", classes=range(4), per_class=1)
    code = main(["run", "mnist-cpu", "--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "res"),
                 "--max-steps", "1", "--max-draws", "2", "--examples", "4", "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "67 cell(s) computed" in out
