"""Peak memory of attention's forward + backward at a long length: the flash-style kernels keep
O(L) extra memory, so the peak RSS growth stays near the size of the inputs and gradients.

    python -m aiayn.bench.memory [--length 16384] [--heads 8] [--dim 64]

Prints one line with the seconds taken and the growth of the process's peak RSS (ru_maxrss)
during one forward + backward, next to the bytes of q, k, v, out and their gradients.
"""

import resource
import time

import torch

import aiayn
from aiayn.errors import ArgumentParser


def main(argv=None):
    parser = ArgumentParser(prog="python -m aiayn.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    B, H, L, D = 1, args.heads, args.length, args.dim
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    out = aiayn.functional.scaled_dot_product_attention(q, k, v)
    torch.autograd.grad(out, (q, k, v), grad)
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    tensors = 4 * q.nbytes / 2**20  # out and the three gradients, allocated during the call
    print(f"attention fwd+bwd B{B} H{H} L{L} D{D} float32: {seconds:.1f} s, peak RSS growth {growth:.0f} MiB "
          f"(out + grads alone: {tensors:.0f} MiB; an L x L score matrix would be {B * H * L * L * 4 / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
