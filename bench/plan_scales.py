"""The planner at the scales of the MoE-parallelism papers: for a Mixtral-like and a DeepSeek-V3-like model on
256-1024 GPUs of the Frontier (MI250X) and MI300X profiles, the fastest plan with pipeline parallelism against
the fastest without, by the cost model's prediction (no GPU needed).

    python bench/plan_scales.py

Per row: the plan, its micro-batches, predicted step time, MFU (active FLOPs over peak), the pipeline's
bubble factor (M + PP - 1) / M, which the compute, all-to-all and tensor-parallel terms are stretched by (and,
with PP, by the slowest rank's share of the FLOPs in the stage cut), and the peak memory of one GPU (with PP,
the largest stage's in the cut `moec compile` makes); "train.py" says whether the emitted
program runs the plan, and the last two rows of each case are the fastest among those it runs. The global batch is the planner's default, about 4 M tokens a step.
"""
import argparse

from moec.base.options import Options
from moec.cost_model.hardware import load_hardware
from moec.cost_model.known_models import MIXTRAL_8X7B
from moec.cost_model.planner import gib, rank_plans
from moec.cost_model.shape import ModelShape

# DeepSeek-V3's published shape (arXiv:2412.19437) with 60 layers instead of 61, so that pipelines of 2, 3, 4,
# 5 and 6 stages divide it, and grouped-query attention of 128 heads in place of MLA, which moec does not model
DEEPSEEK_V3_LIKE = (ModelShape(layers=60, hidden=7168, ffn=18432, vocab=129280, heads=128, kv_heads=128,
                               gated=True, tied_embeddings=False, seq_len=4096, name="DeepSeek-V3-like"),
                    Options(experts=256, topk=8, shared_experts=1, first_dense=3, expert_ffn=2048))
MODELS = {"mixtral": (MIXTRAL_8X7B.shape(), MIXTRAL_8X7B.moe), "deepseek-v3": DEEPSEEK_V3_LIKE}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--hardware", nargs="*", default=["frontier", "mi300x"])
    p.add_argument("--gpus", nargs="*", type=int, default=[256, 512, 1024])
    args = p.parse_args()
    print("| model | hardware | GPUs | best | plan | M | step s | MFU | bubble | peak GiB/GPU | train.py |")
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    verdicts = []
    for name in args.models:
        shape, moe = MODELS[name]
        for hw_name in args.hardware:
            hw = load_hardware(hw_name)
            for gpus in args.gpus:
                ranked, _ = rank_plans(shape, moe, gpus, hw)
                runs = lambda x: not any(moe.with_plan(x).runtime_problems())  # noqa: E731
                best = {"with PP": next((x for x in ranked if x.pp > 1), None),
                        "without PP": next((x for x in ranked if x.pp == 1), None),
                        "with PP, train.py runs": next((x for x in ranked if x.pp > 1 and runs(x)), None),
                        "without PP, train.py runs": next((x for x in ranked if x.pp == 1 and runs(x)), None)}
                for which, plan in best.items():
                    if plan is None:
                        print(f"| {shape.name} | {hw_name} | {gpus} | {which} | none fits | | | | | | |")
                        continue
                    bubble = (plan.micro_batches + plan.pp - 1) / plan.micro_batches
                    print(f"| {shape.name} | {hw_name} | {gpus} | {which} | {plan.label()} | {plan.micro_batches} | "
                          f"{plan.step_time_s:.2f} | {plan.mfu:.1%} | {bubble:.3f} | "
                          f"{gib(plan.peak_memory_bytes)} | {'yes' if runs(plan) else 'no'} |")
                ratio = lambda w, wo: f"{w.mfu / wo.mfu:.2f}x" if w and wo else "n/a"  # noqa: E731
                verdicts.append(f"{shape.name}, {hw_name}, {gpus} GPUs: MFU with PP / without "
                                f"{ratio(best['with PP'], best['without PP'])}; among the plans train.py runs "
                                f"{ratio(best['with PP, train.py runs'], best['without PP, train.py runs'])}")
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
