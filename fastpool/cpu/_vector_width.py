"""Kernels compiled without 512-bit vectors, where that is faster: ``narrow_vectors()``.

LLVM reads a function's ``"min-legal-vector-width"`` attribute as the widest vector its
code needs. clang writes it on every function (``"0"`` unless the function uses wider
vector types); Numba writes none, and LLVM takes a missing attribute to mean "any
width". On CPUs whose LLVM tuning prefers 256-bit vectors (Intel's AVX-512 cores,
Skylake-SP to Sapphire Rapids) that tuning then limits only the vectoriser's choice of
lanes, not the width of the types it produces: a loop that reads float32 and divides in
float64 takes 8 float32 lanes and divides them with a 512-bit ``vdivpd``. A few such
instructions put the core under AVX-512's clock licence, and after about a millisecond
without 512-bit code the core leaves it, so the next call waits for it again. On the
Intel Xeon of 2026-12-07 (LLVM: ``rocketlake``) the channels-last global average of
(1, 512, 7, 7) float32 took 3.2 us in a loop of calls and 4.9 us after 1 ms of other
work; compiled with ``"0"``, 3.0 and 3.1 us.

Not for every kernel: the same attribute on all of fastpool's kernels made 2x2 max
pooling of (1, 512, 14, 14) 1.3x slower (its 512-bit shuffles split in two) and
convolutions up to 1.08x slower (their 512-bit gathers and index arithmetic split), in
the layer suite's own timing (a call after 12 ms of other work). So a kernel body asks
for it: ``narrow_vectors()`` as its first statement.

The attribute must be on every function the body's module inlines, not only on the
body: LLVM drops it from a function into which it inlines one without it (Numba's
``NRT_MemInfo_data_fast`` goes into every ``np.empty``). So ``install()`` wraps Numba's
``CPUCodeLibrary._optimize_final_module``: a library whose code asked (its module, with
everything linked in, about to be optimised) has ``"0"`` put on every defined function
without the attribute, by rewriting the module's text as LLVM prints it. Code that
writes 512-bit vectors on purpose (the GEMM tile, ``_lanes.interleaved_sum_wide``)
calls ``allow_vector_bits(builder, 512)`` in its codegen and keeps its width, also
where it is inlined. Where Numba lacks the method or the library of the code being
lowered, kernels compile as Numba's own (``installed()`` says which). Numba's disk cache
keys on a kernel's source file: after changing this module, clear the caches.
"""

from __future__ import annotations

import re
import threading
import weakref

from numba import types
from numba.extending import intrinsic

ATTRIBUTE = "min-legal-vector-width"
_NARROW = f'"{ATTRIBUTE}"="0"'

_lock = threading.Lock()
_asked = weakref.WeakSet()  # code libraries whose code called narrow_vectors()
_installed = False


def _width(attributes):
    """The attribute's value in a set of llvmlite function attributes, or None."""
    prefix = f'"{ATTRIBUTE}"="'
    for attribute in attributes:
        if isinstance(attribute, str) and attribute.startswith(prefix):
            return int(attribute[len(prefix):-1])
    return None


def _set_width(function, bits):
    """Set ``function``'s attribute to ``bits`` (llvmlite's attribute sets take only
    LLVM's enumerated attributes through ``add``; a string attribute is printed as it is
    stored)."""
    attributes = function.attributes
    for attribute in [a for a in attributes if _width([a]) is not None]:
        set.discard(attributes, attribute)
    set.add(attributes, f'"{ATTRIBUTE}"="{int(bits)}"')


def allow_vector_bits(builder, bits):
    """Let the function ``builder`` writes into hold vectors of ``bits`` bits (call in
    the codegen of an intrinsic that emits vectors wider than 256 bits)."""
    width = _width(builder.function.attributes)
    if width is None or width < bits:
        _set_width(builder.function, bits)


@intrinsic
def narrow_vectors(typingctx):
    """Compile the calling kernel (and all it inlines) without 512-bit vectors unless
    its code writes them itself (see the module's docstring)."""

    def codegen(context, builder, signature, args):
        if _width(builder.function.attributes) is None:
            _set_width(builder.function, 0)
        library = getattr(context, "active_code_library", None)
        if library is not None:
            _asked.add(library)
        return context.get_dummy_value()

    return types.none(), codegen


_GROUP = re.compile(r"^attributes #(\d+) = \{ (.*) \}$", re.M)
_GROUP_REFERENCE = re.compile(r" #(\d+)(?= )")
# a definition without function attributes, where nothing follows the parameters
_BARE = re.compile(r"\)( (?:local_)?unnamed_addr)? \{$")


def narrowed(text):
    """LLVM IR ``text`` (as LLVM prints a module) with ``"min-legal-vector-width"="0"``
    on every defined function that has no such attribute. LLVM prints a definition's
    function attributes as one group reference (``#N``) before anything else that may
    follow its parameters; a definition whose attributes cannot be found so is left as
    it is."""
    groups = {int(n): body for n, body in _GROUP.findall(text)}
    fresh = max(groups, default=-1) + 1
    made = {}  # attribute group body -> its number

    def group_with(body):
        nonlocal fresh
        if body not in made:
            made[body] = fresh
            fresh += 1
        return made[body]

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("define "):
            continue
        reference = _GROUP_REFERENCE.search(line)
        if reference is not None:
            body = groups.get(int(reference.group(1)))
            if body is None or ATTRIBUTE in body:
                continue
            number = group_with(f"{body} {_NARROW}")
            lines[i] = line[:reference.start()] + f" #{number}" + line[reference.end():]
        elif _BARE.search(line):
            lines[i] = line[:-1] + f"#{group_with(_NARROW)} {{"
    lines.extend(f"attributes #{number} = {{ {body} }}" for body, number in made.items())
    return "\n".join(lines)


def install():
    """Install the wrapper once per process; returns whether it is installed."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            import llvmlite.binding as ll
            from numba.core import base, codegen
            library = codegen.CPUCodeLibrary
            original = library._optimize_final_module
            if not hasattr(base.BaseContext, "active_code_library"):
                return False
        except (ImportError, AttributeError):
            return False

        def _optimize_final_module(self):
            if self in _asked:
                module = self._final_module
                try:
                    replacement = ll.parse_assembly(narrowed(str(module)))
                except RuntimeError:  # not as LLVM prints it: compiled as it was
                    replacement = None
                if replacement is not None:
                    replacement.name = module.name
                    self._final_module = replacement
            return original(self)

        _optimize_final_module.__wrapped__ = original
        library._optimize_final_module = _optimize_final_module
        _installed = True
        return True


def installed():
    """Whether ``narrow_vectors()`` takes effect in this process."""
    return _installed
