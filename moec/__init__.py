"""moec: a compiler from dense PyTorch transformers to Mixture-of-Experts training programs."""

__version__ = "0.1.0"


class MoecError(Exception):
    """An error the user can fix; the CLI prints its message on one line and exits 2."""


from moec import ops, experts  # noqa: E402,F401  registers the moec:: ops
