"""Config reload: SIGHUP or a changed file applies the difference; a bad file changes nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.config import load_config
from tests.kit import StartSim, events_named, running, sim_task, until


def write_config(path: Path, base_url: str, tasks: list[dict[str, Any]], **polling: Any) -> None:
    raw = {
        "api": {"base_url": base_url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.05, "jitter": 0, "max_requests_per_second": 0} | polling,
        "state": {"path": str(path.parent / "state.db")},
        "tasks": tasks,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(raw))
    os.replace(tmp, path)  # atomic, like an editor or a ConfigMap update


def forever(name: str) -> dict[str, Any]:
    return sim_task(name, ("Running", None))


async def test_reload_applies_the_difference(tmp_path: Path, simulate: StartSim) -> None:
    cfg = tmp_path / "enkwatch.yaml"
    sim = await simulate(forever("a"), forever("b"), forever("c"))
    url = sim.url
    write_config(cfg, url, [{"task_id": "a"}, {"task_id": "b"}])
    with capture_logs() as logs:
        async with running(load_config(cfg), config_path=str(cfg)) as svc:
            await until(lambda: len(events_named(logs, ev.TASK_TRANSITION)) == 2)
            a_before = svc.running.watchlist.tasks["a"]
            write_config(cfg, url, [{"task_id": "a", "labels": {"x": "1"}}, {"task_id": "c"}])
            await svc.running.watchlist.reload()
            [reloaded] = events_named(logs, ev.CONFIG_RELOADED)
            assert reloaded["added"] == ["c"]
            assert reloaded["removed"] == ["b"]
            assert reloaded["changed"] == ["a"]
            assert reloaded["restart_required"] == []
            assert set(svc.running.watchlist.tasks) == {"a", "c"}
            # an unchanged (or changed-in-place) task keeps its poll state: not restarted
            assert svc.running.watchlist.tasks["a"] is a_before
            assert svc.running.watchlist.tasks["a"].labels == {"x": "1"}
            await until(lambda: any(e["task_key"] == "c" for e in logs if "task_key" in e))
    # no transition was emitted twice for a
    a_transitions = [e for e in events_named(logs, ev.TASK_TRANSITION) if e["task_key"] == "a"]
    assert len(a_transitions) == 1


async def test_invalid_new_config_keeps_the_old_one_running(
    tmp_path: Path, simulate: StartSim
) -> None:
    cfg = tmp_path / "enkwatch.yaml"
    sim = await simulate(forever("a"))
    url = sim.url
    write_config(cfg, url, [{"task_id": "a"}])
    with capture_logs() as logs:
        async with running(load_config(cfg), config_path=str(cfg)) as svc:
            config_before = svc.running.watchlist.config
            cfg.write_text("polling: {interval_seconds: -1, bogus: 2}\ntasks: [{}]\n")
            await svc.running.watchlist.reload()
            [failed] = events_named(logs, ev.CONFIG_RELOAD_FAILED)
            assert failed["log_level"] == "error"
            assert any("polling.interval_seconds" in e for e in failed["errors"])
            assert any("polling.bogus" in e for e in failed["errors"])
            assert any("tasks[0]" in e for e in failed["errors"])
            assert svc.running.watchlist.config is config_before
            polls = svc.running.watchlist.tasks["a"].record.polls
            await until(lambda: svc.running.watchlist.tasks["a"].record.polls > polls + 2)


async def test_reload_keeps_tasks_added_through_the_api(tmp_path: Path, simulate: StartSim) -> None:
    cfg = tmp_path / "enkwatch.yaml"
    sim = await simulate(forever("a"), forever("b"))
    url = sim.url
    write_config(cfg, url, [{"task_id": "a"}])
    with capture_logs() as logs:
        async with running(load_config(cfg), config_path=str(cfg)) as svc:
            await svc.running.watchlist.add_task({"task_id": "b"})
            write_config(cfg, url, [])
            await svc.running.watchlist.reload()
            [reloaded] = events_named(logs, ev.CONFIG_RELOADED)
            assert reloaded["removed"] == ["a"]
            assert set(svc.running.watchlist.tasks) == {"b"}


async def test_a_changed_file_is_noticed_also_through_a_symlink_swap(
    tmp_path: Path, simulate: StartSim
) -> None:
    # the layout of a Kubernetes ConfigMap volume: config.yaml -> ..data/config.yaml,
    # ..data -> ..2026_01_01 (a directory); an update swaps the ..data symlink
    sim = await simulate(forever("a"), forever("b"))
    url = sim.url
    first = tmp_path / "..v1"
    first.mkdir()
    write_config(first / "config.yaml", url, [{"task_id": "a"}])
    (tmp_path / "..data").symlink_to(first.name)
    cfg = tmp_path / "config.yaml"
    cfg.symlink_to("..data/config.yaml")
    with capture_logs() as logs:
        async with running(load_config(cfg), config_path=str(cfg)) as svc:
            await svc.running.watchlist.check_config_file()
            assert events_named(logs, ev.CONFIG_RELOADED) == []  # unchanged: nothing
            second = tmp_path / "..v2"
            second.mkdir()
            write_config(second / "config.yaml", url, [{"task_id": "a"}, {"task_id": "b"}])
            (tmp_path / "..data_tmp").symlink_to(second.name)
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            await svc.running.watchlist.check_config_file()
            [reloaded] = events_named(logs, ev.CONFIG_RELOADED)
            assert reloaded["added"] == ["b"]


async def test_polling_changes_apply_live(tmp_path: Path, simulate: StartSim) -> None:
    cfg = tmp_path / "enkwatch.yaml"
    sim = await simulate(forever("a"))
    url = sim.url
    write_config(cfg, url, [{"task_id": "a"}])
    async with running(load_config(cfg), config_path=str(cfg)) as svc:
        write_config(cfg, url, [{"task_id": "a"}], interval_seconds=0.5, max_concurrency=3)
        await svc.running.watchlist.reload()
        assert svc.running.watchlist.tasks["a"].interval_s == 0.5
        assert svc.running.scheduler.max_in_flight == 3
