"""Flow-matching solvers for diffusion forcing: one small state object per chunk of frames.

Sigmas follow SkyReels-V2's ``FlowUniPCMultistepScheduler``: ``linspace(0.999, 0, N+1)[:-1]``, shifted by
``shift·σ / (1 + (shift-1)·σ)``, then a final 0. The model is fed ``int(σ·1000)``. Because every frame of a
chunk walks the same schedule, one solver per chunk is equivalent to SkyReels' one scheduler per frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


SIGMA_MAX = float(torch.tensor(0.999, dtype=torch.float32))  # the reference's sigma_max: 1 - 1/1000 held in fp32


def flow_shift(x, shift: float):
    """The flow-matching time shift shift·x / (1 + (shift − 1)·x) (SD3's), of a float or a tensor: SkyReels'
    sigmas, Krea Realtime's grid and MAGI-1's schedule (with 1 / shift: its t runs from noise to clean)."""
    return shift * x / (1 + (shift - 1) * x)


def flow_sigmas(steps: int, shift: float) -> tuple[list[float], list[int]]:
    """(sigmas [steps + 1] ending in 0, model timesteps [steps]) for ``steps`` denoising steps.

    The reference's arithmetic to the bit: ``np.linspace(sigma_max, 0, steps + 1)[:-1]`` (i·step + start in
    float64, with sigma_max the float32 0.999 it keeps), shifted in float64, then timesteps truncated to int64
    and sigmas rounded to float32. (With 0.999 itself some sigmas move by one float32 ulp and, e.g. at shift 1,
    some timesteps by one.)
    """
    step = (0.0 - SIGMA_MAX) / steps
    base = [i * step + SIGMA_MAX for i in range(steps)]
    shifted = [flow_shift(b, shift) for b in base]
    timesteps = [int(s * 1000) for s in shifted]  # int64 truncation, as the reference
    sigmas = [float(torch.tensor(s, dtype=torch.float32)) for s in shifted] + [0.0]
    return sigmas, timesteps


@dataclass
class EulerSolver:
    """First-order flow ODE step: x ← x + (σ_next − σ)·v."""

    sigmas: list[float]
    step_index: int = 0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        self.step_index += 1
        return (x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * v.float()).to(x.dtype)


@dataclass
class UniPCSolver:
    """UniPC multistep (order 2, bh2, x0-prediction, corrector on, lower order at the end), flow form.

    With α = 1 − σ and λ = log α − log σ, the predictor and corrector are those of diffusers'
    ``UniPCMultistepScheduler`` as SkyReels configures it; a final σ = 0 yields the x0 prediction.
    """

    sigmas: list[float]
    step_index: int = 0
    order: int = 2
    _outputs: list = field(default_factory=list)  # recent x0 predictions, oldest first
    _last_sample: torch.Tensor | None = None
    _this_order: int = 1

    def _lam(self, i: int) -> float:
        s = self.sigmas[i]
        if s <= 0:
            return math.inf
        return math.log(1 - s) - math.log(s)

    @staticmethod
    def _coefficients(h: float, order: int) -> tuple[float, float, list[float]]:
        """h·φ1, B(h) and the b vector of UniPC-bh2 for step size h (x0-prediction: hh = −h)."""
        hh = -h
        h_phi_1 = math.expm1(hh) if math.isfinite(hh) else -1.0
        h_phi_k = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0
        b_h = h_phi_1
        b, fact = [], 1
        for i in range(1, order + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = (h_phi_k / hh - 1 / fact) if math.isfinite(hh) else -1 / fact
        return h_phi_1, b_h, b

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        sig = self.sigmas
        x = x.float()
        m_t = x - sig[i] * v.float()  # x0 prediction
        if i > 0 and self._last_sample is not None:
            x = self._correct(m_t, i)
        self._outputs = (self._outputs + [m_t])[-self.order:]
        remaining = len(sig) - 1 - i
        self._this_order = min(self.order, remaining, len(self._outputs))
        self._last_sample = x
        out = self._predict(x, i, self._this_order)
        self.step_index += 1
        return out

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        sig = self.sigmas
        m0 = self._outputs[-1]
        h = self._lam(i + 1) - self._lam(i)
        alpha_t, sigma_t, sigma_s0 = 1 - sig[i + 1], sig[i + 1], sig[i]
        h_phi_1, b_h, _ = self._coefficients(h, order)
        x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = (self._lam(i - 1) - self._lam(i)) / h
            d1 = (self._outputs[-2] - m0) / rk
            x_t = x_t - alpha_t * b_h * 0.5 * d1
        return x_t

    def _correct(self, m_t: torch.Tensor, i: int) -> torch.Tensor:
        sig = self.sigmas
        order = self._this_order
        m0 = self._outputs[-1]
        x = self._last_sample
        h = self._lam(i) - self._lam(i - 1)
        alpha_t, sigma_t, sigma_s0 = 1 - sig[i], sig[i], sig[i - 1]
        h_phi_1, b_h, b = self._coefficients(h, order)
        x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0
        d1_t = m_t - m0
        if order == 1:
            return x_t - alpha_t * b_h * 0.5 * d1_t
        rk = (self._lam(i - 2) - self._lam(i - 1)) / h
        d1 = (self._outputs[-2] - m0) / rk
        # rhos_c = solve([[1, 1], [rk, 1]], b): rhos_c[0] weighs the older difference d1, rhos_c[1] the new one
        rho0 = (b[0] - b[1]) / (1 - rk)
        rho1 = b[0] - rho0
        return x_t - alpha_t * b_h * (rho0 * d1 + rho1 * d1_t)


SOLVERS = {"unipc": UniPCSolver, "euler": EulerSolver}


def make_solver(name: str, sigmas: list[float]):
    """A fresh solver state for one chunk."""
    return SOLVERS[name](sigmas=list(sigmas))
