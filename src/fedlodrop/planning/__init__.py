"""Edge resource planning (SPEC 3 to 5): per-device dropout rates, bandwidth, power and CPU
frequency that minimise the generalization-error bound within a round's latency and energy.

    spec = load_system("system.yaml")            # or random_system(10, seed=0)
    plan = optimize(spec, "bnb")                 # "bnb" | "psca" | "fixed" | "equal-bandwidth" | "none"
    plan.save("plan.json"); plan.gammas          # per-device rates for training
    round_costs(plan.system, plan.devices, uplink_bits)   # latency/energy of measured bytes

Modules: arch (model sizes), spec (the system file), system (SPEC 3's model), bound (SPEC 4),
feasibility, bnb / psca / baselines (the solvers), methods (name -> solver), plan (plan.json),
scenarios (random systems), tradeoff (the plot-tradeoff sweeps).
Nothing here imports training code (or torch).
"""

from __future__ import annotations

from fedlodrop.planning.feasibility import InfeasibleError
from fedlodrop.planning.methods import METHODS, SOLVERS, optimize, plan_system, solve
from fedlodrop.planning.plan import Plan, SolverStats, load_plan, make_plan, round_costs
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.spec import SystemSpec, dump_system, load_system, save_system, system_from_dict
from fedlodrop.planning.system import SystemModel, system_model

__all__ = [
    "METHODS", "SOLVERS", "InfeasibleError", "Plan", "SolverStats", "SystemModel", "SystemSpec",
    "dump_system", "load_plan", "load_system", "make_plan", "optimize", "plan_system", "random_system", "round_costs",
    "save_system", "solve", "system_from_dict", "system_model",
]
