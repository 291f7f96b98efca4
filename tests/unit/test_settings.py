"""``load_settings``: app.conf, then the environment (FORKGUARD_* over Resque's names)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured

from celery_forkguard.settings import SETTINGS, ForkguardSettings, load_settings


def test_defaults_with_empty_conf_and_environment() -> None:
    settings = load_settings({}, {})
    assert settings == ForkguardSettings()
    assert settings.term_child is False
    assert settings.term_timeout == 4.0
    assert settings.pre_shutdown_timeout == 0.0
    assert settings.memory_check_interval == 0.5
    assert settings.fork_server is True


def test_conf_values_are_read() -> None:
    conf = {
        "forkguard_term_child": True,
        "forkguard_term_timeout": 7,
        "forkguard_pre_shutdown_timeout": "1.5",
        "forkguard_memory_check_interval": 0.25,
        "forkguard_fork_server": False,
    }
    assert load_settings(conf, {}) == ForkguardSettings(
        term_child=True, term_timeout=7.0, pre_shutdown_timeout=1.5,
        memory_check_interval=0.25, fork_server=False,
    )


def test_none_in_conf_means_the_default() -> None:
    assert load_settings({"forkguard_term_timeout": None}, {}).term_timeout == 4.0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"TERM_CHILD": "1"}, {"term_child": True}),
        ({"FORKGUARD_TERM_CHILD": "yes"}, {"term_child": True}),
        ({"RESQUE_TERM_TIMEOUT": "10"}, {"term_timeout": 10.0}),
        ({"FORKGUARD_TERM_TIMEOUT": "2.5"}, {"term_timeout": 2.5}),
        ({"RESQUE_PRE_SHUTDOWN_TIMEOUT": "3"}, {"pre_shutdown_timeout": 3.0}),
        ({"FORKGUARD_PRE_SHUTDOWN_TIMEOUT": "0"}, {"pre_shutdown_timeout": 0.0}),
        ({"FORKGUARD_MEMORY_CHECK_INTERVAL": "0.1"}, {"memory_check_interval": 0.1}),
        ({"FORKGUARD_FORK_SERVER": "off"}, {"fork_server": False}),
    ],
)
def test_environment_sets_each_setting(environ: dict[str, str], expected: dict[str, Any]) -> None:
    settings = load_settings({}, environ)
    for field, value in expected.items():
        assert getattr(settings, field) == value


def test_environment_beats_conf() -> None:
    conf = {"forkguard_term_child": True, "forkguard_term_timeout": 9}
    settings = load_settings(conf, {"TERM_CHILD": "0", "RESQUE_TERM_TIMEOUT": "1"})
    assert settings.term_child is False
    assert settings.term_timeout == 1.0


@pytest.mark.parametrize(
    ("environ", "field", "expected"),
    [
        ({"FORKGUARD_TERM_CHILD": "0", "TERM_CHILD": "1"}, "term_child", False),
        ({"FORKGUARD_TERM_CHILD": "1", "TERM_CHILD": "0"}, "term_child", True),
        ({"FORKGUARD_TERM_TIMEOUT": "2", "RESQUE_TERM_TIMEOUT": "8"}, "term_timeout", 2.0),
        (
            {"FORKGUARD_PRE_SHUTDOWN_TIMEOUT": "5", "RESQUE_PRE_SHUTDOWN_TIMEOUT": "6"},
            "pre_shutdown_timeout", 5.0,
        ),
    ],
)
def test_forkguard_names_beat_resque_names(
    environ: dict[str, str], field: str, expected: Any,
) -> None:
    assert getattr(load_settings({}, environ), field) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True), ("true", True), ("YES", True), (" on ", True),
        ("0", False), ("False", False), ("no", False), ("off", False), ("", False),
    ],
)
def test_boolean_spellings(text: str, expected: bool) -> None:
    assert load_settings({}, {"TERM_CHILD": text}).term_child is expected


@pytest.mark.parametrize(
    ("conf", "environ", "named"),
    [
        ({}, {"TERM_CHILD": "maybe"}, "TERM_CHILD"),
        ({}, {"FORKGUARD_TERM_CHILD": "2"}, "FORKGUARD_TERM_CHILD"),
        ({"forkguard_term_child": "maybe"}, {}, "forkguard_term_child"),
        ({"forkguard_term_child": 2}, {}, "forkguard_term_child"),
        ({}, {"RESQUE_TERM_TIMEOUT": "-1"}, "RESQUE_TERM_TIMEOUT"),
        ({}, {"FORKGUARD_TERM_TIMEOUT": "abc"}, "FORKGUARD_TERM_TIMEOUT"),
        ({}, {"RESQUE_PRE_SHUTDOWN_TIMEOUT": "nan"}, "RESQUE_PRE_SHUTDOWN_TIMEOUT"),
        ({}, {"FORKGUARD_PRE_SHUTDOWN_TIMEOUT": "inf"}, "FORKGUARD_PRE_SHUTDOWN_TIMEOUT"),
        ({"forkguard_term_timeout": -0.5}, {}, "forkguard_term_timeout"),
        ({"forkguard_pre_shutdown_timeout": "abc"}, {}, "forkguard_pre_shutdown_timeout"),
        ({"forkguard_memory_check_interval": [1]}, {}, "forkguard_memory_check_interval"),
        ({}, {"FORKGUARD_FORK_SERVER": "sometimes"}, "FORKGUARD_FORK_SERVER"),
        # Zero would mean checking memory in a busy loop.
        ({}, {"FORKGUARD_MEMORY_CHECK_INTERVAL": "0"}, "FORKGUARD_MEMORY_CHECK_INTERVAL"),
    ],
)
def test_bad_values_name_the_setting(
    conf: dict[str, Any], environ: dict[str, str], named: str,
) -> None:
    with pytest.raises(ImproperlyConfigured) as raised:
        load_settings(conf, environ)
    assert named in str(raised.value)


def test_a_bad_value_in_the_environment_is_reported_even_if_conf_is_fine() -> None:
    with pytest.raises(ImproperlyConfigured, match="RESQUE_TERM_TIMEOUT"):
        load_settings({"forkguard_term_timeout": 3}, {"RESQUE_TERM_TIMEOUT": "soon"})


def test_every_setting_has_a_forkguard_name_and_a_field() -> None:
    fields = set(ForkguardSettings.__dataclass_fields__)
    for setting in SETTINGS:
        assert setting.name.startswith("forkguard_")
        assert setting.name[len("forkguard_"):] in fields
        assert setting.env and setting.env[0].startswith("FORKGUARD_")


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESQUE_TERM_TIMEOUT", "6")
    assert load_settings({}).term_timeout == 6.0


class DjangoStyleSettings:
    """What ``django.conf:settings`` looks like to ``config_from_object``."""

    CELERY_BROKER_URL = "memory://"
    CELERY_FORKGUARD_TERM_CHILD = True
    CELERY_FORKGUARD_TERM_TIMEOUT = 12
    CELERY_FORKGUARD_PRE_SHUTDOWN_TIMEOUT = 2


def test_django_namespace_settings_reach_load_settings() -> None:
    app = Celery("forkguard-settings-test", set_as_current=False)
    app.config_from_object(DjangoStyleSettings, namespace="CELERY")
    settings = load_settings(app.conf, {})
    assert settings.term_child is True
    assert settings.term_timeout == 12.0
    assert settings.pre_shutdown_timeout == 2.0
    app.close()


def test_plain_app_conf_reaches_load_settings() -> None:
    app = Celery("forkguard-settings-test", set_as_current=False)
    app.conf.forkguard_term_child = "yes"
    assert load_settings(app.conf, {}).term_child is True
    app.close()
