"""The sympy cost model and the parallel planner (moec.cost_model)."""
from moec.cost_model.hardware import Hardware, load_hardware
from moec.cost_model.planner import Plan, best_plan, rank_plans, single_gpu_prediction
from moec.cost_model.shape import ModelShape

__all__ = ["Hardware", "load_hardware", "Plan", "best_plan", "rank_plans", "single_gpu_prediction", "ModelShape"]
