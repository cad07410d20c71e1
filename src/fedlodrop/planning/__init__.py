"""Edge resource planning (SPEC 3 to 5): per-device dropout rates, bandwidth, power and CPU
frequency that minimise the generalization-error bound within a round's latency and energy.

    spec = load_system("system.yaml")            # or random_system(10, seed=0)
    plan = optimize(spec, "bnb")                 # "bnb" | "psca" | "fixed" | "equal-bandwidth" | "none"
    plan.save("plan.json"); plan.gammas          # per-device rates for training
    round_costs(plan.system, plan.devices, uplink_bits)   # latency/energy of measured bytes

Nothing here imports training code (or torch).
"""

from __future__ import annotations

from fedlodrop.planning.feasibility import InfeasibleError
from fedlodrop.planning.plan import Plan, SolverStats, load_plan, make_plan, round_costs
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.spec import SystemSpec, dump_system, load_system, save_system, system_from_dict
from fedlodrop.planning.system import SystemModel, system_model

METHODS = ("bnb", "psca", "fixed", "equal-bandwidth", "none")

__all__ = [
    "METHODS", "InfeasibleError", "Plan", "SolverStats", "SystemModel", "SystemSpec",
    "dump_system", "load_plan", "load_system", "make_plan", "optimize", "random_system", "round_costs",
    "save_system", "solve", "system_from_dict", "system_model",
]


def solve(m: SystemModel, method: str, gamma: float | str = "min", tol: float = 1e-4,
          time_limit: float = 600.0, warm_start: bool = True):
    """Rates (and, for equal-bandwidth, the split) by one method; raises InfeasibleError."""
    if method == "bnb":
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
    if method == "psca":
        from fedlodrop.planning.psca import solve_psca

        return solve_psca(m, tol=tol)
    from fedlodrop.planning import baselines

    if method == "fixed":
        return baselines.solve_fixed(m, gamma)
    if method == "equal-bandwidth":
        return baselines.solve_equal_bandwidth(m)
    if method == "none":
        return baselines.solve_none(m)
    raise ValueError(f"unknown method '{method}' (one of {', '.join(METHODS)})")


def optimize(spec: SystemSpec, method: str = "bnb", **options) -> Plan:
    """Solve P1 with `method` and return the plan (rates, resources, bound, solver stats)."""
    m = system_model(spec)
    result = solve(m, method, **options)
    return make_plan(spec, result.gamma, method, result.stats, getattr(result, "bandwidth", None), m)
