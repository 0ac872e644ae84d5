"""Interaction latency and bytes on the wire through the server, against the in-process engine.

Volumes and clicks are those of ``benchmarks/engine_latency.py`` (real CT 512x512x300 and MRI
256^3 from ``--data``; a first click at the most interior voxel, then corrections at the
largest error, by the evaluation's simulated user). Each click is made in-process and then, the same
click, through a real server over loopback (a child process started by the client's
``LocalBackend`` with the same model and thread count), alternately, so that both see the same load
on the machine. The simulated user's next click follows the in-process result.

Reports, per volume:

- latency per click, in-process wall time vs the client's round trip (median, p95, and the
  overhead ratio of the medians; target at most 1.15), and the transport's own share (round trip
  minus the engine time the server reports), which the machine's load does not blur;
- bytes on the wire per click (request and reply, headers included) vs the bytes of sending the
  full mask back (``GET .../result``, compressed the same way) and vs the raw mask (target at most
  5 %);
- the one-time image upload (bytes, seconds);

and, on the MRI, eight concurrent sessions (eight client threads, one server): median and p95
latency per click and throughput in clicks per second.

Usage: python benchmarks/server_benchmark.py [--data DIR] [--model M] [--threads 2]
       [--clicks 5] [--concurrent 8] [--concurrent-clicks 3] [--out benchmarks/results]

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from SegAssistLib.cli import run_script  # noqa: E402
from SegAssistLib.client import LocalBackend, SegAssistClient  # noqa: E402
from SegAssistLib.datasets import add_data_root_argument  # noqa: E402
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, load_default_engine  # noqa: E402
from SegAssistLib.evaluation.simulator import first_click, next_click  # noqa: E402
from SegAssistLib.machine import machine_info  # noqa: E402

CT_TARGETS = {"liver": (5,), "kidney_left": (3,)}
MRI_TARGETS = {"whole_tumour": (1, 2, 3, 4)}


def _engine_latency():
    """engine_latency.py, whose volume loaders (and check of --data) this benchmark shares, so both
    measure the same images."""
    spec = importlib.util.spec_from_file_location("engine_latency", REPO / "benchmarks" / "engine_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WireCounter:
    """Counts the bytes of every request and reply of a client (start lines and headers included)."""

    def __init__(self, client: SegAssistClient) -> None:
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        client.http.session.hooks["response"].append(self._count)

    def _count(self, response, *args, **kwargs):
        request = response.request
        body = request.body or b""
        body_len = len(body)  # bytes, str, or the upload's ProgressBody (which has a length)
        head_out = len(f"{request.method} {request.path_url} HTTP/1.1\r\n") + sum(
            len(k) + len(v) + 4 for k, v in request.headers.items()
        )
        head_in = len("HTTP/1.1 200 OK\r\n") + sum(len(k) + len(v) + 4 for k, v in response.headers.items())
        with self._lock:
            self.sent += head_out + 2 + body_len
            self.received += head_in + 2 + len(response.content)
        return response

    def take(self) -> int:
        with self._lock:
            total, self.sent, self.received = self.sent + self.received, 0, 0
        return total


def stats(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, float)
    return {"median_ms": round(1000 * float(np.median(a)), 1), "p95_ms": round(1000 * float(np.percentile(a, 95)), 1)}


def in_process(engine, volume, target: np.ndarray, clicks: int):
    """Clicks by the simulated user on the in-process engine; returns the prompts."""
    session = engine.open_session(volume)
    prompts = []
    prompt = first_click(target, volume.spacing)
    for _ in range(clicks):
        session.add_prompt(prompt)
        prompts.append(prompt)
        prompt = next_click(target, session.result(), volume.spacing)
        if prompt is None:
            break
    session.close()
    return prompts


def paired(engine, client: SegAssistClient, counter: WireCounter, volume, target: np.ndarray, clicks: int) -> Dict:
    """Each click in-process, then the same click through the server, so both see the same load."""
    local = engine.open_session(volume)
    remote = client.open_session(volume)  # the image is held: opened by its hash
    counter.take()
    local_times, remote_times, remote_engine, wire, bodies = [], [], [], [], []
    prompt = first_click(target, volume.spacing)
    for _ in range(clicks):
        t0 = time.perf_counter()
        local.add_prompt(prompt)
        local_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        update = remote.add_prompt(prompt)
        remote_times.append(time.perf_counter() - t0)
        remote_engine.append(update.info["engine_s"])
        wire.append(counter.take())
        bodies.append(update.info["reply_bytes"])
        prompt = next_click(target, local.result(), volume.spacing)
        if prompt is None:
            break
    full = remote.fetch_result()
    full_wire = counter.take()
    local_result = local.result()
    row = {
        "clicks": len(local_times),
        "in_process_s": [round(t, 4) for t in local_times],
        "server_s": [round(t, 4) for t in remote_times],
        "server_engine_s": [round(t, 4) for t in remote_engine],
        "wire_bytes_per_click": wire,
        "reply_body_bytes": bodies,
        "full_mask_reply_wire_bytes": full_wire,
        "full_mask_raw_bytes": int(full.size),
        "regions_reassemble_to_result": bool(np.array_equal(full, remote.result())),
        "voxels_differing_from_in_process": int(np.count_nonzero(full != local_result)),
        "mask_voxels_in_process": int(np.count_nonzero(local_result)),
    }
    local.close()
    remote.close()
    return row


def concurrent_sessions(url: str, token: str, volume, prompts, n: int) -> Dict:
    start = threading.Barrier(n)

    def annotate(_: int) -> List[float]:
        with SegAssistClient(url, token, timeout=(10.0, 600.0)) as client:
            session = client.open_session(volume)  # the image is held: opened by hash
            start.wait()
            times = []
            for prompt in prompts:
                t0 = time.perf_counter()
                session.add_prompt(prompt)
                times.append(time.perf_counter() - t0)
            session.close()
            return times

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        per_session = list(pool.map(annotate, range(n)))
    wall = time.perf_counter() - t0
    latencies = [t for times in per_session for t in times]
    return {
        "sessions": n,
        "clicks": len(latencies),
        **stats(latencies),
        "throughput_clicks_per_s": round(len(latencies) / wall, 2),
        "wall_s": round(wall, 2),
    }


def machine_record(threads: int) -> Dict:
    """``machine_info`` (commit included) and what this benchmark adds: threads, load, niceness, time."""
    return {
        **machine_info("cpu"),
        "torch_threads": threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root_argument(parser)
    parser.add_argument("--model", type=Path, default=None, help=f"default: {DEFAULT_CHECKPOINT}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--concurrent-clicks", type=int, default=3, help="clicks per concurrent session")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    model = (args.model or DEFAULT_CHECKPOINT).resolve()
    volumes = _engine_latency()
    volumes.check_data(args.data)  # before the model loads and the backend starts
    ct_volume, mri_volume = volumes.ct_volume, volumes.mri_volume
    torch.set_num_threads(args.threads)
    machine = machine_record(args.threads)
    engine = load_default_engine(model, threads=args.threads)

    state_dir = Path(tempfile.mkdtemp(prefix="segassist-bench-"))
    backend = LocalBackend(model, state_dir=state_dir, reuse=False, extra_args=["--threads", str(args.threads)])
    backend.start()
    client = backend.client(timeout=(10.0, 600.0))
    counter = WireCounter(client)
    report: Dict = {"command": shlex.join(["python", "benchmarks/server_benchmark.py", *given]), "argv": given,
                    "machine": machine, "model": engine.capabilities().to_dict(), "model_path": str(model),
                    "model_identity": engine.model.identity, "volumes": {}}
    try:
        for name, loader, targets in (
            ("CT 512x512x300", ct_volume, CT_TARGETS),
            ("MRI 256^3", mri_volume, MRI_TARGETS),
        ):
            volume, labels = loader(args.data)
            print(f"{name}: {volume.array.shape[::-1]} {volume.array.dtype}", flush=True)
            t0 = time.perf_counter()
            counter.take()
            client.upload_image(volume)
            upload = {"seconds": round(time.perf_counter() - t0, 2), "wire_bytes": counter.take()}
            upload["raw_bytes"] = int(volume.array.nbytes)
            warm_target = np.isin(labels, next(iter(targets.values())))
            paired(engine, client, counter, volume, warm_target, 2)  # warm-up, untimed
            rows = []
            for target_name, values in targets.items():
                row = {
                    "target": target_name,
                    **paired(engine, client, counter, volume, np.isin(labels, values), args.clicks),
                }
                rows.append(row)
                print(f"  {target_name}: in-process {stats(row['in_process_s'])}  server {stats(row['server_s'])}  "
                      f"wire/click {int(np.median(row['wire_bytes_per_click']))} B  "
                      f"full mask reply {row['full_mask_reply_wire_bytes']} B", flush=True)  # fmt: skip
            local = [t for r in rows for t in r["in_process_s"]]
            remote = [t for r in rows for t in r["server_s"]]
            remote_engine = [t for r in rows for t in r["server_engine_s"]]
            wire = [b for r in rows for b in r["wire_bytes_per_click"]]
            full_wire = float(np.mean([r["full_mask_reply_wire_bytes"] for r in rows]))
            summary = {
                "in_process": stats(local),
                "server": stats(remote),
                "overhead_ratio_of_medians": round(float(np.median(remote) / np.median(local)), 3),
                "overhead_ratio_per_click_median": round(float(np.median(np.divide(remote, local))), 3),
                "median_overhead_ms": round(1000 * float(np.median(np.subtract(remote, local))), 1),
                # round trip minus the engine's own time inside the server: HTTP, JSON, compression
                "transport_overhead_ms": stats(list(np.subtract(remote, remote_engine))),
                "wire_bytes_per_click_median": int(np.median(wire)),
                "full_mask_reply_wire_bytes": int(full_wire),
                "wire_vs_full_mask_reply": round(float(np.median(wire)) / full_wire, 4),
                "wire_vs_raw_mask": round(float(np.median(wire)) / rows[0]["full_mask_raw_bytes"], 6),
                "regions_reassemble_to_result": all(r["regions_reassemble_to_result"] for r in rows),
                "voxels_differing_from_in_process": sum(r["voxels_differing_from_in_process"] for r in rows),
                "upload": upload,
            }
            if name.startswith("MRI") and args.concurrent > 1:
                target = np.isin(labels, MRI_TARGETS["whole_tumour"])
                prompts = in_process(engine, volume, target, args.concurrent_clicks)
                summary["concurrent"] = concurrent_sessions(
                    backend.url, backend.token, volume, prompts, args.concurrent
                )
                print(f"  {args.concurrent} concurrent sessions: {summary['concurrent']}", flush=True)
            report["volumes"][name] = {"summary": summary, "targets": rows}
            print(json.dumps({name: summary}, indent=1), flush=True)
            del volume, labels
    finally:
        client.close()
        backend.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "server_benchmark.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "server_benchmark.py"))
