"""WHISPER_VAD reaches both engines: the CLI's --vad_method and the warm worker's job line (which
keys its loaded pipeline by it); a value that is neither silero nor pyannote stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from whisperd.config import ConfigError, load
from whisperd.engines.base import EngineOptions
from whisperd.engines.cli import build_argv
from whisperd.engines.worker import job_message, with_batch_size

from .harness import engine_runs


def options(tmp_path: Path) -> EngineOptions:
    return EngineOptions(audio=tmp_path / "audio.wav", output_dir=tmp_path / "out", model="tiny.en", language="en",
                         device="cpu", device_index="0", prompt="", align=False, diarize=False, hf_token=None,
                         offline=True)


@pytest.mark.parametrize("vad", ["silero", "pyannote"])
def test_the_vad_setting_reaches_both_engines(fast_env, tmp_path, vad):
    config = load({**fast_env, "WHISPER_VAD": vad})
    argv = build_argv(config, options(tmp_path))
    assert argv[argv.index("--vad_method") + 1] == vad
    assert job_message(config, options(tmp_path))["vad"] == vad


def test_silero_is_the_default_and_others_are_refused(fast_env):
    assert load(fast_env).WHISPER_VAD == "silero"
    with pytest.raises(ConfigError) as refused:
        load({**fast_env, "WHISPER_VAD": "webrtc"})
    assert "WHISPER_VAD" in str(refused.value)


@pytest.mark.gen_test(timeout=30)
async def test_a_cli_job_is_run_with_the_vad_method(api, fast_env):
    job_id = await api.submit_ok({"diarize": "false"})
    assert (await api.wait_status(job_id))["status"] == "Completed"
    (run,) = engine_runs(Path(fast_env["WHISPER_TMP_FILES"]).parent)
    assert run["argv"][run["argv"].index("--vad_method") + 1] == "silero"


def test_the_batch_size_reaches_both_engines(fast_env, tmp_path):
    default = load(fast_env)
    assert default.WHISPER_BATCH_SIZE == 8
    assert "--batch_size" not in build_argv(default, options(tmp_path))  # WhisperX's own default
    assert job_message(default, options(tmp_path))["batch_size"] is None  # the device's default, where placed
    config = load({**fast_env, "WHISPER_BATCH_SIZE": "32"})
    argv = build_argv(config, options(tmp_path))
    assert argv[argv.index("--batch_size") + 1] == "32"
    assert with_batch_size(job_message(config, options(tmp_path)), config.WHISPER_BATCH_SIZE)["batch_size"] == 32
    with pytest.raises(ConfigError):
        load({**fast_env, "WHISPER_BATCH_SIZE": "0"})


def test_a_device_entry_may_carry_its_batch_size_and_bad_ones_stop_start_up(fast_env):
    from whisperd.config import device_batch_sizes, parse_devices
    assert parse_devices("cuda:0=32, cuda:1") == [("cuda", "0"), ("cuda", "1")]
    assert device_batch_sizes("cuda:0=32, cuda:1") == [32, None]
    assert load({**fast_env, "WHISPER_ENGINE": "worker", "WHISPER_DEVICES": "cpu=4,cpu"}).devices == [("cpu", "0")] * 2
    for bad in ("cpu=0", "cpu=x", "cpu=257", "cpu= +4", "cuda:0=\u00b2"):
        with pytest.raises(ConfigError) as refused:
            load({**fast_env, "WHISPER_DEVICES": bad})
        assert "WHISPER_DEVICES" in str(refused.value) and "batch size" in str(refused.value)
    with pytest.raises(ConfigError):
        load({**fast_env, "WHISPER_BATCH_SIZE": "257"})


def test_a_jobs_batch_size_wins_over_the_setting_in_both_engines(fast_env, tmp_path):
    config = load({**fast_env, "WHISPER_BATCH_SIZE": "32"})
    asked = options(tmp_path)
    asked.batch_size = 8
    assert "--batch_size" not in build_argv(config, asked)  # 8 is WhisperX's own default
    asked.batch_size = 3
    argv = build_argv(config, asked)
    assert argv[argv.index("--batch_size") + 1] == "3"
    assert with_batch_size(job_message(config, asked), 32)["batch_size"] == 3
