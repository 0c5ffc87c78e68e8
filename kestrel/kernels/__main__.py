"""Build the C++ CPU kernels now (the set-up runs this): `python -m kestrel.kernels`."""
import sys

from kestrel import kernels

if kernels.load(verbose="-v" in sys.argv) is None:
    print(f"kestrel: C++ CPU kernels not built ({kernels.error()}); engines will run on PyTorch ops alone")
else:
    print(f"kestrel: C++ CPU kernels ready in {kernels.build_dir()}")
