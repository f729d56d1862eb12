"""Fixtures shared by test modules: structlog reset per test, one PostgreSQL per session,
and the kit's fixtures (`simulate`, `enkwatch`, `hooks`: see tests/kit.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import structlog

from tests.kit import enkwatch, hooks, simulate
from tests.pgkit import HOW_TO_ENABLE, PgServer, find_bin_dir

__all__ = ["enkwatch", "hooks", "simulate"]  # the kit's fixtures, registered for every test


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    """Every test starts from structlog's defaults (capture_logs works on them)."""
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL cluster, started once; skips with how to enable it."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(HOW_TO_ENABLE)
    server = PgServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def dsn(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database for one test."""
    admin = await asyncpg.connect(pg_server.dsn)
    name = f"t{os.getpid()}_{id(object()) % 10**9}"
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    yield pg_server.dsn.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(pg_server.dsn)
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()
