"""Tiny EP builds of examples/llama.py, compiled once per test session."""
from pathlib import Path

from moec.base.options import Options
from moec.driver.compiler import compile_model

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=32)
EP_BUILDS = {
    "plain": {},
    "ep2": dict(ep=2),
    "ep4": dict(ep=4),
    "ep4_hier": dict(ep=4, ep_variant="hierarchical", node_size=2),
    "ep2_ckpt": dict(ep=2, recompute_experts=True),
    "ep2_recompute": dict(ep=2, recompute=True),
    "ep4_rbd": dict(ep=4, ep_variant="rbd", node_size=2),
    "ep2_overlap": dict(ep=2, ep_chunks=3),
    "ep4_overlap": dict(ep=4, ep_chunks=2),
}


def compile_builds(out: Path, names=tuple(EP_BUILDS)) -> dict:
    """{name: build dir}: 8 experts top-2, noisy upcycling so the experts differ."""
    dirs = {}
    for name in names:
        dirs[name] = str(out / name)
        options = Options(experts=8, topk=2, upcycle_noise=0.5, overrides=TINY, verify=False, **EP_BUILDS[name])
        compile_model(str(ROOT / "examples" / "llama.py"), dirs[name], options.validate(), log=lambda s: None)
    return dirs
