"""sample_ffn_inputs: run calibration tokens through the dense graph and keep what each FFN reads.

Matches: gm.meta["ffns"]. Rewrites nothing. Records gm.meta["ffn_inputs"]: {module: [N, D] float32 rows
of that FFN's input} for the windows of WINDOWS tokens of the calibration text (the embedded text unless
--calibration-data) the model takes first, which ffn_to_moe's data-aware router initialisations read. A build without weights at
compile time (meta tensors: the first pipeline run of a build from a model file's own initialisation, and
builds over --max-weights-gb, which write no weights for a router to start from) records nothing; one whose
graph does not take token ids says so on the console. A graph on the meta device with gm.meta["dense_values"]
runs on the CPU with each weight read when its node runs and dropped after its last use, and stops at the
last FFN input (never computing the logits), so that a model's weights are never all held.
"""
import torch
import torch.fx

from moec.base.options import Options
from moec.passes.base import Pass, PassResult
from moec.runtime.training.data import load_tokens

# 2048 tokens, one forward of the dense model at compile time, as long as train.py's default sequence: an
# FFN input depends on its position (learned position tables), so a router calibrated on the first 32
# positions routes positions 32-127 unevenly; models with a shorter context get the short windows
WINDOWS = ((16, 128), (32, 32))


class _Seen(Exception):
    """Every wanted input is recorded: what the graph computes after them is not needed."""


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, wanted: dict, values=None):
        super().__init__(gm)
        self.wanted, self.seen, self.values, self.names = wanted, {}, values, {}  # names: meta tensor -> its attr

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.wanted:
            self.seen[self.wanted[n]] = value.detach().reshape(-1, value.shape[-1]).float()
            if len(self.seen) == len(self.wanted):
                raise _Seen
        return value

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if self.values is not None and isinstance(value, torch.Tensor) and value.is_meta:
            self.names[id(value)] = target
        return value

    def call_function(self, target, args, kwargs):
        if self.values is not None:
            # an exported graph reads every weight at its start: each is read here, by the node that uses
            # it, and dropped after it
            read = lambda a: self.values(self.names[id(a)]) if isinstance(a, torch.Tensor) and a.is_meta \
                and id(a) in self.names else a  # noqa: E731
            args, kwargs = torch.fx.node.map_aggregate(args, read), torch.fx.node.map_aggregate(kwargs, read)
        return super().call_function(target, args, kwargs)


class SampleFFNInputs(Pass):
    name = "sample_ffn_inputs"
    requires = ("ffns",)
    provides = ("ffn_inputs",)

    def __init__(self, options: Options):
        self.o, self.skipped = options, None

    def _tokens(self, gm, stream: torch.Tensor, seqs: int, seq_len: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.o.seed)
        starts = torch.randint(0, max(len(stream) - seq_len, 1), (seqs,), generator=g)
        device = next(gm.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        return torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).to(device, gm.meta["inputs"][0][1])

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        gm.meta["ffn_inputs"] = {}
        inputs = gm.meta.get("inputs", [])
        if len(inputs) != 1 or inputs[0][1] not in (torch.int64, torch.int32):
            self.skipped = "the graph does not take token ids alone"
        elif "dense_values" in gm.meta or not any(t.is_meta for t in gm.parameters()):
            gm.meta["ffn_inputs"] = self._sample(gm)
        return PassResult(gm, False)

    def _sample(self, gm) -> dict:
        logits = next(n for n in gm.graph.nodes if n.op == "output").args[0]["logits"].meta["val"]
        stream = torch.from_numpy(load_tokens(self.o.calibration_data).astype("int64")) % logits.shape[-1]
        was = gm.training
        gm.train(False)  # dropout off: the inputs the deterministic model sees
        try:
            for seqs, seq_len in WINDOWS:
                recorder = _Recorder(gm, {f.x: f.module for f in gm.meta["ffns"]}, gm.meta.get("dense_values"))
                try:
                    with torch.no_grad():
                        try:
                            recorder.run(self._tokens(gm, stream, seqs, seq_len))
                        except _Seen:
                            pass
                    self.skipped = None
                    return recorder.seen
                except Exception as e:  # e.g. a context shorter than the windows: the build goes on
                    self.skipped = f"the dense model failed on {seqs} x {seq_len} calibration tokens: " \
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return {}
        finally:
            gm.train(was)

    def warnings(self, gm) -> list[str]:
        return [f"no calibration ({self.skipped}): routers start random"] if self.skipped else []

    def report(self, gm) -> list[str]:
        if not gm.meta["ffn_inputs"]:
            return [f"nothing sampled ({self.skipped or 'no weights at compile time'})"]
        return [f"{m}: {tuple(x.shape)} rows, mean norm {x.mean(0).norm():.3g}, row norm {x.norm(dim=1).mean():.3g}"
                for m, x in gm.meta["ffn_inputs"].items()]
