"""The one error a DataModule raises when its benchmark's official layout is incomplete."""

from __future__ import annotations

from pathlib import Path

MAX_LISTED = 20


def layout_error(benchmark: str, root: Path, missing: list[str], hint: str = "") -> FileNotFoundError:
    """A FileNotFoundError listing every missing item (at most ``MAX_LISTED`` lines) with a hint."""
    lines = missing[:MAX_LISTED]
    if len(missing) > MAX_LISTED:
        lines.append(f"... and {len(missing) - MAX_LISTED} more")
    listing = "\n".join(f"  {line}" for line in lines)
    return FileNotFoundError(f"{benchmark} layout under {root} incomplete; missing:\n{listing}" + (f"\n{hint}" if hint else ""))
