"""Runs the shipped Argo CD health check (Lua, through lupa) on a ConnectionBudget object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa  # type: ignore[import-untyped]  # no stubs

SCRIPT = Path(__file__).resolve().parents[2] / "manifests" / "gitops" / "argocd-health.lua"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Argo CD's verdict on ``obj``: (status, message), as its resource customization returns."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj) {SCRIPT.read_text()} end")
    out = check(lua.table_from(obj, recursive=True))
    return str(out["status"]), str(out["message"])
