"""How close is ``method.sampler=ddpm method.steps=1000`` to LMD's official sampler? Per-step coefficients.

    python scripts/lmd_sampler_gap.py

LMD's official inpainter runs Euler-Maruyama on score-SDE's subVP-SDE (beta_min 0.1, beta_max 20, N=1000,
t from 1 to 1e-3). The suite runs diffusers' DDPM ancestral step on the discrete linear schedule
(betas 1e-4 .. 0.02 over 1000 steps, the discretisation of the same beta(t)). Both updates have the form
``x_prev = a * x + b * eps_hat + c * z`` (eps_hat: the network's noise prediction, z: fresh noise). This script
prints a, b, c along the trajectory for the DDPM step, for Euler-Maruyama on the VP-SDE (what a DDPM-trained
model's reverse SDE is) and for Euler-Maruyama on the subVP-SDE (the official setting), and the marginal noise
level each forward process reaches. No network is involved: these are the samplers' own coefficients.
"""

from __future__ import annotations

import numpy as np

N, BETA_MIN, BETA_MAX, EPS = 1000, 0.1, 20.0, 1e-3


def integral(t: np.ndarray) -> np.ndarray:
    """int_0^t beta(s) ds for beta(s) = beta_min + s (beta_max - beta_min)."""
    return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2


def ddpm() -> dict[str, np.ndarray]:
    """diffusers DDPMScheduler.step (epsilon prediction, 'fixed_small' variance) at t = 999 .. 0."""
    betas = np.linspace(BETA_MIN / N, BETA_MAX / N, N)
    abar = np.cumprod(1 - betas)
    abar_prev = np.r_[1.0, abar[:-1]]
    t = np.arange(N - 1, -1, -1)
    # x0 = (x - sqrt(1-abar) eps) / sqrt(abar); mean = c0 x0 + ct x
    c0 = np.sqrt(abar_prev[t]) * betas[t] / (1 - abar[t])
    ct = np.sqrt(1 - betas[t]) * (1 - abar_prev[t]) / (1 - abar[t])
    a = c0 / np.sqrt(abar[t]) + ct
    b = -c0 * np.sqrt(1 - abar[t]) / np.sqrt(abar[t])
    c = np.sqrt(np.clip((1 - abar_prev[t]) / (1 - abar[t]) * betas[t], 1e-20, None))
    c[t == 0] = 0.0  # no noise on the last step
    return {"time": (t + 1) / N, "a": a, "b": b, "c": c, "std": np.sqrt(1 - abar[t])}


def euler_maruyama(sde: str) -> dict[str, np.ndarray]:
    """score-SDE's EulerMaruyamaPredictor on linspace(1, 1e-3, N) with the score -eps_hat / std(t)."""
    t = np.linspace(1.0, EPS, N)
    dt = 1.0 / N
    beta, big_b = BETA_MIN + t * (BETA_MAX - BETA_MIN), integral(t)
    if sde == "vp":
        g2, std = beta, np.sqrt(1 - np.exp(-big_b))
    else:  # subVP: diffusion beta (1 - exp(-2 B)), marginal std 1 - exp(-B)
        g2, std = beta * (1 - np.exp(-2 * big_b)), 1 - np.exp(-big_b)
    # x_prev = x + (0.5 beta x + g2 * score) dt + sqrt(g2 dt) z, score = -eps_hat / std
    return {"time": t, "a": 1 + 0.5 * beta * dt, "b": -g2 * dt / std, "c": np.sqrt(g2 * dt), "std": std}


def noise_to_signal(r: dict[str, np.ndarray], sde: str) -> np.ndarray:
    """sigma/alpha of the marginal at each step's time (the noise level the network is asked about)."""
    big_b = integral(r["time"])
    alpha = np.exp(-0.5 * big_b)
    return r["std"] / alpha if sde == "vp" else (1 - np.exp(-big_b)) / alpha


def main() -> None:
    runs = {"ddpm": ddpm(), "em_vp": euler_maruyama("vp"), "em_subvp": euler_maruyama("sub")}
    ref, vp = runs["ddpm"], runs["em_vp"]
    print("1) suite's DDPM ancestral step vs Euler-Maruyama on the VP-SDE, x_prev = a x + b eps_hat + c z")
    for key in ("a", "b", "c"):
        rel = np.abs(ref[key] - vp[key]) / np.abs(vp[key])
        rel[-1] = np.nan if key == "c" else rel[-1]  # DDPM adds no noise on its last step
        print(
            f"   {key}: max relative difference {np.nanmax(rel[: N - 10]):.3%} over steps 1-{N - 10}, "
            f"{np.nanmax(rel[N - 10 :]):.3%} over the last 10 steps"
        )
    print("2) noise-to-signal ratio sigma/alpha at the time each step evaluates the network")
    print(f"   {'step':>5s} {'ddpm (VP)':>10s} {'EM VP':>10s} {'EM subVP (official)':>20s}")
    for k in (0, 100, 250, 500, 750, 900, 950, 990, 999):
        row = [noise_to_signal(runs[n], "vp" if n != "em_subvp" else "sub")[k] for n in runs]
        print(f"   {k + 1:5d} {row[0]:10.4f} {row[1]:10.4f} {row[2]:20.4f}")
    for level in (1.0, 0.1, 0.01):
        counts = [int((noise_to_signal(runs[n], "vp" if n != "em_subvp" else "sub") < level).sum()) for n in runs]
        print(
            f"   steps evaluated below sigma/alpha = {level}: ddpm {counts[0]}, EM VP {counts[1]}, EM subVP {counts[2]}"
        )


if __name__ == "__main__":
    main()
