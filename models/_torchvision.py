"""Import torchvision without importing torch._dynamo: about a second of every process start.

torchvision.ops.roi_align imports `is_compile_supported` from torch._dynamo.utils at module level,
and importing torch._dynamo (the compiler front end: sympy, fx, the trace rules) is the largest part
of `import torchvision`. It is needed only under torch.compile. While torchvision is imported, a
stand-in module answers that one name; the real torch._dynamo.utils is imported on the first call
(which only happens while compiling). The stand-in is removed at once, so any later import gets the
real modules; if the stand-in ever fails (another torchvision), torchvision is imported plainly.
"""

import sys
import types

_NAME = "torch._dynamo.utils"


def is_compile_supported(device_type: str) -> bool:
    from torch._dynamo.utils import is_compile_supported as real  # the stand-in is gone by now

    return real(device_type)


def _import_torchvision() -> None:
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules or _NAME in sys.modules:
        import torchvision  # noqa: F401
        return
    stand_in = types.ModuleType(_NAME)
    stand_in.is_compile_supported = is_compile_supported
    sys.modules[_NAME] = stand_in
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision that wants more of torch._dynamo: import it plainly
        for name in [n for n in sys.modules if n.startswith(("torchvision", "torch._dynamo"))]:
            del sys.modules[name]
        sys.modules.pop(_NAME, None)
        import torchvision  # noqa: F401
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]


_import_torchvision()
