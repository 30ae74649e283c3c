"""What goes first on the *sglang-router process's* ``PYTHONPATH`` (:data:`ROUTER_SHIM_DIR`).

The router is Rust (``sglang_router_rs``), but its launcher (``python -m
sglang_router.launch_router``) imports the Python debug balancer ``mini_lb``, which tries
``from sglang.srt.tracing.trace import ...`` and carries on without tracing on ImportError. Where
SGLang is installed next to the router, that import loads SGLang's whole package (torch,
transformers, sympy, ...): measured at 0.3 s for the router's own modules against 25 s with it
on a busy 2-core machine, paid at every router start and restart. The ``sglang/`` here shadows
SGLang in that process only and raises ImportError, so the launcher takes its own no-tracing
path; nothing the Rust router runs imports Python SGLang.
"""

from __future__ import annotations

import os

ROUTER_SHIM_DIR = os.path.dirname(os.path.abspath(__file__))


def router_env(base_pythonpath: str | None = None) -> dict[str, str]:
    """Environment additions of a router process: :data:`ROUTER_SHIM_DIR` first on PYTHONPATH
    (``base_pythonpath`` defaults to this process's)."""
    base = os.environ.get("PYTHONPATH", "") if base_pythonpath is None else base_pythonpath
    rest = [p for p in base.split(os.pathsep) if p and os.path.abspath(p) != ROUTER_SHIM_DIR]
    return {"PYTHONPATH": os.pathsep.join([ROUTER_SHIM_DIR, *rest])}
