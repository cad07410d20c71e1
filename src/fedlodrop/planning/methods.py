"""The planner's methods (SPEC 5): one registry from a method's name to its solver.

Every solver takes the `SystemModel` and the options of `solve` (each uses those it needs) and
returns a result with `gamma`, `objective` and `stats` (equal-bandwidth also `bandwidth`); it raises
InfeasibleError when no rates fit. The solver modules are imported when a method is chosen, so
importing the planner does not import CVXPY.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedlodrop.errors import UserError
from fedlodrop.planning.feasibility import InfeasibleError
from fedlodrop.planning.plan import Plan, make_plan
from fedlodrop.planning.spec import SystemSpec
from fedlodrop.planning.system import SystemModel, system_model

Solver = Callable[..., Any]  # (m, *, gamma, tol, time_limit, warm_start) -> result


def _bnb(m: SystemModel, *, tol: float, time_limit: float, warm_start: bool, **_):
    from fedlodrop.planning.bnb import solve_bnb

    start = None
    if warm_start:  # P-SCA's rates only seed the incumbent; B&B certifies on its own
        try:
            from fedlodrop.planning.psca import solve_psca

            start = solve_psca(m).gamma
        except InfeasibleError:
            raise
        except Exception:  # noqa: BLE001 - a failed warm start must not stop B&B
            start = None
    return solve_bnb(m, eps_rel=tol, time_limit=time_limit, incumbent=start)


def _psca(m: SystemModel, *, tol: float, **_):
    from fedlodrop.planning.psca import solve_psca

    return solve_psca(m, tol=tol)


def _fixed(m: SystemModel, *, gamma: float | str, **_):
    from fedlodrop.planning.baselines import solve_fixed

    return solve_fixed(m, gamma)


def _equal_bandwidth(m: SystemModel, **_):
    from fedlodrop.planning.baselines import solve_equal_bandwidth

    return solve_equal_bandwidth(m)


def _none(m: SystemModel, **_):
    from fedlodrop.planning.baselines import solve_none

    return solve_none(m)


SOLVERS: dict[str, Solver] = {
    "bnb": _bnb,  # certified global optimum (P-SCA warm start)
    "psca": _psca,  # penalised SCA, locally optimal
    "fixed": _fixed,  # one rate for all devices, resources optimised
    "equal-bandwidth": _equal_bandwidth,  # B_k = B_tot / K, rates and resources optimised
    "none": _none,  # no dropout, resources optimised
}
METHODS = tuple(SOLVERS)


def solve(m: SystemModel, method: str, gamma: float | str = "min", tol: float = 1e-4,
          time_limit: float = 600.0, warm_start: bool = True):
    """Rates (and, for equal-bandwidth, the split) by one method; raises InfeasibleError."""
    solver = SOLVERS.get(method)
    if solver is None:
        raise ValueError(f"unknown method '{method}' (one of {', '.join(METHODS)})")
    return solver(m, gamma=gamma, tol=tol, time_limit=time_limit, warm_start=warm_start)


def optimize(spec: SystemSpec, method: str = "bnb", **options) -> Plan:
    """Solve P1 with `method` and return the plan (rates, resources, bound, solver stats)."""
    m = system_model(spec)
    result = solve(m, method, **options)
    return make_plan(spec, result.gamma, method, result.stats, getattr(result, "bandwidth", None), m)


def _parse_gamma(text) -> float | str:
    if text is None:
        return "min"
    if isinstance(text, (int, float)):
        return float(text)
    if text in ("best", "min"):
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--gamma must be min, best or a number (got {text!r})") from None


def plan_system(spec: SystemSpec, method: str, gamma=None, tol: float = 1e-4, time_limit: float = 600.0) -> Plan:
    """The plan for a system by one method, with the user's choices checked first: what `fedlodrop
    optimize` prints and writes (`gamma`: fixed only; min, best or a rate)."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if method != "fixed" and gamma is not None:
        raise UserError(f"--gamma applies to --method fixed only (got --method {method})")
    return optimize(spec, method, gamma=_parse_gamma(gamma), tol=tol, time_limit=time_limit)
