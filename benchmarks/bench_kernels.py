"""Benchmark ccm_kernels' fused ops against eager (unfused) PyTorch and torch.compile, side by side.

    python benchmarks/bench_kernels.py                 # CUDA when available, else CPU
    python benchmarks/bench_kernels.py --device cpu --quick --no-compile

Rows per case: the public op (the Triton kernel on CUDA; on CPU it runs the reference, so the row
measures the op's checks, plus the custom op's dispatch where gradients are wanted: a consistency
step without them calls the reference directly), the eager unfused reference, and torch.compile of
that reference (inductor's own fusion). Times are medians; every row of a case runs in this process
on the same inputs, so the ratios are like for like.

Achieved bandwidth counts the minimum bytes an op must move (docs/kernels.md):

    consistency_step   numel * itemsize * (2 + 1 + 2 * with_noise)    reads m, x (+ noise), writes denoised (+ x_next)
    conv1 epilogue     numel(h) * itemsize * (1 + 1 + training)      reads conv1(x), writes act (+ pre-activation)
    conv2 epilogue     numel(x) * itemsize * 3                       reads conv2(h) and x, writes out
    adapter block      not a bandwidth figure (two convolutions): time only

and is compared with the device peak (CUDA: from the memory clock and bus width) and with a copy
measured in the same run (``dst.copy_(src)``: 2 * bytes / time), the practical ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import ccm_kernels
from ccm_kernels import adapter_residual_block, consistency_step
from ccm_kernels.reference import adapter_residual_block_reference, consistency_step_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- timing --------------------------------------------------------------------------------------


def bench(fn, device: str, *, quick: bool) -> float:
    """Median seconds per call of one function."""
    return bench_rows([("fn", fn)], device, quick=quick)[0][1]


def bench_rows(named: list[tuple[str, object]], device: str, *, quick: bool) -> list[tuple[str, float]]:
    """Median seconds per call of each function; on CPU the calls interleave round by round, so
    load from other processes hits every row alike and the ratios stay fair."""
    if device == "cuda":
        try:
            import triton.testing

            return [(name, triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                                   return_mode="median") / 1e3) for name, fn in named]  # fmt: skip
        except ImportError:
            return [(name, _bench_cuda_events(fn, reps=20 if quick else 100)) for name, fn in named]
    for _, fn in named:
        for _ in range(3):  # first calls pay for thread pools, allocator growth, lazy init
            fn()
    budget, times = (0.3 if quick else 2.0), {name: [] for name, _ in named}
    start_all = time.perf_counter()
    while len(times[named[0][0]]) < 10 or (time.perf_counter() - start_all < budget and len(times[named[0][0]]) < 1000):
        for name, fn in named:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(times[name])) for name, _ in named]


def _bench_cuda_events(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, quick: bool) -> float:
    """GB/s of ``dst.copy_(src)`` on a 256 MiB (CUDA) / 64 MiB (CPU) buffer, counting read + write."""
    numel = (64 if device == "cuda" else 16) * 2**20
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src), device, quick=quick)
    return 2 * numel * 4 / seconds / 1e9


def device_peak_gbps(device: str) -> float | None:
    """Spec DRAM bandwidth of the current CUDA device (triton reads clock and bus width), else None."""
    if device != "cuda":
        return None
    try:
        import triton.testing

        return float(triton.testing.get_dram_gbps())
    except Exception:  # older triton, or no driver query: the copy figure still gives a ceiling
        return None


# --- reporting -----------------------------------------------------------------------------------


def report(title: str, rows: list[tuple[str, float]], nbytes: int | None, ceilings: dict[str, float]) -> None:
    eager = dict(rows).get("eager unfused (reference)")
    print(f"\n{title}")
    header = f"  {'implementation':<34}{'time':>11}{'GB/s':>9}"
    header += "".join(f"{'% ' + name:>12}" for name in ceilings) + f"{'vs eager':>10}"
    print(header)
    for name, seconds in rows:
        line = f"  {name:<34}{seconds * 1e6:>9.1f}us"
        if nbytes is not None:
            gbps = nbytes / seconds / 1e9
            line += f"{gbps:>9.1f}" + "".join(f"{100 * gbps / peak:>11.1f}%" for peak in ceilings.values())
        else:
            line += f"{'-':>9}" + "".join(f"{'-':>12}" for _ in ceilings)
        line += f"{eager / seconds:>9.2f}x" if eager else ""
        print(line)


# --- cases ---------------------------------------------------------------------------------------


def consistency_inputs(shape, dtype, device, *, noise: bool, clip: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = shape[0]
    m, s = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    alpha = (torch.rand(batch, generator=g) * 0.9 + 0.05).to(device)
    c_skip = torch.rand(batch, generator=g).to(device)
    coefficients = [alpha.sqrt(), (1 - alpha).sqrt(), c_skip, (1 - c_skip**2).sqrt()]
    kwargs = {"prediction_type": "epsilon", "clip_sample_range": 1.0 if clip else None}
    if noise:
        kwargs.update(noise=torch.randn(shape, generator=g).to(device=device, dtype=dtype),
                      sqrt_alpha_next=alpha.flip(0).sqrt(), sqrt_one_minus_alpha_next=(1 - alpha.flip(0)).sqrt())  # fmt: skip
    return m, s, coefficients, kwargs


def bench_consistency(shape, dtype, device, args, ceilings) -> None:
    for noise in (False, True):
        m, s, coefficients, kwargs = consistency_inputs(shape, dtype, device, noise=noise, clip=True)
        nbytes = m.numel() * m.element_size() * (3 + 2 * noise)
        fused = lambda: consistency_step(m, s, *coefficients, **kwargs)  # noqa: E731
        eager = lambda: consistency_step_reference(m, s, *coefficients, **kwargs)  # noqa: E731
        named = [(fused_label(device), fused), ("eager unfused (reference)", eager)]
        if not args.no_compile:
            compiled_fn = torch.compile(consistency_step_reference)
            named.append(("torch.compile(reference)", lambda: compiled_fn(m, s, *coefficients, **kwargs)))
        rows = bench_rows(named, device, quick=args.quick)
        title = f"consistency_step forward {tuple(shape)} {str(dtype)[6:]} epsilon clip {'noise' if noise else 'no noise'}"
        report(f"{title}  [{device.upper()}]", rows, nbytes, ceilings)

    # training: forward + backward w.r.t. model_output and sample
    m, s, coefficients, kwargs = consistency_inputs(shape, dtype, device, noise=False, clip=True)
    m.requires_grad_()
    s.requires_grad_()
    grad = torch.randn_like(m)

    def train(fn):
        return lambda: torch.autograd.grad(fn(m, s, *coefficients, **kwargs)[0], (m, s), grad)

    named = [(fused_label(device), train(consistency_step)),
             ("eager unfused (reference)", train(consistency_step_reference))]  # fmt: skip
    rows = bench_rows(named, device, quick=args.quick)
    # forward reads 2 writes 1, backward reads grad (+ m, s for the clip mask) writes 2
    nbytes = m.numel() * m.element_size() * (3 + 5)
    report(f"consistency_step forward+backward {tuple(shape)} {str(dtype)[6:]} epsilon clip  [{device.upper()}]",
           rows, nbytes, ceilings)  # fmt: skip


def adapter_params(shape, hidden, k, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    channels = shape[1]
    params = [
        torch.randn(shape, generator=g),
        torch.randn(hidden, channels, k, k, generator=g) * (channels * k * k) ** -0.5,
        torch.randn(hidden, generator=g),
        torch.randn(channels, hidden, k, k, generator=g) * (hidden * k * k) ** -0.5,
        torch.randn(channels, generator=g),
    ]
    return [p.to(device=device, dtype=dtype) for p in params]


def bench_adapter(shape, hidden, dtype, device, args, ceilings) -> None:
    params = adapter_params(shape, hidden, 3, dtype, device)
    with torch.no_grad():
        named = [(fused_label(device), lambda: adapter_residual_block(*params)),
                 ("eager unfused (reference)", lambda: adapter_residual_block_reference(*params))]  # fmt: skip
        if not args.no_compile:
            compiled_fn = torch.compile(adapter_residual_block_reference)
            named.append(("torch.compile(reference)", lambda: compiled_fn(*params)))
        rows = bench_rows(named, device, quick=args.quick)
    report(f"adapter_residual_block forward {tuple(shape)} hidden={hidden} k=3 {str(dtype)[6:]} silu  [{device.upper()}]",
           rows, None, ceilings)  # fmt: skip

    leaves = [p.clone().requires_grad_() for p in params]
    grad = torch.randn_like(params[0])

    def train(fn):
        return lambda: torch.autograd.grad(fn(*leaves), leaves, grad)

    named = [(fused_label(device), train(adapter_residual_block)),
             ("eager unfused (reference)", train(adapter_residual_block_reference))]  # fmt: skip
    rows = bench_rows(named, device, quick=args.quick)
    report(f"adapter_residual_block forward+backward {tuple(shape)} hidden={hidden} {str(dtype)[6:]} silu  [{device.upper()}]",
           rows, None, ceilings)  # fmt: skip

    if device == "cuda" and ccm_kernels.kernel_backend() == "triton":
        bench_adapter_epilogues(params, dtype, args, ceilings)


def bench_adapter_epilogues(params, dtype, args, ceilings) -> None:
    """The two fused epilogue kernels alone, against eager's bias/activation/add ops on the same tensors."""
    import torch.nn.functional as F

    from ccm_kernels import _backend
    from ccm_kernels.adapter_residual import _ACTIVATION_CODES, _kernels, _plane_grid

    x, w1, b1, _, b2 = params
    kernels = _kernels(_backend.interpreter_enabled())
    conv1 = F.conv2d(x, w1, padding=1)
    hidden = torch.empty_like(conv1)
    grid1, hw1, block1, warps1 = _plane_grid(conv1, "bench")
    grid2, hw2, block2, warps2 = _plane_grid(x, "bench")
    y, out = torch.randn_like(x), torch.empty_like(x)
    for training in (False, True):
        preact = torch.empty_like(conv1)

        def fused1():
            kernels.bias_activation[grid1](conv1, b1, hidden, preact, hw1, conv1.shape[1],
                                           ACTIVATION=_ACTIVATION_CODES["silu"], STORE_PREACT=training, BLOCK=block1,
                                           num_warps=warps1)  # fmt: skip

        eager1 = lambda: F.silu(conv1 + b1.reshape(-1, 1, 1))  # noqa: E731
        named = [("fused Triton epilogue", fused1), ("eager unfused (reference)", eager1)]
        rows = bench_rows(named, "cuda", quick=args.quick)
        nbytes = conv1.numel() * conv1.element_size() * (2 + training)
        title = f"conv1 epilogue bias+silu{' +pre-activation' if training else ''} {tuple(conv1.shape)} {str(dtype)[6:]}"
        report(f"{title}  [CUDA]", rows, nbytes, ceilings)

    def fused2():
        kernels.bias_residual[grid2](y, b2, x, out, hw2, x.shape[1], BLOCK=block2, num_warps=warps2)

    eager2 = lambda: x + (y + b2.reshape(-1, 1, 1))  # noqa: E731
    rows = bench_rows([("fused Triton epilogue", fused2), ("eager unfused (reference)", eager2)], "cuda", quick=args.quick)
    report(f"conv2 epilogue bias+residual {tuple(x.shape)} {str(dtype)[6:]}  [CUDA]", rows,
           x.numel() * x.element_size() * 3, ceilings)  # fmt: skip


