"""The config file: validation with key paths, env overrides, YAML loading, the API key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enkwatch.config import (
    API_KEY_ENV,
    DEFAULT_BASE_URL,
    Config,
    header_problem,
    load_api_key,
    load_config,
    normalized_watch_list,
    parse_config,
    validate_task_entry,
)
from enkwatch.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"
SECRET = "sk-live-0123456789abcdef-NEVER-SHOWN"


def problems_of(raw: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ or {})
    return info.value.problems


def one_problem(raw: object, environ: dict[str, str] | None = None) -> str:
    problems = problems_of(raw, environ)
    assert len(problems) == 1, problems
    return problems[0]


def write(tmp_path: Path, text: str | bytes, name: str = "enkwatch.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- defaults -----------------------------------------------------------------------------


def test_empty_document_gives_defaults() -> None:
    config = parse_config(None, {})
    assert config == parse_config({}, {})
    assert config.api.base_url == DEFAULT_BASE_URL
    assert config.api.api_key_file is None
    assert config.api.timeout_seconds == 10
    assert config.polling.interval_seconds == 30
    assert config.polling.jitter == 0.1
    assert config.polling.max_concurrency == 16
    assert config.polling.max_requests_per_second == 5
    assert config.polling.max_backoff_seconds == 300
    assert config.polling.not_found_attempts == 3
    assert config.state.path == "enkwatch-state.db"
    assert config.admin.listen is None
    assert config.sinks.webhooks == []
    assert config.tasks == []


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}) == Config()
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml"), {}) == Config()


def test_a_full_config_is_accepted() -> None:
    config = parse_config(
        {
            "api": {"base_url": "https://api.example.com/", "timeout_seconds": 3},
            "polling": {"interval_seconds": 0.5, "jitter": 0, "max_requests_per_second": 0},
            "state": {"path": ":memory:"},
            "admin": {"listen": "[::1]:9090"},
            "sinks": {"webhooks": [{"url": "https://hooks.example.com/x", "secret_env": "S"}]},
            "tasks": [
                {"task_id": TASK_ID, "dataset": "Election2", "labels": {"tier": 1, "on": True}},
                {"dataset": "FinanceQA", "interval_seconds": 10, "deadline_seconds": 7200},
            ],
        },
        {},
    )
    assert config.api.base_url == "https://api.example.com"  # trailing slash dropped
    assert config.admin.host_port == ("::1", 9090)
    assert config.tasks[0].labels == {"tier": "1", "on": "true"}
    assert [t.key for t in config.tasks] == [TASK_ID, "dataset:FinanceQA"]


def test_normalized_watch_list_applies_defaults() -> None:
    config = parse_config(
        {
            "polling": {"interval_seconds": 7},
            "tasks": [
                {"task_id": TASK_ID, "labels": {"team": "safety"}},
                {"dataset": "FinanceQA", "interval_seconds": 2, "deadline_seconds": 60},
            ],
        },
        {},
    )
    assert normalized_watch_list(config) == [
        {
            "task_key": TASK_ID,
            "kind": "dataset",
            "task_id": TASK_ID,
            "dataset": None,
            "interval_seconds": 7,
            "deadline_seconds": None,
            "labels": {"team": "safety"},
        },
        {
            "task_key": "dataset:FinanceQA",
            "kind": "dataset",
            "task_id": None,
            "dataset": "FinanceQA",
            "interval_seconds": 2,
            "deadline_seconds": 60,
            "labels": {},
        },
    ]
    assert normalized_watch_list(Config()) == []


# --- bad values, each with its key path -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"api": {"base_url": "ftp://example.com"}}, "api.base_url"),
        ({"api": {"base_url": "https://user:pw@example.com"}}, "api.base_url"),
        ({"api": {"base_url": "https://example.com/?q=1"}}, "api.base_url"),
        ({"api": {"timeout_seconds": 0}}, "api.timeout_seconds"),
        ({"api": {"timeout_seconds": "soon"}}, "api.timeout_seconds"),
        ({"api": {"api_key_file": 5}}, "api.api_key_file"),
        ({"polling": {"interval_seconds": -1}}, "polling.interval_seconds"),
        ({"polling": {"interval_seconds": float("nan")}}, "polling.interval_seconds"),
        ({"polling": {"interval_seconds": float("inf")}}, "polling.interval_seconds"),
        ({"polling": {"jitter": 1.5}}, "polling.jitter"),
        ({"polling": {"jitter": -0.1}}, "polling.jitter"),
        ({"polling": {"max_concurrency": 0}}, "polling.max_concurrency"),
        ({"polling": {"max_concurrency": 1.5}}, "polling.max_concurrency"),
        ({"polling": {"max_requests_per_second": -1}}, "polling.max_requests_per_second"),
        ({"polling": {"max_backoff_seconds": 0}}, "polling.max_backoff_seconds"),
        ({"polling": {"not_found_attempts": 0}}, "polling.not_found_attempts"),
        ({"state": {"path": ""}}, "state.path"),
        ({"state": {"path": None}}, "state.path"),
        ({"admin": {"listen": "9090"}}, "admin.listen"),
        ({"admin": {"listen": "localhost:http"}}, "admin.listen"),
        ({"admin": {"listen": "localhost:70000"}}, "admin.listen"),
        ({"sinks": {"webhooks": [{}]}}, "sinks.webhooks[0].url"),
        (
            {"sinks": {"webhooks": [{"url": "https://hooks.example/x", "events": [1]}]}},
            "sinks.webhooks[0].events[0]",
        ),
        ({"sinks": {"webhooks": "https://x"}}, "sinks.webhooks"),
        ({"tasks": {"task_id": "a"}}, "tasks"),
        ({"tasks": ["a"]}, "tasks[0]"),
        ({"tasks": [{"task_id": 5}]}, "tasks[0].task_id"),
        ({"tasks": [{"dataset": ["x"]}]}, "tasks[0].dataset"),
        ({"tasks": [{"task_id": "a", "interval_seconds": 0}]}, "tasks[0].interval_seconds"),
        ({"tasks": [{"task_id": "a", "deadline_seconds": "x"}]}, "tasks[0].deadline_seconds"),
        ({"tasks": [{"task_id": "a", "labels": ["x"]}]}, "tasks[0].labels"),
        ({"tasks": [{"task_id": "a", "labels": {"team": [1]}}]}, "tasks[0].labels.team"),
        ({"api": 5}, "api"),
        ({"polling": [1, 2]}, "polling"),
        ({"state": "x.db"}, "state"),
    ],
)
def test_bad_value_names_its_key_path(raw: dict[str, Any], path: str) -> None:
    problem = one_problem(raw)
    assert problem.startswith(f"{path}: "), problem


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"api": {"base_url": DEFAULT_BASE_URL, "retries": 3}}, "api.retries"),
        ({"polling": {"intervall_seconds": 3}}, "polling.intervall_seconds"),
        ({"state": {"file": "x.db"}}, "state.file"),
        ({"admin": {"port": 9090}}, "admin.port"),
        ({"sinks": {"kafka": []}}, "sinks.kafka"),
        (
            {"sinks": {"webhooks": [{"url": "https://hooks.example/x", "sekret": "x"}]}},
            "sinks.webhooks[0].sekret",
        ),
        ({"tasks": [{"task_id": "a"}, {"task_id": "b", "deadline": 5}]}, "tasks[1].deadline"),
        # a key that looks like a key path is still named, not dropped
        ({"tasks[0]": 1}, "tasks[0]"),
        ({"tasks": [{"task_id": "a", "labels": {"x[1]": None}}]}, "tasks[0].labels.x[1]"),
    ],
)
def test_unknown_key_at_every_level_names_its_path(raw: dict[str, Any], path: str) -> None:
    problem = one_problem(raw)
    assert problem.startswith(f"{path}: "), problem
    assert "unknown key" in problem or "must be text" in problem
    assert "Extra inputs" not in problem and "Input should" not in problem


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "api": {"timeout_seconds": -1, "extra": True},
        "polling": {"jitter": 3, "max_concurrency": "many"},
        "state": {"path": ""},
        "admin": {"listen": "nowhere"},
        "surprise": {},
        "tasks": [
            {"task_id": TASK_ID},
            {"labels": {"team": "x"}},
            {"task_id": TASK_ID},
            {"task_id": "a\r\nX-Injected: 1"},
            {"dataset": "ok", "deadline_seconds": 0},
        ],
    }
    problems = problems_of(raw)
    paths = sorted(p.split(": ", 1)[0] for p in problems)
    assert paths == sorted(
        [
            "api.timeout_seconds",
            "api.extra",
            "polling.jitter",
            "polling.max_concurrency",
            "state.path",
            "admin.listen",
            "surprise",
            "tasks[1]",
            "tasks[2]",
            "tasks[3].task_id",
            "tasks[4].deadline_seconds",
        ]
    ), problems


def test_all_problems_appear_in_the_message_with_the_source(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  timeout_seconds: 0\ntasks:\n  - {}\n  - {task_id: x, y: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    err = info.value
    assert err.source == str(path)
    text = str(err)
    assert str(path) in text
    for line in ("api.timeout_seconds: ", "tasks[0]: ", "tasks[1].y: "):
        assert f"\n  {line}" in text


# --- tasks ----------------------------------------------------------------------------------


def test_a_task_needs_task_id_or_dataset() -> None:
    for task in ({}, {"task_id": None, "dataset": None}, {"labels": {"a": "b"}}):
        problem = one_problem({"tasks": [{"task_id": "ok"}, task]})
        assert problem == "tasks[1]: a task needs at least one of task_id, dataset"


def test_a_task_listed_twice_by_task_id() -> None:
    problem = one_problem(
        {"tasks": [{"task_id": "a"}, {"dataset": "d"}, {"task_id": "a", "dataset": "other"}]}
    )
    assert problem.startswith("tasks[2]: ")
    assert "listed twice" in problem
    assert "tasks[0]" in problem


def test_a_dataset_only_task_listed_twice() -> None:
    problems = problems_of(
        {"tasks": [{"dataset": "d"}, {"task_id": "x", "dataset": "d"}, {"dataset": "d"}]}
    )
    assert len(problems) == 1
    assert problems[0].startswith("tasks[2]: ")
    assert "dataset:d" in problems[0]
    assert "tasks[0]" in problems[0]


def test_same_dataset_with_different_task_ids_is_not_a_duplicate() -> None:
    config = parse_config(
        {"tasks": [{"task_id": "a", "dataset": "d"}, {"task_id": "b", "dataset": "d"}]}, {}
    )
    assert len(config.tasks) == 2


@pytest.mark.parametrize("field", ["task_id", "dataset"])
@pytest.mark.parametrize(
    "bad",
    [
        "abc\r\nX-Injected: yes",
        "abc\ndef",
        "abc\rdef",
        "abc\x00def",
        "tab\there",
        "bell\x07",
        "esc\x1b[31m",
        "del\x7fete",
        "c1\x85control",
        "c1\x9bcsi",
        " padded",
        "padded ",
        "",
    ],
)
def test_task_id_and_dataset_must_be_header_safe(field: str, bad: str) -> None:
    problem = one_problem({"tasks": [{field: bad}]})
    assert problem.startswith(f"tasks[0].{field}: "), problem
    assert "\r" not in problem
    assert "\n" not in problem


def test_header_safe_values_are_accepted() -> None:
    for value in (TASK_ID, "Election 2", "Élection-2024", "データセット", "a:b/c?d=e"):
        assert header_problem(value) is None
        parse_config({"tasks": [{"task_id": value, "dataset": value}]}, {})


# --- the API key is never in the config ----------------------------------------------------


@pytest.mark.parametrize("name", ["api_key", "apikey", "API_KEY", "token", "secret", "key"])
def test_an_inline_api_key_is_refused_without_echoing_it(name: str) -> None:
    problems = problems_of({"api": {name: SECRET, "timeout_seconds": 0}})
    text = "\n".join(problems)
    assert SECRET not in text
    assert "sk-" not in text
    assert any(p.startswith(f"api.{name}: ") for p in problems)
    assert any("ENKRYPTAI_API_KEY" in p for p in problems)
    # the other problems are still reported
    assert any(p.startswith("api.timeout_seconds: ") for p in problems)


def test_an_inline_api_key_in_a_file_is_never_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, f"api:\n  api_key: {SECRET}\ntasks:\n  - api_key: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.problems)
    assert any(p.startswith("api.api_key: ") for p in info.value.problems)
    assert any(p.startswith("tasks[0].api_key: ") for p in info.value.problems)


def test_an_api_key_from_an_env_override_is_refused_without_echoing_it() -> None:
    problems = problems_of({}, {"ENKWATCH_API__API_KEY": SECRET})
    assert SECRET not in "\n".join(problems)
    assert any(p.startswith("api.api_key") for p in problems)


# --- environment overrides ------------------------------------------------------------------


def test_env_overrides_are_typed() -> None:
    config = parse_config(
        {"polling": {"interval_seconds": 5, "jitter": 0.5}},
        {
            "ENKWATCH_POLLING__INTERVAL_SECONDS": "60",
            "ENKWATCH_POLLING__MAX_CONCURRENCY": "4",
            "ENKWATCH_API__TIMEOUT_SECONDS": "2.5",
            "ENKWATCH_API__BASE_URL": "http://127.0.0.1:8765",
            "ENKWATCH_CONFIG": "/etc/enkwatch.yaml",  # not an override: no "__"
            "ENKWATCH_ADMIN_TOKEN": "t",
            "OTHER__THING": "1",
        },
    )
    assert config.polling.interval_seconds == 60.0
    assert isinstance(config.polling.interval_seconds, float)
    assert config.polling.max_concurrency == 4
    assert isinstance(config.polling.max_concurrency, int)
    assert config.polling.jitter == 0.5  # the file's other keys stay
    assert config.api.timeout_seconds == 2.5
    assert config.api.base_url == "http://127.0.0.1:8765"


def test_env_overrides_keep_string_values_exactly() -> None:
    # YAML would read ":memory:" as a mapping and "off" as False
    for value in (":memory:", "off", "yes", "1:30", "state #1.db"):
        config = parse_config({}, {"ENKWATCH_STATE__PATH": value})
        assert config.state.path == value


def test_env_override_null_unsets_an_optional_setting() -> None:
    config = parse_config({"admin": {"listen": "127.0.0.1:9090"}}, {"ENKWATCH_ADMIN__LISTEN": "~"})
    assert config.admin.listen is None


def test_env_override_creates_a_missing_or_empty_section() -> None:
    assert parse_config({"polling": None}, {"ENKWATCH_POLLING__JITTER": "0"}).polling.jitter == 0


def test_env_override_does_not_change_the_document() -> None:
    raw: dict[str, Any] = {"polling": {"interval_seconds": 5}}
    parse_config(raw, {"ENKWATCH_POLLING__INTERVAL_SECONDS": "60"})
    assert raw == {"polling": {"interval_seconds": 5}}


def test_a_bad_env_override_is_named_by_its_variable() -> None:
    problem = one_problem({}, {"ENKWATCH_POLLING__INTERVAL_SECONDS": "soon"})
    assert problem.startswith(
        "polling.interval_seconds (from ENKWATCH_POLLING__INTERVAL_SECONDS): "
    ), problem


def test_an_unknown_env_override_is_named_by_its_variable() -> None:
    problems = problems_of({}, {"ENKWATCH_POLLING__INTERVL": "5", "ENKWATCH_NOPE__X": "1"})
    assert sorted(problems) == [
        "nope (from ENKWATCH_NOPE__X): unknown key; "
        "the keys here are api, polling, state, admin, sinks, tasks, discover",
        "polling.intervl (from ENKWATCH_POLLING__INTERVL): unknown key; "
        "did you mean ENKWATCH_POLLING__INTERVAL_SECONDS?",
    ]


def test_env_override_into_a_non_section_is_named_by_its_variable() -> None:
    problems = problems_of({"state": "x.db"}, {"ENKWATCH_STATE__PATH__DEEP": "1"})
    assert "ENKWATCH_STATE__PATH__DEEP: state is not a section" in problems
    problems = problems_of({}, {"ENKWATCH_POLLING____JITTER": "1"})
    assert problems == ["ENKWATCH_POLLING____JITTER: empty key between '__' separators"]


def test_env_overrides_apply_when_loading_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "polling:\n  interval_seconds: 5\n")
    config = load_config(path, {"ENKWATCH_POLLING__INTERVAL_SECONDS": "60"})
    assert config.polling.interval_seconds == 60


# --- reading the file -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.source == str(path)
    assert info.value.problems == ["cannot read the config file: No such file or directory"]


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})
    assert info.value.source == str(tmp_path)
    assert info.value.problems == [
        "cannot read the config file: it is a directory, not a regular file"
    ]


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes
    with pytest.raises(ConfigError) as info:
        load_config(fifo, {})
    assert info.value.source == str(fifo)
    assert info.value.problems == [
        "cannot read the config file: it is a FIFO (named pipe), not a regular file"
    ]


@pytest.mark.timeout(10)
def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "config.yaml"
    link.symlink_to("/dev/urandom")  # it would be read until memory runs out
    with pytest.raises(ConfigError) as info:
        load_config(link, {})
    assert info.value.problems == [
        "cannot read the config file: it is a character device, not a regular file"
    ]


@pytest.mark.timeout(10)
def test_a_config_file_over_32_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(32 * 1024 * 1024 + 1)  # sparse: costs no disk
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.problems == [
        "cannot read the config file: it is larger than 33554432 bytes (33554433 bytes)"
    ]
    with path.open("r+b") as f:
        f.truncate(32 * 1024 * 1024)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})  # at the limit it is read (and is no YAML mapping)
    assert "larger than" not in str(info.value)


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    # as Kubernetes mounts a ConfigMap: ..data/config.yaml behind a symlink
    data = tmp_path / "..data"
    data.mkdir()
    write(data, f"tasks: [{{task_id: {TASK_ID}}}]\n", name="config.yaml")
    link = tmp_path / "config.yaml"
    link.symlink_to(data / "config.yaml")
    assert [t.key for t in load_config(link, {}).tasks] == [TASK_ID]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks: []\n")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as info:
            load_config(path, {})
    finally:
        path.chmod(0o600)
    assert info.value.problems == ["cannot read the config file: Permission denied"]


def test_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, b"tasks:\n  - dataset: \xff\xfe\n"), {})
    assert info.value.problems == ["the config file is not UTF-8 text"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("api:\n  base_url: [unclosed\npolling: {}\n", "line 3, column 8: "),
        ("a: b: c\n", "line 1, column 5: "),
        ("\tfoo: 1\n", "line 1, column 1: "),
    ],
)
def test_invalid_yaml_gives_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    [problem] = info.value.problems
    assert problem.startswith(f"not valid YAML: {where}"), problem


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), {})
    assert info.value.problems == [f"(top level): must be a mapping, not {kind}"]


# --- the API key ----------------------------------------------------------------------------


def test_api_key_from_env_is_stripped() -> None:
    assert load_api_key(Config(), {API_KEY_ENV: f"  {SECRET}\n"}) == SECRET


def test_no_api_key_names_both_sources() -> None:
    for environ in ({}, {API_KEY_ENV: "   "}):
        with pytest.raises(ConfigError) as info:
            load_api_key(Config(), environ)
        text = str(info.value)
        assert API_KEY_ENV in text
        assert "api.api_key_file" in text


def key_file_config(path: Path) -> Config:
    return parse_config({"api": {"api_key_file": str(path)}}, {})


def test_api_key_from_file_is_stripped_and_wins_over_env(tmp_path: Path) -> None:
    path = write(tmp_path, f"\n  {SECRET}  \n\n", "key")
    assert load_api_key(key_file_config(path), {API_KEY_ENV: "sk-other"}) == SECRET


def test_api_key_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing-key"
    with pytest.raises(ConfigError) as info:
        load_api_key(key_file_config(path), {API_KEY_ENV: SECRET})
    [problem] = info.value.problems
    assert problem.startswith("api.api_key_file: ")
    assert str(path) in problem
    assert SECRET not in str(info.value)


def test_api_key_file_empty(tmp_path: Path) -> None:
    path = write(tmp_path, " \n\t\n", "key")
    with pytest.raises(ConfigError) as info:
        load_api_key(key_file_config(path), {})
    assert info.value.problems == [f"api.api_key_file: {path} is empty"]


@pytest.mark.timeout(10)
def test_api_key_file_that_is_a_device_or_too_large(tmp_path: Path) -> None:
    link = tmp_path / "key"
    link.symlink_to("/dev/urandom")
    with pytest.raises(ConfigError) as info:
        load_api_key(key_file_config(link), {})
    assert info.value.problems == [
        f"api.api_key_file: cannot read {link}: it is a character device, not a regular file"
    ]
    big = tmp_path / "big"
    big.write_bytes(b"k" * (64 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        load_api_key(key_file_config(big), {})
    assert "larger than 65536 bytes" in info.value.problems[0]


def test_api_key_file_not_text(tmp_path: Path) -> None:
    path = write(tmp_path, b"sk-\xff\xfe", "key")
    with pytest.raises(ConfigError) as info:
        load_api_key(key_file_config(path), {})
    assert info.value.problems[0].startswith("api.api_key_file: ")


@pytest.mark.parametrize("key", [f"{SECRET}\n{SECRET}", f"{SECRET}\x00", f"{SECRET}\x1b"])
def test_api_key_that_cannot_be_a_header_is_refused_without_echoing_it(
    tmp_path: Path, key: str
) -> None:
    path = write(tmp_path, key, "key")
    for config, environ in ((key_file_config(path), {}), (Config(), {API_KEY_ENV: key})):
        with pytest.raises(ConfigError) as info:
            load_api_key(config, environ)
        assert SECRET not in str(info.value)
        assert "HTTP header" in str(info.value)


# --- the shipped configs --------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config" / "example.yaml", {})
    assert config.tasks
    assert len(normalized_watch_list(config)) == len(config.tasks)


def test_demo_config_loads() -> None:
    config = load_config(ROOT / "config" / "demo.yaml", {})
    assert config.tasks
    assert config.state.path == ":memory:"


def test_demo_config_is_the_packaged_copy() -> None:
    shipped = ROOT / "config" / "demo.yaml"
    packaged = ROOT / "daemon" / "enkwatch" / "data" / "demo.yaml"
    assert shipped.read_bytes() == packaged.read_bytes()


CONTRACT_EXAMPLE = """
api:
  base_url: https://api.enkryptai.com   # default
  timeout_seconds: 10                   # per request
