"""Triton's interpreter (the kernel tests' CPU path) without its repeated language patching.

Every launch under TRITON_INTERPRET=1 patches triton.language (each builtin of tl, tl.core,
tl.math and tl.tensor, found by inspect.getmembers) and restores it when the launch ends. Triton
3.6 also runs that patch at every call of a nested @triton.jit function inside the launch, where
it changes nothing: the builtins are already replaced (a replacement is not a builtin, so it is
skipped), and the tensor attributes it sets again are the launch's own, which the launch's
restore puts back. The mat-vec kernels make thousands of such calls: the patching was 37% of a
decode step of tests/models/test_fusions.py's micro models. `install()` skips a nested call's
patch while a launch that patched the same language modules is running; the kernels run the same
code on the same patched language.

Applied only where the interpreter has the shape this was written for (Triton 3.6:
`interpreter._patch_lang(fn) -> scope` with `scope.restore()`); elsewhere nothing changes.
"""

from __future__ import annotations

import inspect


def install() -> bool:
    """Skip redundant patches from now on; False (and no change) when Triton is not the shape
    this expects."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "_kiln_once", False):
        return False
    if list(inspect.signature(original).parameters) != ["fn"]:
        return False
    if not callable(getattr(scope_type, "restore", None)):
        return False

    # the language modules patched by each running launch, innermost last (a nested call that
    # does patch something, which kiln's kernels never need, stays on until its launch ends)
    active: list[frozenset[int]] = []

    def langs(fn) -> frozenset[int]:
        return frozenset(
            id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
        )

    def patch_lang(fn):
        mine = langs(fn)
        if active and mine and mine <= active[-1]:
            return scope_type()  # nothing to do, nothing to restore
        scope = original(fn)
        entry = mine | (active[-1] if active else frozenset())
        active.append(entry)
        depth = len(active)
        restore = scope.restore

        def restore_and_pop() -> None:
            restore()
            del active[depth - 1 :]  # this launch's entry and any nested one above it

        scope.restore = restore_and_pop
        return scope

    patch_lang._kiln_once = True
    interpreter._patch_lang = patch_lang
    return True