def fused_label(device: str) -> str:
    if device == "cuda" and ccm_kernels.kernel_backend() == "triton":
        return "fused op (Triton)"
    return "op (dispatches to reference)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), action="append",
                        help="repeatable; default float16 and float32 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and the smallest shapes only")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile rows (inductor compiles for a while on CPU)")
    parser.add_argument("--threads", type=int,
                        help="CPU intra-op threads (torch.set_num_threads); 1 is steadiest on a shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    default_dtypes = [torch.float16, torch.float32] if device == "cuda" else [torch.float32]
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else default_dtypes
    os.environ.setdefault("CCM_KERNELS", "auto")
    torch.manual_seed(0)

    print(f"ccm_kernels benchmark on {device.upper()}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({torch.get_num_threads()} threads)")
          + f"; CCM_KERNELS={os.environ['CCM_KERNELS']}, backend for CUDA tensors: {ccm_kernels.kernel_backend()}")  # fmt: skip
    if device == "cpu":
        print("CPU run: the ops execute their PyTorch reference here; no Triton kernel is timed.")
    ceilings = {"copy": copy_bandwidth(device, args.quick)}
    peak = device_peak_gbps(device)
    if peak:
        ceilings["peak"] = peak
    print("bandwidth ceilings: " + ", ".join(f"{k} {v:.0f} GB/s" for k, v in ceilings.items()))

    if device == "cuda":
        consistency_shapes = [(4, 4, 128, 128)] + ([] if args.quick else [(64, 4, 256, 256)])
        adapter_cases = [((2, 320, 64, 64), 320)] + ([] if args.quick else [((8, 320, 128, 128), 320)])
    else:
        consistency_shapes = [(4, 4, 64, 64)] + ([] if args.quick else [(16, 4, 128, 128)])
        adapter_cases = [((2, 64, 32, 32), 64)] + ([] if args.quick else [((2, 320, 32, 32), 320)])
    for dtype in dtypes:
        for shape in consistency_shapes:
            bench_consistency(shape, dtype, device, args, ceilings)
        for shape, hidden in adapter_cases:
            bench_adapter(shape, hidden, dtype, device, args, ceilings)


if __name__ == "__main__":
    main()
