"""How the model is run fast on a device, without changing what it computes beyond the
tolerance of the chosen precision: autocast precision, channels-last convolutions, VAE
micro-batches, optional ``torch.compile``, CPU threads and how freed CPU memory is reused.

Measured on CPU (2 threads, SD v1.5 shape, 256 x 256, fp32): channels-last makes the VAE ~1.3-1.5x
faster and does not help the UNet; batching the UNet pays (~1.5x at 4 slices), batching the VAE
does not (with glibc's default allocator a batch of 4 was ~2x slower per slice, with freed
memory retained it is the same), so the VAE of large slices runs one slice at a time, which
also bounds its memory. Keeping freed memory in the heap saves ~15 % of the wall time. For a
tiny VAE (kilobytes a slice) batching pays. CUDA gets bf16, channels-last everywhere and whole
batches (see docs/performance.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sdfsmis.memory import retain_freed_memory

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: On CPU, a VAE whose widest full-resolution activation of one slice is at least this large is
#: run one slice at a time, in channels-last.
LARGE_SLICE_BYTES = 4 * 2**20


@dataclass
class InferenceOptions:
    """``precision``: ``auto`` is bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 on CPU.
    ``channels_last``: ``None`` is the measured choice: on CUDA the VAE and the UNet, on CPU the
    VAE when its slices are large. ``vae_batch``: slices per VAE call; 0 is the measured choice:
    the whole batch on CUDA and for small slices on CPU, else 1.
    ``threads``: CPU threads; 0 keeps torch's default (``OMP_NUM_THREADS`` or all cores).
    ``retain_memory``: :func:`retain_freed_memory`; ``None`` is on for a CPU model whose
    activations are large (SD-FSMIS's VAE at the real shape), where it pays: for DPL at the real
    shape it gained no time and left the first run over a 512 x 512 x 180 head 30-50 MB higher,
    the freed buffers of each batch kept between the pieces the request holds on to."""

    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    vae_batch: int = 0
    threads: int = 0
    retain_memory: bool | None = None

    def retains_memory(self, device: torch.device, large_activations: bool = True) -> bool:
        if self.retain_memory is not None:
            return self.retain_memory
        return device.type == "cpu" and large_activations

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision != "auto":
            if self.precision not in PRECISIONS:
                raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
            return self.precision
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Autocast for reduced precision; a no-op for fp32 (weights stay fp32 either way)."""
        precision = self.resolved_precision(device)
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=PRECISIONS[precision])


def accelerate(model: torch.nn.Module, options: InferenceOptions) -> torch.nn.Module:
    """Apply ``options`` to a one-shot model in place, for inference. The VAE and UNet settings
    concern SD-FSMIS; DPL (DINOv2 + small MLPs) takes the threads, memory and compile options."""
    device = model.device
    if options.threads:
        torch.set_num_threads(options.threads)
    vae = model.codec.vae if hasattr(model, "codec") else None  # SD-FSMIS's; DPL has none
    large = vae is not None and 4 * vae.config.block_out_channels[0] * model.config.resolution**2 >= LARGE_SLICE_BYTES
    if options.retains_memory(device, large):
        retain_freed_memory()
    if vae is None:
        if options.compile:
            model.dinov2.compile()
        return model
    on_cpu_large = device.type == "cpu" and large
    model.codec.batch = options.vae_batch or (1 if on_cpu_large else 0)
    if options.channels_last or (options.channels_last is None and (device.type == "cuda" or on_cpu_large)):
        model.codec.channels_last = True
        vae.to(memory_format=torch.channels_last)
        if device.type == "cuda":  # on CPU the UNet is slower in channels-last (measured)
            for module in (model.unet, model.conv_in, model.conv_in_ref):
                module.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed slice shapes: pick the fastest kernels once
    if options.compile:
        model.unet.compile()
        model.codec.vae.decoder.compile()
    return model
