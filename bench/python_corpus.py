"""A training corpus larger than the embedded text, made from what any Python install holds: the Python
source files of this interpreter's standard library and site-packages, each distinct file once, in an order
fixed by a hash of its contents (so the held-out tail mixes packages), up to --mb megabytes.

    python bench/python_corpus.py -o build/corpus.txt --mb 256

Quality benchmarks use it where nothing can be downloaded; byte tokens (train.py --data build/corpus.txt).
"""
import argparse
import hashlib
import site
import sys
import sysconfig
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--mb", type=float, default=256)
    args = p.parse_args()
    roots = {Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())}
    files = {}
    for root in sorted(roots):
        for f in sorted(root.rglob("*.py")):
            try:
                text = f.read_bytes()
            except OSError:
                continue
            files.setdefault(hashlib.blake2b(text, digest_size=16).hexdigest(), text)
    budget, size = int(args.mb * 2**20), 0
    with open(args.out, "wb") as out:
        for _, text in sorted(files.items()):
            if size >= budget:
                break
            out.write(text[:budget - size] + b"\n")
            size += min(len(text), budget - size) + 1
    print(f"{args.out}: {size / 2**20:.1f} MiB from {len(files)} distinct files under {len(roots)} roots "
          f"({sys.executable})")


if __name__ == "__main__":
    main()
