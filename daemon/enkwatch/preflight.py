"""What `run` would refuse at start, found before anything starts: for `check-config` and `run`.

Every check reads and never writes: `check-config` must not create the state file, nor any
directory, as a side effect. PostgreSQL states are not contacted here (`run` reports a
database it cannot reach when it connects).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from enkwatch.config import Config, StateConfig, load_api_key
from enkwatch.errors import ConfigError

MEMORY: Final = ":memory:"
# the first bytes of every SQLite 3 database file
SQLITE_MAGIC: Final = b"SQLite format 3\x00"


def preflight_problems(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem that would stop `run` at start, with the key (or variable) it comes from."""
    problems: list[str] = []
    try:
        load_api_key(config, environ)
    except ConfigError as err:
        problems += err.problems
    problems += state_path_problems(config.state)
    problems += idle_problems(config)
    return problems


def state_path_problems(state: StateConfig) -> list[str]:
    """Why SQLite could not open (or create) the state file; nothing is created."""
    path = state.path
    if path == MEMORY or state.shared:
        return []
    file = Path(path)
    where = f"state.path: {path}"
    if file.exists():
        if not file.is_file():
            return [f"{where}: is not a regular file (a directory?)"]
        if not os.access(file, os.R_OK | os.W_OK):
            return [f"{where}: cannot be read and written by this user"]
        try:
            with file.open("rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
        except OSError as err:
            return [f"{where}: cannot be read: {err.strerror or err}"]
        if head and head != SQLITE_MAGIC:
            return [f"{where}: is not a SQLite database (not an enkwatch state file)"]
        folder = file.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            # WAL mode keeps its -wal and -shm files beside the database
            return [f"{where}: its directory {folder} is not writable (SQLite needs it)"]
        return []
    folder = file.parent
    if not folder.exists():
        return [f"{where}: the directory {folder} does not exist"]
    if not folder.is_dir():
        return [f"{where}: {folder} is not a directory"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"{where}: cannot create the file: the directory {folder} is not writable"]
    return []


def idle_problems(config: Config) -> list[str]:
    """An empty watch list that nothing could fill: `run` would idle forever."""
    if config.tasks or config.discover or config.admin.listen is not None:
        return []  # `discover:` entries fill the watch list from the API's lists
    path = config.state.path
    if config.state.shared:
        return []  # other replicas, or migrate-state, fill a shared watch list
    if path != MEMORY and Path(path).is_file():
        return []  # tasks added through the admin API in earlier runs are kept in the state
    return [
        "tasks: the watch list is empty and nothing can add to it: list tasks under "
        "`tasks:`, find them with `discover:`, or set admin.listen to add them at run time "
        "(POST /tasks)"
    ]
