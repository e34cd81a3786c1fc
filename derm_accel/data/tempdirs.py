"""Temporary work folders beside an output, and the removal of those a killed run left behind.

A folder is removed only when it provably belongs to an earlier run of the same command that is no longer
running: its name has the prefix this module gives, it holds our marker file, it belongs to this user, and
the marker's process is gone from this host (or is another process that reused the id). Anything else is
left alone.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from derm_accel.core.paths import temp_prefix

logger = logging.getLogger(__name__)

MARKER = ".derm-accel-tmp.json"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_temp_dir(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` (``.OUT.KIND-xxxxxxxx``) with a marker naming this process."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, f".{kind}-"), dir=out.parent))
    owner = {
        "tool": f"derm-accel {kind}",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "process_start": _process_start(os.getpid()),
    }
    (tmp / MARKER).write_text(json.dumps(owner))
    return tmp


def _is_stale(folder: Path, kind: str) -> bool:
    try:
        if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            return False
        owner = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False  # no marker: not provably ours
    if not isinstance(owner, dict) or owner.get("tool") != f"derm-accel {kind}":
        return False
    if owner.get("host") != socket.gethostname():
        return False  # a run on another machine sharing this folder may still be going
    if owner.get("boot_id") and owner.get("boot_id") != _boot_id():
        return True  # the machine rebooted since: that process is gone
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if not _alive(pid):
        return True
    started = owner.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)  # the id was reused


def remove_stale_temp_dirs(out: Path, kind: str) -> list[Path]:
    """Remove the temporary folders of killed ``kind`` runs for ``out``; returns what was removed."""
    prefix = temp_prefix(out.name, f".{kind}-")
    removed = []
    if not out.parent.is_dir():
        return removed
    for folder in sorted(out.parent.glob(f"{glob.escape(prefix)}*")):
        if len(folder.name) == len(prefix) + 8 and _is_stale(folder, kind):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            logger.warning("removed %s, left behind by an interrupted run", folder)
    return removed
