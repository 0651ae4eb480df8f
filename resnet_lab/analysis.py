"""Analyses over models, tensors and run tables; pure functions that return numbers or DataFrames."""
from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one forward pass on one image (FlopCounterMode counts 2 FLOPs per MAC)."""
    was = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops() // 2)


def _t975(dof: int) -> float:
    """97.5% quantile of Student's t (table for small dof, normal beyond): no scipy needed."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    if dof in table:
        return table[dof]
    if dof > 30:
        return 1.96 + 2.4 / dof  # within 0.3% of the exact quantile for dof > 30
    lower = max(k for k in table if k < dof)
    upper = min(k for k in table if k > dof)
    w = (dof - lower) / (upper - lower)
    return table[lower] * (1 - w) + table[upper] * w


def ci95(values) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t; 0 for a single value)."""
    v = pd.to_numeric(pd.Series(values), errors="coerce").dropna()
    n = len(v)
    if n < 2:
        return 0.0
    return _t975(n - 1) * float(v.std(ddof=1)) / math.sqrt(n)


def summarize(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean ± 95% CI over seeds of final train/test error (in %), with params and MACs, grouped by `by`."""
    if runs.empty:
        return pd.DataFrame(columns=by + ["runs", "params", "macs", "train_err_%", "test_err_%", "test_err_ci95"])
    done = runs[runs["status"].isin(["done", "diverged"])]
    rows = []
    for key, g in done.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({
            **dict(zip(by, key)),
            "runs": len(g),
            "params": int(g["params"].iloc[0]),
            "macs": int(g["flops"].iloc[0]),
            "train_err_%": 100 * g["final_train_err"].astype(float).mean(),
            "test_err_%": 100 * g["final_test_err"].astype(float).mean(),
            "test_err_ci95": 100 * ci95(g["final_test_err"].astype(float)),
            "diverged": int((g["status"] == "diverged").sum()),
        })
    return pd.DataFrame(rows)
