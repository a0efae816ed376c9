r"""Launching a compiled Triton kernel without Triton's per-call Python work.

``kernel[grid](*args)`` costs tens of microseconds of host time on every call, before the
driver is reached: Triton binds the arguments to the kernel's signature, computes each
argument's specialization (its type, whether an integer is 1 or divisible by 16, whether a
pointer is 16-byte aligned), hashes that into a cache key, finds the compiled kernel, and
only then calls the driver's launcher. For a call whose specialization is already known none of
that is needed.

The package's launchers therefore keep a *plan* per specialization: a dictionary key made of
everything that decides Triton's specialization and the validity of the call (dtypes, shapes,
strides, devices, pointer alignment, which arguments are tensors, integer ranges), built from
cheap tensor attributes. The first call with a new key validates the arguments, goes through
Triton (which compiles and launches) and keeps the compiled kernel in a `DirectLaunch`; every
later call with that key calls the driver's launcher directly with the same argument layout
Triton uses,

    ``compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
    launch_metadata, enter_hook, exit_hook, *arguments)``

(the call in ``JITFunction.run`` of Triton 3.6 to 3.9; the arguments are every parameter of the
kernel in order, constexprs included). Launch hooks (profilers) are honoured as Triton does;
without one, none is passed. Not repeated per call: Triton's check that global values a kernel
read at compile time are unchanged (the package's kernels read only module constants).
In Triton's interpreter there is nothing compiled: every call goes through ``kernel[grid]``.
"""

from __future__ import annotations

import os

from triton import knobs
from triton.runtime.driver import driver

__all__ = ["INTERPRETED", "DirectLaunch"]

#: Whether Triton's interpreter is on (decided when the kernels are defined, at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_runtime_knobs = knobs.runtime


class DirectLaunch:
    """One specialization of a ``triton.jit`` kernel: launched through Triton the first time,
    then by its driver launcher directly.

    ``options`` are Triton's launch options (``num_warps``, ``num_stages``, compiler options);
    A call takes the grid as three numbers and ``args`` holding every parameter of the kernel in
    order, constexprs included, with values that give the specialization this object was made for (the caller's
    plan key guarantees that). ``device`` is the CUDA device index, or ``None`` for the CPU
    tensors of the interpreter or of the stand-in driver of ``tools/gpu_compile_check.py``.
    """

    __slots__ = ("kernel", "options", "device", "compiled", "_run", "_function", "_metadata", "_stream")

    def __init__(self, kernel, options: dict, device: int | None):
        self.kernel = kernel
        self.options = options
        self.device = device
        self.compiled = None
        self._run = None

    def first(self, grid: tuple, args: tuple) -> None:
        """Launch through Triton (compiling if needed) and keep the compiled kernel."""
        compiled = self.kernel[grid](*args, **self.options)
        if compiled is not None and not INTERPRETED:
            self.bind(compiled)

    def warm(self, grid: tuple, args: tuple) -> None:
        """Compile and load the kernel for these arguments without launching it (so that a
        first launch can happen where compiling cannot, as during CUDA-graph capture)."""
        if INTERPRETED or self._run is not None:
            return
        self.bind(self.kernel.warmup(*args, grid=grid, **self.options))

    def bind(self, compiled) -> None:
        """Use ``compiled`` (a ``CompiledKernel``) for the direct launches from now on."""
        self.compiled = compiled
        run = compiled.run  # first: this loads the binary, which sets ``function``
        self._function = compiled.function
        self._metadata = compiled.packed_metadata
        self._stream = driver.active.get_current_stream
        self._run = run

    def __call__(self, grid: tuple, args: tuple) -> None:
        run = self._run
        if run is None:
            self.first(grid, args)
            return
        stream = self._stream(self.device)
        enter = _runtime_knobs.launch_enter_hook
        if enter is None or not getattr(enter, "calls", True):
            # No hook installed (Triton's hooks are chains, empty unless a profiler adds one):
            # nothing for the launcher to call.
            run(grid[0], grid[1], grid[2], stream, self._function, self._metadata, None, None, None, *args)
        else:
            metadata = self.compiled.launch_metadata(grid, stream, *args)
            run(grid[0], grid[1], grid[2], stream, self._function, self._metadata, metadata, enter,
                _runtime_knobs.launch_exit_hook, *args)
