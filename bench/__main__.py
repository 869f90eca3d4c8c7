"""Runs the benchmarks, prints one table and writes bench/results/latest.json (use bench/run.sh).

A --quick run (the CI smoke test) writes bench/results/quick.json instead and takes no profiles,
so the committed full-run figures (docs/performance.md is generated from them by bench/report.py)
are never replaced by a smoke run's.

    python -m bench [--quick] [--only upload ledger scheduling engine]

Every figure is an absolute latency or a ratio against a baseline measured in this same run, so
that a loaded or slower machine moves both sides; the machine and its load average are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from . import engine_cost, ledger_load, s3, scheduling, upload
from .common import REPO, machine, write_noop_engine

BENCHMARKS = ("upload", "ledger", "scheduling", "engine", "s3")
RESULTS = REPO / "bench" / "results"


def _row(bench: str, figure: str, value: str, baseline: str = "", ratio: str = "", goal: str = "",
         met: bool | None = None) -> dict:
    return {"bench": bench, "figure": figure, "value": value, "baseline": baseline, "ratio": ratio, "goal": goal,
            "met": met}


def upload_rows(r: dict) -> list[dict]:
    rows = []
    for mib in r["sizes_mib"]:
        name = f"upload-{mib}mib.bin"
        ours, raw, peer = r["whisperd"][name], r["raw_socket"][name], r["fastapi_uploadfile"][name]
        # The goals were set for the 512 MiB upload (a small one is mostly per-request cost): a
        # --quick run, which sends 16 MiB only, states none.
        big = mib >= 512
        vs_peer = ours["mib_per_s"] / peer["mib_per_s"]
        rows += [
            _row(f"1 upload {mib} MiB", "throughput vs raw socket", f"{ours['mib_per_s']:.0f} MiB/s",
                 f"raw {raw['mib_per_s']:.0f} MiB/s", f"{ours['mib_per_s'] / raw['mib_per_s']:.2f}x", "report"),
            _row("", "server CPU per MiB vs FastAPI", f"{ours['cpu_ms_per_mib']:.2f} ms",
                 f"FastAPI {peer['cpu_ms_per_mib']:.2f}, raw {raw['cpu_ms_per_mib']:.2f} ms",
                 f"{peer['cpu_ms_per_mib'] / ours['cpu_ms_per_mib']:.2f}x less", "report"),
            _row("", "throughput vs FastAPI+UploadFile", f"{ours['mib_per_s']:.0f} MiB/s",
                 f"FastAPI {peer['mib_per_s']:.0f} MiB/s", f"{vs_peer:.2f}x", ">= 2x" if big else "",
                 vs_peer >= 2 if big else None),
            _row("", "of which intake (16 kHz WAV: copied)", f"{r['intake_ms'][name]:.0f} ms per upload"),
            _row("", "server RSS growth", f"{ours['rss_growth_mib']:.1f} MiB",
                 f"raw {raw['rss_growth_mib']:.1f}, FastAPI {peer['rss_growth_mib']:.1f} MiB", "",
                 "<= 32 MiB" if big else "", ours["rss_growth_mib"] <= 32 if big else None),
        ]
    return rows


def ledger_rows(r: dict) -> list[dict]:
    hello = {run["connections"]: run for run in r["runs"] if run["endpoint"] == "tornado_hello"}
    rows = []
    for run in r["runs"]:
        c = run["connections"]
        if run["endpoint"] == "tornado_hello":
            continue
        path = "GET /transcription/{id}" if run["endpoint"] == "job" else "GET /status"
        judged = c == 1  # latency goal: one request at a time; with 8 the p99 is mostly waiting in line
        rows.append(_row(
            f"2 {r['jobs'] // 1000}k-job ledger" if not rows else "",
            f"{path}, {run['workers']} worker(s), {c} conn",
            f"p50 {run['p50_ms']:.2f} / p99 {run['p99_ms']:.2f} ms, {run['rps']:.0f} req/s",
            f"bare Tornado p50 {hello[c]['p50_ms']:.2f} / p99 {hello[c]['p99_ms']:.2f} ms, {hello[c]['rps']:.0f} req/s",
            f"{run['rps'] / hello[c]['rps']:.2f}x",
            "p99 <= 5 ms" if judged else "", run["p99_ms"] <= 5 and not run["errors"] if judged else None))
    for run in r["runs"]:
        if run["endpoint"] != "tornado_hello" and "server_cpu_us_per_request" in run and run["connections"] == 1:
            base = hello[1].get("server_cpu_us_per_request")
            path = "GET /transcription/{id}" if run["endpoint"] == "job" else "GET /status"
            rows.append(_row("", f"{path}: server CPU per request", f"{run['server_cpu_us_per_request']:.0f} us",
                             f"bare Tornado {base:.0f} us" if base else "",
                             f"{run['server_cpu_us_per_request'] / base:.2f}x" if base else "", "report"))
    scans = [p for p in r["query_plans"] if p["scans"]]
    status_plan = r["query_plans"][-1]["plan"]
    rows.append(_row("", "status reads scan the table?", "no" if not scans else f"{len(scans)} scan(s)",
                     "; ".join(status_plan), "", "no scan", not scans))
    return rows


def scheduling_rows(r: dict) -> list[dict]:
    lat = r["start_latency"]
    rows = [_row(f"3 submit -> engine", f"202 -> first instruction ({lat['jobs']} jobs)",
                 f"median {lat['median_ms']:.1f} / p99 {lat['p99_ms']:.1f} ms",
                 f"spawn -> first instr. {lat['baseline_spawn_to_first_instruction_median_ms']:.1f} ms",
                 f"+{lat['scheduler_share_median_ms']:.1f} ms", "median <= 20 ms", lat["median_ms"] <= 20)]
    for key, label in (("sequential", "sequential"), ("concurrent", "6 concurrent"),
                       ("sequential_decoded", "sequential, 44.1 kHz WAV")):
        q = r.get(key)
        if q is None:
            continue
        # The goal is the service's own share on uploads it takes as they are (16 kHz mono WAV);
        # other audio adds one ffprobe and one ffmpeg run per job, reported beside it.
        judged = key != "sequential_decoded"
        rows.append(_row(f"4 queue, {q['jobs']} jobs" if key == "sequential" else "", f"{label}: jobs/s end to end",
                         f"{q['jobs_per_s']:.0f} jobs/s, +{q['overhead_ms_per_job']:.1f} ms/job "
                         f"(server CPU {q['server_cpu_ms_per_job']:.1f}, intake {q['intake_ms_per_upload']:.0f} ms/job)",
                         f"engine alone {q['baseline_direct_jobs_per_s']:.0f} jobs/s", f"{q['ratio_to_direct']:.2f}x",
                         "<= 10 ms/job" if judged else "report", q["overhead_ms_per_job"] <= 10 if judged else None))
    return rows


def engine_rows(r: dict) -> list[dict]:
    if "skipped" in r:
        return [_row("5 engine cost", "skipped", r["skipped"])]
    return [
        _row("5 engine (jfk.flac, tiny.en)", "WhisperX CLI wall per job", f"{r['cli_wall_s']:.2f} s",
             f"warm transcribe {r['warm_transcribe_s']:.2f} s", f"{r['cli_to_warm_ratio']:.1f}x", "report"),
        _row("", "interpreter / import / load model",
             f"{r['interpreter_startup_s']:.2f} / {r['import_whisperx_asr_s']:.2f} / {r['load_model_s']:.2f} s",
             f"first transcribe {r['first_transcribe_s']:.2f} s"),
        _row("", "a persistent engine would save", f"{r['persistent_engine_saves_s_per_job']:.2f} s/job"),
    ]


def s3_rows(r: dict) -> list[dict]:
    up, tp = r["upload"], r["jobs_per_s"]
    return [
        _row(f"6 job files in S3, {r['upload_mib']} MiB", "upload throughput, S3 vs local directory",
             f"{up['s3']['mib_per_s']:.0f} MiB/s", f"local {up['local']['mib_per_s']:.0f} MiB/s",
             f"{up['s3']['mib_per_s'] / up['local']['mib_per_s']:.2f}x", "report"),
        _row("", "server RSS growth, S3 vs local", f"{up['s3']['rss_growth_mib']:.1f} MiB",
             f"local {up['local']['rss_growth_mib']:.1f} MiB", "", "report"),
        *([_row("", "tus upload, S3 with PATCHes on 2 nodes vs local", f"{t['s3, 2 nodes']['mib_per_s']:.0f} MiB/s",
                f"local {t['local']['mib_per_s']:.0f} MiB/s",
                f"{t['s3, 2 nodes']['mib_per_s'] / t['local']['mib_per_s']:.2f}x", "report")] if (t := r.get("tus")) else []),
        _row(f"  {r['jobs']} jobs, PostgreSQL + S3", "jobs/s, 2 worker nodes vs 1 (no shared directory)",
             f"{tp['2']:.1f} jobs/s", f"1 node {tp['1']:.1f} jobs/s", f"{tp['2'] / tp['1']:.2f}x", "report"),
    ]


def print_table(rows: list[dict], out=sys.stdout) -> None:
    header = _row("benchmark", "figure", "value", "baseline (same run)", "ratio", "goal")
    cols = list(header)[:-1]
    cells = [[str(r[c]) for c in cols] + [{True: "met", False: "MISSED", None: ""}[r["met"]]] for r in rows]
    head = [header[c] for c in cols] + ["met?"]
    widths = [max(len(line[i]) for line in cells + [head]) for i in range(len(head))]
    for line in [head, ["-" * w for w in widths]] + cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip(), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and counts, no profiles, writes quick.json (CI smoke, < 3 min)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="these benchmarks only (default: all; with --quick all but engine, which times"
                             " WhisperX itself and takes minutes on two cores)")
    parser.add_argument("--no-profile", action="store_true", help="skip the pyinstrument passes (upload, queue, status reads)")
    args = parser.parse_args(argv)
    profiles = not args.no_profile and not args.quick
    if args.only is None:
        args.only = [name for name in BENCHMARKS if not (args.quick and name == "engine")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "machine": machine(), "load_avg_1m": {}, "seconds": {}, "results": {}}
    # On the repository's disk, not a tmpfs /tmp: the uploads are written where whisperd writes them.
    work = Path(tempfile.mkdtemp(prefix="run-", dir=RESULTS))
    try:
        engine = write_noop_engine(work)
        runners = {
            "upload": lambda: upload.run(work, engine, args.quick, profiles),
            "ledger": lambda: ledger_load.run(work, engine, args.quick, profiles),
            "scheduling": lambda: scheduling.run(work, engine, args.quick, profiles),
            "engine": lambda: engine_cost.run(work, args.quick),
            "s3": lambda: s3.run(work, engine, args.quick),
        }
        for name in args.only:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            report["load_avg_1m"][f"before_{name}"] = os.getloadavg()[0]
            report["results"][name] = runners[name]()
            report["seconds"][name] = round(time.perf_counter() - start, 1)
        report["load_avg_1m"]["at_end"] = os.getloadavg()[0]
    except BaseException:
        print(f"bench: failed; the servers' logs and data are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    makers = {"upload": upload_rows, "ledger": ledger_rows, "scheduling": scheduling_rows, "engine": engine_rows,
              "s3": s3_rows}
    rows = [row for name in args.only for row in makers[name](report["results"][name])]
    report["table"] = rows
    m = report["machine"]
    print(f"\nwhisperd benchmarks{' (quick)' if args.quick else ''}: {m['cores']} cores, {m['ram_gib']} GiB, {m['cpu']}; "
          f"load average {min(report['load_avg_1m'].values()):.1f}-{max(report['load_avg_1m'].values()):.1f}; "
          f"{sum(report['seconds'].values()):.0f} s\n")
    print_table(rows)
    target = RESULTS / ("quick.json" if args.quick else "latest.json")
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(target)
    print(f"\nwrote {target.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
