"""The hardware sheet: named devices with their published peaks, and the efficiencies the cost model assumes.

Every peak is the vendor's datasheet figure for dense math (no 2:4 sparsity), per device. `float32` is the
CUDA-core FP32 peak (no tensor cores): PyTorch runs float32 matmuls without TF32 unless asked (torch.backends.cuda.
matmul.allow_tf32 is off by default), so a float32 server gets that peak, not the tensor cores'. `tf32` is the
tensor cores' TF32 peak (dense: the datasheets' headline TF32 figure on Hopper, Ada and the A10 is with sparsity,
halved here), what float32 tensors get when the server asks for TF32 matmuls (`jitney simulate --dtype tf32`;
tensors stay float32 in memory, 4 bytes an element). `link` is the
device-to-device bandwidth one way (NVLink's or PCIe's published figure is both ways together: halved here),
which prices the tensor-parallel all-reduces. Memory is in GB (10^9 bytes), as benchmarks/memory_plan.py counts.
"""
from __future__ import annotations

from dataclasses import dataclass

TERA, GIGA = 1e12, 1e9


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float
    bandwidth: float             # memory bytes/s
    flops: dict[str, float]      # dense FLOP/s (or OP/s for int8) per dtype
    link: float                  # bytes/s one way to a peer (NVLink, else PCIe)
    link_name: str
    source: str

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.flops:
            raise ValueError(f"the {self.name} sheet has no {dtype} peak: choose one of {', '.join(self.flops)}")
        return self.flops[dtype]


def _gpu(name, memory_gb, bandwidth_gbs, fp32_t, tf32_t, half_t, int8_t, link_gbs_both_ways, link_name, source
         ) -> Device:
    return Device(name, memory_gb, bandwidth_gbs * GIGA,
                  {"float32": fp32_t * TERA, "tf32": tf32_t * TERA, "bfloat16": half_t * TERA, "float16": half_t * TERA,
                   "int8": int8_t * TERA},
                  link_gbs_both_ways / 2 * GIGA, link_name, source)


DEVICES: dict[str, Device] = {d.name: d for d in (
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia.com, "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"):
    # FP32 19.5 TFLOPS, TF32 tensor 156 (312 sparse), BF16/FP16 tensor 312, INT8 624 TOPS; 40 GB HBM2 at 1,555
    # GB/s, 80 GB HBM2e at 2,039 GB/s (SXM); NVLink 3 600 GB/s.
    _gpu("a100-40gb", 40, 1555, 19.5, 156, 312, 624, 600, "NVLink 3", "NVIDIA A100 datasheet (SXM 40 GB)"),
    _gpu("a100-80gb", 80, 2039, 19.5, 156, 312, 624, 600, "NVLink 3", "NVIDIA A100 datasheet (SXM 80 GB)"),
    # NVIDIA H100 datasheet, SXM: FP32 67 TFLOPS, TF32 tensor 989 with sparsity (494.5 dense), BF16/FP16 tensor
    # 989 (1,979 with sparsity), INT8 1,979 TOPS (3,958 sparse); 80 GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s.
    _gpu("h100-sxm", 80, 3350, 67, 494.5, 989, 1979, 900, "NVLink 4", "NVIDIA H100 datasheet (SXM5 80 GB)"),
    # NVIDIA H200 datasheet, SXM: the H100's compute; 141 GB HBM3e at 4.8 TB/s; NVLink 4 900 GB/s.
    _gpu("h200", 141, 4800, 67, 494.5, 989, 1979, 900, "NVLink 4", "NVIDIA H200 datasheet (SXM 141 GB)"),
    # NVIDIA L4 datasheet: FP32 30.3 TFLOPS, TF32 tensor 120 with sparsity (60 dense), BF16/FP16 tensor 121 (242
    # sparse), INT8 242.5 TOPS (485 sparse); 24 GB GDDR6 at 300 GB/s; PCIe Gen4 x16 64 GB/s both ways (no NVLink).
    _gpu("l4", 24, 300, 30.3, 60, 121, 242.5, 64, "PCIe Gen4 x16", "NVIDIA L4 datasheet"),
    # AWS's A10G has no NVIDIA datasheet: these are the A10's (FP32 31.2 TFLOPS, TF32 tensor 62.5 (125 sparse),
    # BF16/FP16 tensor 125 (250 sparse), INT8 250 TOPS; 24 GB GDDR6 at 600 GB/s; PCIe Gen4 x16), an assumption
    # until measured on one.
    _gpu("a10g", 24, 600, 31.2, 62.5, 125, 250, 64, "PCIe Gen4 x16", "NVIDIA A10 datasheet (A10G assumed equal)"),
)}

# Efficiencies: the fraction of a peak a serving step reaches. ASSUMED, not measured here (no GPU was at hand);
# `jitney simulate --calibrate` measures them on the machine it runs on, and validation against real runs is
# pending (docs/simulation.md). Large GEMMs commonly reach 60-80 % of the tensor peak and streaming reads 80-90 %
# of HBM bandwidth; the lower ends are taken, as a serving step mixes small and large matmuls.
COMPUTE_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.8
LINK_EFFICIENCY = 0.8
ALLREDUCE_LATENCY_S = 10e-6   # per all-reduce, ASSUMED: NCCL's small-message latency is of this order
# A sheet device's fixed cost per step, ASSUMED: the host's work around each forward (scheduling, building the
# step's inputs, launching kernels, sampling, handling the outputs) during which the GPU waits. No sheet gives
# it; vLLM's v0.6.0 profile (blog.vllm.ai/2024/09/05/perf-update.html: Llama 3 8B on one H100, 29 % of the time
# in scheduling and input preparation against 38 % on the GPU) puts it at the order of the GPU's own time for a
# small decode step, i.e. a few ms, before vLLM overlapped it with the GPU's work; Vidur (Agrawal et al., MLSys
# 2024) models these CPU operations per step for the same reason. jitney's engine overlaps nothing: 2 ms is taken.
# `--step-overhead-ms` changes it; a calibration (`--calibrate`) fits its own host's value instead.
STEP_OVERHEAD_S = 2e-3


def device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return DEVICES[name]
