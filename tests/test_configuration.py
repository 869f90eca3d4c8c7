"""Settings declared once: docs/configuration.md and `whisperd.py config` come from config.SETTINGS."""

from __future__ import annotations

import pytest

from whisperd import cli, config, configdoc


def test_configuration_doc_is_in_step_with_the_declaration():
    written = configdoc.DOC_PATH.read_text(encoding="utf-8")
    assert written == configdoc.render_markdown(), \
        "docs/configuration.md is out of date: run `python -m whisperd.configdoc` and commit it"


def test_every_setting_has_a_row_and_a_real_help_line():
    text = configdoc.render_markdown()
    for setting in config.SETTINGS:
        assert f"| `{setting.name}` |" in text
        assert len(setting.help.split()) >= 3, f"{setting.name}: say what it does, not just its name"


@pytest.fixture
def conf_file(tmp_path, monkeypatch):
    for name in config.SETTINGS_BY_NAME:
        monkeypatch.delenv(name, raising=False)
    conf = tmp_path / "whisper_api.conf"
    conf.write_text('WHISPER_API_PORT = 9000\nWHISPER_TMP_FILES = "data/tmp"\nWHISPER_WEBHOOK_SECRET = "file-secret"\n')
    monkeypatch.setenv("WHISPER_API_CONF", str(conf))
    return conf


def lines_by_name(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[1:]}


def test_config_command_shows_each_value_and_where_it_came_from(conf_file, monkeypatch, capsys):
    monkeypatch.setenv("WHISPER_API_HOST", "0.0.0.0")
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_value")
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"configuration file: {conf_file}"
    rows = lines_by_name(out)
    assert rows["WHISPER_API_HOST"][1:] == ["0.0.0.0", "environment"]
    assert rows["WHISPER_API_PORT"][1:] == ["9000", "file"]
    assert rows["WHISPER_TMP_FILES"][1:] == [str(conf_file.parent / "data" / "tmp"), "file"]  # relative to the file
    assert rows["MAX_FILE_SIZE"][1:] == ["536870912", "default"]
    assert rows["ENABLE_CONCURRENCY"][1:] == ["false", "default"]
    assert rows["HF_TOKEN"][1:] == ["<set>", "environment"]
    assert rows["WHISPER_WEBHOOK_SECRET"][1:] == ["<set>", "file"]
    assert "hf_supersecret_value" not in out and "file-secret" not in out
    assert set(rows) == set(config.SETTINGS_BY_NAME)


def test_config_command_names_a_bad_value_and_its_origin(conf_file, monkeypatch, capsys):
    monkeypatch.setenv("MAX_CONCURRENT_JOBS", "lots")
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert "MAX_CONCURRENT_JOBS='lots' (from environment): expected a whole number" in err


def test_secrets_stay_out_of_repr_and_out_of_errors(conf_file):
    loaded = config.load({"WHISPER_WEBHOOK_SECRET": "s3cr3t"}, str(conf_file))
    assert "s3cr3t" not in repr(loaded) and loaded.origin("WHISPER_WEBHOOK_SECRET") == "environment"
    with pytest.raises(config.ConfigError) as caught:
        config.load({"WHISPER_WEBHOOK_SECRET": "   ", "WHISPER_API_PORT": "-1"}, str(conf_file))
    assert "WHISPER_API_PORT='-1' (from environment)" in str(caught.value)
