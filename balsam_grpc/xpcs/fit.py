"""Fit of the single-exponential decay g2(tau) = baseline + beta * exp(-2 Gamma tau).

Levenberg-Marquardt on (baseline, beta, ln Gamma), weighted by the g2 errors. The
baseline is free because normalising by time averages over a finite series pulls the
tail of g2 slightly below 1; fixing it at 1 would bias Gamma upwards. NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DecayFit:
    baseline: float
    beta: float            # speckle contrast
    gamma_per_s: float     # relaxation rate Gamma
    gamma_err: float       # one standard error of Gamma
    chi2_reduced: float
    ok: bool
    message: str = ""

    @property
    def relaxation_time_s(self) -> float:
        return 1.0 / self.gamma_per_s if self.gamma_per_s > 0 else float("inf")


def _initial_guess(tau: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    beta = max(float(y[0]), 1e-3)
    below = np.nonzero(y < beta / np.e)[0]
    tau_e = float(tau[below[0]]) if below.size else float(tau[-1]) * 2
    return beta, 1.0 / (2.0 * max(tau_e, 1e-12))


def fit_decay(tau: np.ndarray, g2: np.ndarray, g2_err: np.ndarray | None = None,
              max_iterations: int = 100) -> DecayFit:
    keep = np.isfinite(g2) & np.isfinite(tau)
    if g2_err is not None:
        keep &= np.isfinite(g2_err)
    tau, y = np.asarray(tau)[keep], np.asarray(g2)[keep] - 1.0
    sigma = np.maximum(np.asarray(g2_err)[keep], 1e-6) if g2_err is not None else np.ones_like(y)
    if y.size < 4:
        nan = float("nan")
        return DecayFit(nan, nan, nan, nan, nan, False, "fewer than 4 points")

    beta, gamma = _initial_guess(tau, y)
    params = np.array([0.0, beta, np.log(gamma)])  # baseline offset from 1, beta, ln Gamma

    def residual(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rate = np.exp(p[2])
        decay = np.exp(-2.0 * rate * tau)
        r = (p[0] + p[1] * decay - y) / sigma
        jac = np.stack([np.ones_like(tau) / sigma, decay / sigma,
                        p[1] * decay * (-2.0 * tau) * rate / sigma], axis=1)
        return r, jac

    damping = 1e-3
    r, jac = residual(params)
    cost = float(r @ r)
    for _ in range(max_iterations):
        jtj, jtr = jac.T @ jac, jac.T @ r
        step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), -jtr)
        trial = params + step
        r_new, jac_new = residual(trial)
        cost_new = float(r_new @ r_new)
        if cost_new < cost:
            converged = abs(cost - cost_new) <= 1e-10 * max(cost, 1e-300)
            params, r, jac, cost, damping = trial, r_new, jac_new, cost_new, damping / 3
            if converged:
                break
        else:
            damping *= 5
            if damping > 1e10:
                break
    dof = max(y.size - 3, 1)
    chi2 = cost / dof
    try:
        cov = np.linalg.inv(jac.T @ jac) * (chi2 if g2_err is None else max(chi2, 1.0))
        gamma_err = float(np.exp(params[2]) * np.sqrt(max(cov[2, 2], 0.0)))
    except np.linalg.LinAlgError:
        gamma_err = float("nan")
    return DecayFit(baseline=1.0 + float(params[0]), beta=float(params[1]), gamma_per_s=float(np.exp(params[2])),
                    gamma_err=gamma_err,
                    chi2_reduced=chi2, ok=bool(np.isfinite(params).all()))
