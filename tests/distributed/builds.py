"""Tiny EP builds of examples/llama.py, compiled once per test session."""
from pathlib import Path

from moec.driver.compiler import CompileRequest, compile_model
from moec.passes.ffn_to_moe import MoeOptions
from moec.passes.insert_collectives import EPOptions

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=32)
EP_BUILDS = {
    "plain": None,
    "ep2": EPOptions(ep=2),
    "ep4": EPOptions(ep=4),
    "ep4_hier": EPOptions(ep=4, variant="hierarchical", node_size=2),
    "ep2_ckpt": EPOptions(ep=2),  # with recompute_experts
    "ep4_rbd": EPOptions(ep=4, variant="rbd", node_size=2),
    "ep2_overlap": EPOptions(ep=2, chunks=3),
    "ep4_overlap": EPOptions(ep=4, chunks=2),
}


def compile_builds(out: Path, names=tuple(EP_BUILDS)) -> dict:
    """{name: build dir}: 8 experts top-2, noisy upcycling so the experts differ."""
    dirs = {}
    for name in names:
        dirs[name] = str(out / name)
        compile_model(CompileRequest(model=str(ROOT / "examples" / "llama.py"), out=dirs[name], overrides=TINY,
                                     options=MoeOptions(experts=8, topk=2, upcycle_noise=0.5,
                                                        recompute_experts=name.endswith("_ckpt")), verify=False,
                                     ep=EP_BUILDS[name]), log=lambda s: None)
    return dirs
