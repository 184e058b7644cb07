"""Evaluate an in-memory PyTorch model (untrained here) under two attacks and a certificate, on mnist5k."""
import torch
from torch import nn

import pixeldp_bench

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))  # [0,1] images -> logits

profile = {
    "run": {"datasets": ["mnist5k"], "examples": 20, "seed": 0},
    "defenses": {
        "mine": {"defense": "user_model", "params": {"model": "mine"}},  # attacked as is
        "mine_certified": {"defense": "wong_kolter",  # certified with the convex bounds, no training
                           "params": {"model": "mine", "steps": 0, "eps": 0.05, "bound": "crown_ibp"}},
    },
    "attacks": {
        "pgd_linf": {"eps": [0.05, 0.1], "params": {"steps": 5}},
        "pgd_l2": {"eps": [0.5], "params": {"steps": 5}},
    },
}
run = pixeldp_bench.run(profile, models={"mine": model}, device="cpu", quiet=True)
print(run.tables["accuracy"])
print(run.tables["certified"])
print("results in", run.folder)
