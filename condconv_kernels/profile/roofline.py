"""The device's two ceilings, measured in the run that uses them: the arithmetic rate of a large
matrix product and the bandwidth of a large copy (bytes read plus bytes written). A layer's
floor is max(operations / rate, bytes / bandwidth); its time over that floor is the gap."""
from __future__ import annotations

import dataclasses

import torch

from .timing import time_callable


@dataclasses.dataclass(frozen=True)
class Ceilings:
    flops_per_s: float   # a large matrix product in the benchmark's dtype
    bytes_per_s: float   # a large copy, bytes read plus bytes written
    matmul_size: int
    copy_bytes: int

    def floor_ms(self, flops: float, nbytes: float) -> float:
        """The fewest milliseconds a call with this work can take on this device."""
        return 1e3 * max(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def describe(self) -> str:
        return (f"ceilings measured in this run: {self.flops_per_s / 1e12:.2f} TFLOP/s "
                f"({self.matmul_size}^3 matrix product), {self.bytes_per_s / 1e9:.1f} GB/s "
                f"(copy of {self.copy_bytes / 2 ** 20:.0f} MiB, read + write)")


def measure_ceilings(device: str = "cpu", dtype: torch.dtype = torch.float32,
                     matmul_size: int | None = None, copy_mib: int | None = None,
                     min_run_time: float = 0.3) -> Ceilings:
    """Times a matmul_size^3 product of random ``dtype`` matrices and a copy of copy_mib MiB.
    Defaults: 8192 and 1024 MiB on CUDA, 2048 and 256 MiB elsewhere (512 for 16-bit floats:
    a CPU without bfloat16 instructions multiplies them hundreds of times slower, ~1 minute
    for one 2048^3 bfloat16 product on a 2-core machine)."""
    cuda = torch.device(device).type == "cuda"
    n = matmul_size or (8192 if cuda else 2048 if torch.finfo(dtype).bits > 16 else 512)
    mib = copy_mib or (1024 if cuda else 256)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm_ms = time_callable(lambda: torch.mm(a, b, out=c), device, min_run_time).median_ms
    del a, b, c
    src = torch.randn(mib * 2 ** 18, generator=g).to(device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    copy_ms = time_callable(lambda: dst.copy_(src), device, min_run_time).median_ms
    nbytes = src.numel() * src.element_size()
    return Ceilings(2 * n ** 3 / (mm_ms * 1e-3), 2 * nbytes / (copy_ms * 1e-3), n, nbytes)
