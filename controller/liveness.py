"""Is the controller that wrote controller.json still running? (No heavy imports.)

controller.json holds the writer's pid; a file left by a killed process must not count.
Used by `keys rotate` (refused while a controller runs) and by a controller that finds
another one on its data directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def process_running(pid: object) -> bool:
    """Whether ``pid`` names a live process (signal 0 only asks)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def live_info(path: Path) -> dict[str, object] | None:
    """controller.json's fields when the process that wrote it still runs, else None."""
    try:
        info = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not process_running(info.get("pid")):
        return None
    return info
