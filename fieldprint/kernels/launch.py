"""A Triton launch prepared once and repeated with a few tensors swapped (a decode plan's per-layer call).

`kernel[grid](*args)` binds every argument, derives the specialization key, looks the compiled kernel
up and only then launches: for the decode kernel's 35 arguments that is 60-76 us of Python per call
on the H200's host (docs/attention.md), paid per layer by every call outside a CUDA graph.
`PreparedLaunch` makes the first call through Triton (which compiles the kernel or finds it, and
decides its specialization), then calls that compiled kernel's launcher itself with an argument list
built once: the fixed tensors as their device addresses (the launcher takes integers for pointers),
the constexprs in their places. A later call swaps in the per-call tensors' addresses and launches.

What the compiled kernel assumed must still hold for a direct call, so one is made only when:
- every per-call tensor is on the planned device, which is the current one, and 16-byte aligned, as
  at the first call (Triton specializes pointers on 16-byte alignment; a first call that saw one
  misaligned keeps Triton's path);
- no launch hook is installed (profilers such as Proton see launches through those hooks);
- the compiled kernel exposes the launcher this module calls (`run`, `function`, `packed_metadata`).
Anything else takes Triton's full path, which is always correct. The launch keeps its fixed tensors
referenced (their addresses are baked into it); the caller must not resize or replace their storage.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton.language as tl

from fieldprint.errors import KernelInputError


def _runtime_knobs():
    try:
        from triton import knobs
    except ImportError:  # a Triton without knobs: no way to see its hooks, so no direct calls
        return None
    return knobs.runtime


_RUNTIME = _runtime_knobs()  # read per call: importing inside the call cost 5 us of the 20 it took


def _hooks_idle() -> bool:
    """Whether Triton has no launch hook installed (a direct call would bypass it)."""
    if _RUNTIME is None:
        return False
    for hook in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook):
        # Triton 3.6 and 3.9 keep hooks in a HookChain (never None); a plain callable or None is handled too.
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return False
    return True


@functools.cache  # per kernel: inspecting a signature costs tens of microseconds, and a plan is made per step
def _constexpr_names(fn) -> list[str]:
    """The kernel's tl.constexpr parameters, in order (a JIT function or, under TRITON_INTERPRET, its interpreted one)."""
    names = []
    for name, p in inspect.signature(fn.fn).parameters.items():
        a = p.annotation
        if a is tl.constexpr or (isinstance(a, str) and a.split(".")[-1] == "constexpr"):
            names.append(name)
    return names


class PreparedLaunch:
    """One kernel's launch with fixed arguments, `slots` of which are per-call tensors.

    fn: the @triton.jit kernel; grid: its 1-3 dimensional grid; args: its positional arguments
    (everything before the constexprs; `None` at the slots); constexprs and options: as keywords to
    `fn[grid]`. `launch(*tensors)` fills the slots in order and launches on the current stream.
    """

    def __init__(self, fn, grid: tuple[int, ...], args: list, constexprs: dict, options: dict,
                 slots: tuple[int, ...], device: torch.device) -> None:
        names = list(fn.arg_names)
        tail = names[len(args):]
        declared = _constexpr_names(fn)
        if tail != declared or sorted(constexprs) != sorted(declared):
            raise ValueError(f"{names}: the constexprs must be exactly the arguments after the {len(args)} positional "
                             f"ones, the kernel's constexprs {declared}; got {sorted(constexprs)}")
        self.fn, self.args, self.constexprs, self.options, self.slots = fn, args, constexprs, options, slots
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.device = device
        self._direct: list = []  # the launcher's argument list, made when a direct call is first possible
        self._compiled = None
        self._stream = None
        self.why_not_direct = "no launch yet"

    @property
    def direct(self) -> bool:
        """Whether calls go straight to the compiled kernel's launcher (after a first launch through Triton)."""
        return self._compiled is not None

    def launch(self, *tensors: torch.Tensor) -> None:
        if len(tensors) != len(self.slots):
            raise ValueError(f"this launch takes {len(self.slots)} tensors (its slots {self.slots}), got {len(tensors)}")
        c = self._compiled
        if c is not None and _hooks_idle() and torch.cuda.current_device() == self.device.index:
            a = self._direct.copy()
            index = self.device.index
            for i, t in zip(self.slots, tensors):
                p = t.data_ptr()
                if p & 15 or t.get_device() != index:
                    break  # not what the compiled kernel was specialized for: Triton's path below
                a[i] = p
            else:
                g = self.grid
                c.run(g[0], g[1], g[2], self._stream(index), c.function, c.packed_metadata, None, None, None, *a)
                return
        for n, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise KernelInputError(f"per-call tensor {n} must be a tensor on {self.device}, got {where}")
        args = self.args.copy()
        for i, t in zip(self.slots, tensors):
            args[i] = t
        compiled = self.fn[self.grid](*args, **self.constexprs, **self.options)
        if c is None and self.device.type == "cuda":
            self._adopt(compiled, tensors)

    def _adopt(self, compiled, tensors) -> None:
        """After a launch through Triton: keep its compiled kernel for direct calls, if they are safe."""
        if any(t.data_ptr() & 15 for t in tensors):
            self.why_not_direct = "a per-call tensor was not 16-byte aligned at the first launch"
        elif not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            self.why_not_direct = f"this Triton's compiled kernel ({type(compiled).__name__}) has no launcher to call"
        elif not _hooks_idle():
            self.why_not_direct = "a Triton launch hook is installed"
        else:
            from triton.runtime import driver

            self._stream = driver.active.get_current_stream
            # Every argument in signature order, constexprs included (the launcher skips them).
            self._direct = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self.args] + [
                self.constexprs[n] for n in list(self.fn.arg_names)[len(self.args):]]
            self._compiled = compiled
            self.why_not_direct = ""


@functools.lru_cache(maxsize=256)
def _prepared(fn, grid: tuple, args: tuple, slots: tuple, constexprs: tuple, device: torch.device) -> PreparedLaunch:
    return PreparedLaunch(fn, grid, list(args), dict(constexprs), {}, slots, device)


def launch_prepared(fn, grid: tuple, args: list, **constexprs) -> None:
    """fn[grid](*args, **constexprs) for a kernel launched with changing tensors but few shapes (the
    sampler's): on CUDA through a PreparedLaunch made once per (grid, plain arguments, constexprs) and
    kept (the last 256), every tensor argument a per-call slot; elsewhere Triton's own call."""
    dev = args[0].device
    if dev.type != "cuda":
        fn[grid](*args, **constexprs)
        return
    slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    plain = tuple(None if i in slots else a for i, a in enumerate(args))
    _prepared(fn, grid, plain, slots, tuple(constexprs.items()), dev).launch(*(args[i] for i in slots))