polling:
  interval_seconds: 30
  jitter: 0.1
  max_concurrency: 16
  max_requests_per_second: 5
  max_backoff_seconds: 300
  not_found_attempts: 3
state:
  path: enkwatch-state.db
admin:
  listen: 127.0.0.1:9090
sinks:
  webhooks: []
tasks:
  - task_id: data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668
    dataset: Election2
    interval_seconds: 10
    deadline_seconds: 7200
    labels: {team: safety}
"""


def test_the_contract_example_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONTRACT_EXAMPLE), {})
    assert config.admin.host_port == ("127.0.0.1", 9090)
    assert config.tasks[0].key == TASK_ID
    assert config.tasks[0].labels == {"team": "safety"}


# --- property: any document gives a Config or a ConfigError ----------------------------------

REAL_KEYS = [
    "api",
    "base_url",
    "api_key_file",
    "timeout_seconds",
    "polling",
    "interval_seconds",
    "jitter",
    "max_concurrency",
    "max_requests_per_second",
    "max_backoff_seconds",
    "not_found_attempts",
    "state",
    "path",
    "admin",
    "listen",
    "sinks",
    "webhooks",
    "url",
    "secret_env",
    "events",
    "tasks",
    "task_id",
    "dataset",
    "deadline_seconds",
    "labels",
    "api_key",
]
keys = st.sampled_from(REAL_KEYS) | st.from_regex(r"[a-z_]{1,8}(\[[0-9]\])?", fullmatch=True)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", ":memory:", "127.0.0.1:9090", "http://h", "a\r\nb", "sk-x"])
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


documents = json_like | st.dictionaries(
    st.sampled_from(["api", "polling", "state", "admin", "sinks", "tasks"]) | keys,
    st.dictionaries(keys, json_like, max_size=6) | st.lists(json_like, max_size=4) | json_like,
    max_size=6,
)
env_vars = st.dictionaries(
    st.sampled_from(
        [
            "ENKWATCH_POLLING__INTERVAL_SECONDS",
            "ENKWATCH_API__TIMEOUT_SECONDS",
            "ENKWATCH_STATE__PATH",
            "ENKWATCH_TASKS__X",
            "ENKWATCH_NEW__KEY",
            "ENKWATCH_API__API_KEY",
            "ENKWATCH_A____B",
        ]
    ),
    st.text(max_size=8) | st.sampled_from(["60", "[1, 2]", "{a: 1}", "null", "[unclosed"]),
    max_size=3,
)
PROBLEM_LINE = re.compile(
    r"(\(top level\)|ENKWATCH_\w+|[a-z_]+(\[\d+\])?((\.[a-z_]+(\[\d+\])?)|\[\d+\])*)"
    r"( \(from ENKWATCH_\w+(, ENKWATCH_\w+)*\))?: \S"
)


@given(raw=documents, environ=env_vars)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_document_gives_a_config_or_a_config_error(
    raw: object, environ: dict[str, str]
) -> None:
    problems: list[str] = []
    try:
        config = parse_config(raw, environ)
    except ConfigError as err:
        problems = err.problems
    else:
        assert isinstance(config, Config)
        normalized_watch_list(config)
        return
    assert problems
    for problem in problems:
        assert PROBLEM_LINE.match(problem), problem
        assert "sk-x" not in problem


def test_a_json_config_is_read_as_json(tmp_path: Path) -> None:
    path = tmp_path / "watch.json"
    path.write_text('{"polling": {"interval_seconds": 5}, "tasks": [{"dataset": "E"}]}')
    config = load_config(path, environ={})
    assert config.polling.interval_seconds == 5
    assert [t.key for t in config.tasks] == ["dataset:E"]
    path.write_text('{"tasks": [')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems[0].startswith("not valid JSON")


# --- every duration is bounded ------------------------------------------------------------

DURATIONS = [
    # (where in the document, its key path, its ceiling)
    (("api", "timeout_seconds"), "api.timeout_seconds", 600.0),
    (("polling", "interval_seconds"), "polling.interval_seconds", 86_400.0),
    (("polling", "max_backoff_seconds"), "polling.max_backoff_seconds", 86_400.0),
    (("state", "lease_seconds"), "state.lease_seconds", 600.0),
    (("tasks", 0, "interval_seconds"), "tasks[0].interval_seconds", 86_400.0),
    (("tasks", 0, "deadline_seconds"), "tasks[0].deadline_seconds", 366 * 86_400.0),
    (("sinks", "webhooks", 0, "timeout_seconds"), "sinks.webhooks[0].timeout_seconds", 600.0),
    (
        ("sinks", "webhooks", 0, "max_age_seconds"),
        "sinks.webhooks[0].max_age_seconds",
        30 * 86_400.0,
    ),
]


def doc_with(where: tuple[str | int, ...], value: object) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "tasks": [{"task_id": TASK_ID}],
        "sinks": {"webhooks": [{"url": "https://hooks.example.test/x"}]},
    }
    node: Any = raw
    for part in where[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    node[where[-1]] = value
    return raw


@pytest.mark.parametrize(("where", "path", "ceiling"), DURATIONS, ids=[d[1] for d in DURATIONS])
@pytest.mark.parametrize("value", [1e12, 1e308, float("inf"), float("nan"), "1e400"])
def test_a_duration_beyond_its_ceiling_names_its_key_path(
    where: tuple[str | int, ...], path: str, ceiling: float, value: object
) -> None:
    problem = one_problem(doc_with(where, value))
    assert problem.startswith(f"{path}: "), problem


@pytest.mark.parametrize(("where", "path", "ceiling"), DURATIONS, ids=[d[1] for d in DURATIONS])
def test_a_duration_at_its_ceiling_is_accepted(
    where: tuple[str | int, ...], path: str, ceiling: float
) -> None:
    parse_config(doc_with(where, ceiling), {})
    problem = one_problem(doc_with(where, ceiling * 1.001))
    assert problem.startswith(f"{path}: must be at most {ceiling:.0f} seconds"), problem


def test_a_huge_duration_from_the_environment_names_its_variable() -> None:
    problem = one_problem({}, {"ENKWATCH_POLLING__INTERVAL_SECONDS": "1e12"})
    assert "ENKWATCH_POLLING__INTERVAL_SECONDS" in problem
    assert "at most 86400 seconds" in problem


# -- problems in plain words -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"task": []}, "task: unknown key; did you mean tasks?"),
        (
            {"polling": {"intervl": 3}},
            "polling.intervl: unknown key; did you mean interval_seconds?",
        ),
        ({"api": {"timeout": 3}}, "api.timeout: unknown key; did you mean timeout_seconds?"),
        (
            {"tasks": [{"task_id": "a", "deadline": 5}]},
            "tasks[0].deadline: unknown key; did you mean deadline_seconds?",
        ),
        ({"tasks": [{"taskid": "a"}]}, "tasks[0].taskid: unknown key; did you mean task_id?"),
        (
            {"sinks": {"webhooks": [{"url": "https://h.example/x", "secret": "s"}]}},
            "sinks.webhooks[0].secret: unknown key; did you mean secrets?",
        ),
        (
            {"zzz": 1},
            "zzz: unknown key; the keys here are api, polling, state, admin, sinks, tasks, "
            "discover",
        ),
        ({"polling": {"interval_seconds": 0}}, "polling.interval_seconds: must be greater than 0"),
        ({"polling": {"jitter": 2}}, "polling.jitter: must be at most 1"),
        ({"state": {"lease_seconds": 0.5}}, "state.lease_seconds: must be at least 1"),
        (
            {"polling": {"interval_seconds": "soon"}},
            "polling.interval_seconds: must be a number, not text",
        ),
        (
            {"polling": {"max_concurrency": 1.5}},
            "polling.max_concurrency: must be a whole number, not a number",
        ),
        ({"polling": "fast"}, "polling: must be a mapping (key: value lines), not text"),
        ({"tasks": {"task_id": "a"}}, "tasks: must be a list, not a mapping"),
        (
            {"tasks": [{"task_id": 5}]},
            "tasks[0].task_id: must be text, not a number (put it in quotes)",
        ),
        ({"sinks": {"webhooks": [{}]}}, "sinks.webhooks[0].url: required, but missing"),
    ],
)
def test_problems_are_in_plain_words(raw: dict[str, Any], expected: str) -> None:
    assert one_problem(raw) == expected


def test_no_pydantic_wording_reaches_a_user() -> None:
    problems = problems_of(
        {
            "api": {"timeout": 1, "base_url": 5},
            "polling": {"interval_seconds": "x", "jitter": -1, "max_concurrency": 0.5},
            "state": [],
            "admin": {"listen": 1},
            "sinks": {"webhooks": [{"events": "x"}]},
            "tasks": [{"task_id": ["a"]}, "b", {"labels": {"a": None}}],
        }
    )
    assert len(problems) >= 10
    for problem in problems:
        for pydantic_words in ("Input should", "Extra inputs", "Field required", "instance of"):
            assert pydantic_words not in problem, problem


def test_an_unknown_env_override_suggests_the_variable_to_set() -> None:
    assert one_problem({}, {"ENKWATCH_POLLING__INTERVAL": "60"}) == (
        "polling.interval (from ENKWATCH_POLLING__INTERVAL): unknown key; "
        "did you mean ENKWATCH_POLLING__INTERVAL_SECONDS?"
    )


def test_an_unknown_key_of_a_task_entry_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError) as info:
        validate_task_entry({"task_id": "a", "label": {"team": "x"}})
    assert info.value.problems == ["label: unknown key; did you mean labels?"]
