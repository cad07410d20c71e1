"""SPEC 4: the generalization-error bound G(gamma) = Emp(gamma) + Gap(gamma) and its calibration.

Facts the solvers rely on (checked in tests):
* Emp is convex and increasing in every gamma_k (gamma / (1 - gamma) is).
* Gap(s) is convex and decreasing in s, and s(gamma) is concave, so Gap(s(gamma)) is convex.
  Hence G is convex on [0, 1)^K: every difficulty of P1 lies in the resource constraints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlodrop.planning.spec import BoundSpec


@dataclass(frozen=True)
class Bound:
    """The bound for one system: constants plus the sample weights w_k = D_k / N."""

    spec: BoundSpec
    w: np.ndarray
    N: float

    @classmethod
    def of(cls, system) -> Bound:
        """The bound of a system model (its constants, device weights and total samples)."""
        return cls(system.bound, system.w, system.N)

    # ---- the pieces of SPEC 4 ----
    def sparsity(self, gamma) -> np.ndarray:
        """s(gamma) = sum_k w_k (2 gamma_k - gamma_k^2); gamma has devices on its last axis."""
        g = np.asarray(gamma, dtype=float)
        return (2.0 * g - g * g) @ self.w

    def gap_of_s(self, s):
        """The Gap term at expected sparsity s."""
        b = self.spec
        inner = b.M**2 + 24.0 * b.M * b.rho**2 / (b.lambda_min + 2.0 * b.lam * np.asarray(s))
        return np.sqrt(inner / (2.0 * self.N * b.delta))

    def dgap_ds(self, s):
        """Gap'(s) < 0 (increasing, because Gap is convex)."""
        b = self.spec
        z = b.lambda_min + 2.0 * b.lam * np.asarray(s)
        d_inner = -24.0 * b.M * b.rho**2 * 2.0 * b.lam / z**2
        return d_inner / (2.0 * self.N * b.delta) / (2.0 * self.gap_of_s(s))

    def emp(self, gamma):
        """Emp(gamma): e0 + c_emp sum_k w_k gamma_k / (1 - gamma_k), the empirical-risk term."""
        g = np.asarray(gamma, dtype=float)
        return self.spec.e0 + self.spec.c_emp * (g / (1.0 - g)) @ self.w

    def gap(self, gamma):
        """Gap(gamma): the stability term, at the rates' expected sparsity."""
        return self.gap_of_s(self.sparsity(gamma))

    def value(self, gamma):
        """G(gamma) = Emp(gamma) + Gap(gamma)."""
        return self.emp(gamma) + self.gap(gamma)

    def box_lower(self, a, b) -> float:
        """SPEC 5's monotone bound on the box [a, b]: Emp(a) + Gap(b)."""
        return float(self.emp(a) + self.gap(b))

    # ---- exact minimisers used by the solvers and baselines ----
    def s_minimiser(self, lam: float, s_lo: float, s_hi: float) -> float:
        """argmin over s in [s_lo, s_hi] of Gap(s) + lam s (convex, so: clip the free minimiser).

        Gap'(s) = -lam means z^3 (M^2 z + C) = (C lambda / (lam sqrt(2 N delta)))^2 with
        z = Lambda_min + 2 lambda s and C = 24 M rho^2; the left side increases in z, so Newton
        from an upper bound converges monotonically.
        """
        b = self.spec
        if lam <= 0.0 or b.lam == 0.0:
            return s_hi
        C = 24.0 * b.M * b.rho**2
        k2 = (C * b.lam / (lam * math.sqrt(2.0 * self.N * b.delta))) ** 2
        m2 = b.M**2
        z = min((k2 / m2) ** 0.25, (k2 / C) ** (1.0 / 3.0))
        for _ in range(60):
            phi = m2 * z**4 + C * z**3 - k2
            step = phi / (4.0 * m2 * z**3 + 3.0 * C * z**2)
            z -= step
            if abs(step) <= 1e-15 * z:
                break
        s = (z - b.lambda_min) / (2.0 * b.lam)
        return min(max(s, s_lo), s_hi)

    def gap_scalar(self, s: float) -> float:
        """The Gap term at expected sparsity s, for a float (no numpy): the solvers' inner loops."""
        b = self.spec
        return math.sqrt((b.M**2 + 24.0 * b.M * b.rho**2 / (b.lambda_min + 2.0 * b.lam * s)) / (2.0 * self.N * b.delta))

    def gamma_star_scalar(self, lam: float) -> float:
        """The rate that minimises the bound's Lagrangian for one device at multiplier `lam` (-inf when lam <=
        0)."""
        c = self.spec.c_emp
        if lam <= 0.0:
            return -math.inf
        return 1.0 if c == 0.0 else 1.0 - (c / (2.0 * lam)) ** (1.0 / 3.0)

    def gamma_star(self, lam):
        """Per-device minimiser over R of c_emp g/(1-g) - lam (2g - g^2): (1-g)^3 = c_emp / (2 lam)."""
        lam = np.asarray(lam, dtype=float)
        c = self.spec.c_emp
        with np.errstate(divide="ignore", invalid="ignore"):
            if c == 0.0:
                return np.where(lam > 0, 1.0, -np.inf)
            return np.where(lam > 0, 1.0 - np.cbrt(c / (2.0 * np.maximum(lam, 1e-300))), -np.inf)

    def minimise_box(self, lo, hi) -> np.ndarray:
        """Exact argmin of G over the box [lo, hi] (G convex; KKT: gamma_k = clip(gamma*(lam)))."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)

        def point(lam: float) -> np.ndarray:
            return np.clip(self.gamma_star(lam), lo, hi)

        # F(lam) = lam + Gap'(s(point(lam))) is increasing; its root is the optimal multiplier.
        def F(lam: float) -> float:
            return lam + float(self.dgap_ds(self.sparsity(point(lam))))

        a, b = 0.0, max(1e-12, -float(self.dgap_ds(self.sparsity(lo))))
        if F(a) >= 0:
            return point(a)
        for _ in range(200):
            if F(b) >= 0:
                break
            b *= 2.0
        for _ in range(100):
            m = 0.5 * (a + b)
            if F(m) < 0:
                a = m
            else:
                b = m
        return point(b)

    def best_common(self, lo: float = 0.0, hi: float = 0.99) -> float:
        """argmin over one shared gamma in [lo, hi] of G(gamma 1) (convex in gamma)."""

        def dG(g: float) -> float:
            s = 2.0 * g - g * g
            return self.spec.c_emp / (1.0 - g) ** 2 + float(self.dgap_ds(s)) * (2.0 - 2.0 * g)

        if dG(lo) >= 0:
            return lo
        if dG(hi) <= 0:
            return hi
        a, b = lo, hi
        for _ in range(100):
            m = 0.5 * (a + b)
            if dG(m) < 0:
                a = m
            else:
                b = m
        return 0.5 * (a + b)


def emp_feature(rate: float | list[float], weights: list[float] | None = None) -> float:
    """x = sum_k w_k gamma_k / (1 - gamma_k), weighted as the bound weights devices (w_k = D_k / N;
    without weights, equal ones)."""
    rates = np.atleast_1d(np.asarray(rate, dtype=float))
    w = np.full(len(rates), 1.0 / len(rates)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    return float(w @ (rates / (1.0 - rates)))


def sparsity_feature(rate: float | list[float], weights: list[float] | None = None) -> float:
    """s = sum_k w_k (2 gamma_k - gamma_k^2), the expected sparsity the Gap term is a function of."""
    rates = np.atleast_1d(np.asarray(rate, dtype=float))
    w = np.full(len(rates), 1.0 / len(rates)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    return float(w @ (2.0 * rates - rates * rates))


def fit_empirical(x, losses) -> tuple[float, float, float]:
    """Ordinary least squares of loss = e0 + c_emp x (x: `emp_feature`), with the sign the data gives:
    a negative c_emp says the error falls as the rate rises, which the bound (c_emp >= 0) cannot
    express; the caller decides. Returns (e0, c_emp, rmse)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(x) != len(y):
        raise ValueError("rates and losses differ in length")
    A = np.stack([np.ones_like(x), x], axis=1)
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    rmse = float(math.sqrt(np.mean((A @ coef - y) ** 2)))
    return float(coef[0]), float(coef[1]), rmse


