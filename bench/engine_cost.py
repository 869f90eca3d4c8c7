"""#5 Engine cost: the WhisperX CLI per job on jfk.flac with tiny.en on the CPU, and where its time goes.

The CLI is run with exactly the argument list and environment the server builds for a job
(whisperd.engines.cli.build_argv/build_env). Its wall time is split with bench/engine_probe.py,
run by the engine venv's own Python: interpreter start-up (`python -c pass`, the baseline),
`import whisperx.asr`, load_model, and transcription with the model already loaded — the
part a persistent engine process would still pay per job.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from whisperd import config as config_module
from whisperd.engines.cli import EngineOptions, build_argv, build_env

from .common import REPO, median

JFK = REPO.parent / "shared" / "fixtures" / "jfk.flac"


def engine_python() -> Path:
    """The engine venv's python, found by whisperx.sh's rule."""
    venv = os.environ.get("WHISPERX_VENV")
    if not venv:
        digest = hashlib.sha256((REPO / "engine-requirements.txt").read_bytes()).hexdigest()[:12]
        data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        venv = f"{data}/whisperd/engine-{digest}"
    return Path(venv.rstrip("/")) / "bin" / "python"


def _wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(work: Path, quick: bool) -> dict:
    python = engine_python()
    model_dir = REPO / "models" / "tiny.en"
    if not python.exists() or not (model_dir / "model.bin").exists() or not JFK.exists():
        return {"skipped": "no engine venv, tiny.en or jfk.flac: run scripts/setup-engine.sh"}
    cli_runs = 1 if quick else 3
    conf = work / "engine.conf"
    conf.write_text("# benchmark: everything from the environment\n")
    config = config_module.load({"WHISPER_CMD": str(REPO / "whisperx.sh"), "WHISPER_MODELS_DIR": str(REPO / "models")},
                                conf_path=str(conf))
    out = work / "engine-out"
    opts = EngineOptions(audio=JFK, output_dir=out, model="tiny.en", language="en", device="cpu",
                         device_index="0", prompt="", align=False, diarize=False, hf_token=None, offline=True)
    argv, env = build_argv(config, opts), build_env(opts)
    cli = []
    for _ in range(cli_runs):
        out.mkdir(parents=True, exist_ok=True)
        cli.append(_wall(argv, env))
        if not (out / "jfk.json").exists():
            raise RuntimeError("the WhisperX CLI wrote no jfk.json")
    startup = median([_wall([str(python), "-c", "pass"]) for _ in range(5)])
    probe = subprocess.run([str(python), "-I", str(REPO / "bench" / "engine_probe.py"), str(model_dir), str(JFK),
                            "1" if quick else "3"],
                           env=env, check=True, capture_output=True, text=True)
    parts = json.loads(probe.stdout.strip().splitlines()[-1])
    cli_s = median(cli)
    warm = parts["warm_transcribe_s"]
    return {
        "cli_runs": cli_runs,
        "cli_wall_s": round(cli_s, 2),
        "interpreter_startup_s": round(startup, 3),
        "import_whisperx_asr_s": round(parts["import_s"], 2),
        "load_model_s": round(parts["load_model_s"], 2),
        "first_transcribe_s": round(parts["first_transcribe_s"], 2),
        "warm_transcribe_s": round(warm, 2),
        "persistent_engine_saves_s_per_job": round(cli_s - warm, 2),
        "cli_to_warm_ratio": round(cli_s / warm, 1),
    }
