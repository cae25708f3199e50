"""Folders one process holds at a time: a run's output folder (the trainer), a study's folder (the runners).

The lock is an flock on LOCK inside the folder, released by the kernel when the holder ends however it ends;
LOCK.json beside it says who holds it, so a refusal can name the holder.
"""

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError


def hold_folder(folder: Path, lock_name: str, refusal: str) -> FileLock:
    """Hold `folder` until the lock is released, or refuse with `refusal` (formatted with {folder} and {who})."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    owner_file = folder / f"{lock_name}.json"
    lock = FileLock(folder / lock_name, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(owner_file.read_text())
            who = f"PID {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError):
            who = "a process that has not said who it is yet"
        raise UserError(refusal.format(folder=folder, who=who)) from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    owner_file.write_text(json.dumps(owner))
    return lock