@dataclass(frozen=True)
class Curve:
    """f(x, s) = e0 + c x + sqrt(a + b / (1 + kappa s)): the bound's shape (Emp + Gap) with free
    constants, x = sum w gamma/(1-gamma), s the expected sparsity. With c, a, b, kappa >= 0 it is
    convex in the rates, so B&B and P-SCA minimise it as they minimise the bound (`as_bound`)."""
    e0: float
    c: float
    a: float
    b: float
    kappa: float

    def __call__(self, x, s):
        """The curve's value at emp feature x and sparsity s."""
        return self.e0 + self.c * np.asarray(x) + np.sqrt(self.a + self.b / (1.0 + self.kappa * np.asarray(s)))

    def as_bound(self, N: float, objective: str = "bound") -> BoundSpec:
        """The BoundSpec whose Emp + Gap equal this curve for a system of N samples: lambda_min = 1,
        lam = kappa / 2, delta = 1/2, M^2 / N = a, 24 M rho^2 / N = b."""
        a, b = max(self.a, 1e-12), max(self.b, 1e-12)
        M = math.sqrt(a * N)
        return BoundSpec(M=M, rho=math.sqrt(b * N / (24.0 * M)), lambda_min=1.0, lam=self.kappa / 2.0, delta=0.5,
                         e0=max(self.e0, 0.0), c_emp=self.c, objective=objective)


def fit_curve(x, s, y, gap_only: bool = False) -> tuple[Curve, float]:
    """Least squares of y = e0 + c x + sqrt(a + b / (1 + kappa s)) with c, a, b, kappa >= 0 (the
    convex family); `gap_only`: e0 = c = 0 (the Gap term alone, fitted to measured gaps). Returns
    the curve and its rmse."""
    from scipy.optimize import least_squares

    x, s, y = (np.asarray(v, dtype=float) for v in (x, s, y))
    top = max(float(np.max(np.abs(y))), 1e-6)

    def unpack(p):
        return Curve(0.0, 0.0, *p) if gap_only else Curve(*p)

    def residual(p):
        return unpack(p)(x, s) - y

    best = None
    for kappa in (0.1, 1.0, 10.0):
        p0 = [top**2 / 4, top**2 / 4, kappa] if gap_only else [float(np.min(y)) / 2, 0.0, 1e-4, top**2 / 4, kappa]
        lo = [0.0, 0.0, 0.0] if gap_only else [-np.inf, 0.0, 0.0, 0.0, 0.0]
        fit = least_squares(residual, p0, bounds=(lo, np.inf))
        if best is None or fit.cost < best.cost:
            best = fit
    curve = unpack(best.x)
    return curve, float(math.sqrt(np.mean(residual(best.x) ** 2)))
