"""Load test of `mpad serve` on loopback: dynamic batching against `--max-batch 1`, bad requests, memory.

Exports a model of BACKBONE with random weights (prompts at their initialisation, a 1-shot memory, maps at
256 px), starts one server per configuration on 127.0.0.1 (free ports, all up at once), and sends each the
same load in turn, alternating the order from round to round so that both see the same machine. A load:
CLIENTS threads, each with one keep-alive connection, sending one request after the other until REQUESTS
have been sent (or --time-limit-s has passed); every --bad-every-th request is a bad one (empty, not an
image, GIF, truncated PNG, a decompression bomb's header, a body over --max-bytes), checked for its 4xx.
Good requests: generated parts, upscaled to --size px PNGs, `?map=false` unless --map.

First prints onnxruntime's own ms per image at batch 1 and at --max-batch, in this process before any server
starts: their ratio bounds what batching can gain here. Then per configuration: throughput of good requests,
p50 / p95 / p99 latency, errors (a good request without 200, a bad one without its status, a failed connection:
must be 0), the server's RSS after a warm-up and after each round, then the ratios. `--impl litserve` serves the
same model with LitServe (bench/serve_litserve.py; needs `pip install litserve`) beside `mpad serve`, both fed
multipart forms.

    .venv/bin/python bench/serve.py [--backbone mpad-tiny] [--clients 8] [--requests 2000] [--rounds 2]
        [--single 200] [--impl own|litserve] [--map] [--python PATH] [--time-limit-s 600]
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_records: a prompts record for any backbone
# The scoring and map resolution the model is exported with: the offline preset's for mpad-tiny
# (presets/offline.txt), params.yaml's for the real backbones.
SCORING = {"mpad-tiny": {"smoothing_sigma": 2.0, "resolution": 128}}
THRESHOLDS = {"category": "disc", "image_score": "topk_mean", "topk": 0.05, "smoothing_sigma": 4.0,
              "resolution": 256, "image_threshold": 0.5, "map_low": 0.0, "map_high": 1.0}  # fmt: skip
MAX_BYTES = 4 * 2**20  # the servers' --max-bytes: a bad request's body goes just over it


def export_model(backbone: str, folder: Path) -> Path:
    """<folder>/<backbone>.onnx: a random-weight detector exported by `mpad export` (reused when present)."""
    model = folder / f"{backbone}.onnx"  # its prompts and thresholds: <folder>/<backbone>/
    if model.with_suffix(".onnx.json").is_file():
        return model
    from tiny_records import tiny_record

    from mpad.clip import load_clip

    project = folder / backbone
    (project / "prompts").mkdir(parents=True, exist_ok=True)
    (project / "thresholds").mkdir(exist_ok=True)
    tiny_record(load_clip(backbone, "none", "cpu"), "disc", memory=True).save(project / "prompts/disc.pt")
    (project / "thresholds/disc.json").write_text(json.dumps({**THRESHOLDS, **SCORING.get(backbone, {})}))
    mpad = [sys.executable, "-c", "import stages.cli; stages.cli.app()"]
    subprocess.run([*mpad, "export", "--prompts", str(project / "prompts/disc.pt"), "--out", str(model)], check=True)
    return model


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def payloads(folder: Path, size: int) -> tuple[list[bytes], list[tuple[str, bytes, int]]]:
    """(good PNG bodies, bad (name, body, expected status)) from generated parts."""
    from mpad.data.synthetic import generate

    if not (folder / "ds/disc").is_dir():
        generate(folder / "ds", seed=0, n_train=1, n_test=8)
    parts = [Image.open(p).convert("RGB") for p in sorted((folder / "ds/disc/test").glob("*/*.png"))]
    good = [png(part.resize((size, size), Image.BICUBIC) if size else part) for part in parts]
    gif = io.BytesIO()
    parts[0].save(gif, format="GIF")
    bad = [("empty", b"", 400), ("text", b"no image here", 400), ("gif", gif.getvalue(), 415),
           ("truncated", good[0][: len(good[0]) // 2], 422), ("bomb", bomb_png(12_000), 413),
           ("too large", bytes(MAX_BYTES + 1), 413)]  # fmt: skip
    return good, bad


def bomb_png(side: int) -> bytes:
    """A valid PNG of side x side black pixels: a few hundred kB that decode to side**2 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row's pixels
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@dataclass
class Server:
    """A server process on 127.0.0.1: `mpad serve` (impl "own") or bench/serve_litserve.py."""

    name: str
    impl: str
    python: str
    model: Path
    max_batch: int
    max_wait_ms: float = 5.0
    threads: int = 0
    proc: subprocess.Popen | None = None
    port: int = 0
    rss: list[float] = field(default_factory=list)

    def start(self) -> None:
        with socket.socket() as probe:  # a free port (LitServe takes no socket; ours could say it itself)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        if self.impl == "own":
            command = [self.python, "-c", "import stages.cli; stages.cli.app()", "serve", "--model", str(self.model),
                       "--port", str(self.port), "--max-batch", str(self.max_batch), "--max-wait-ms",
                       str(self.max_wait_ms), "--max-bytes", str(MAX_BYTES), "--max-queue", "256",
                       *(["--threads", str(self.threads)] if self.threads else [])]  # fmt: skip
        else:
            command = [self.python, str(ROOT / "bench/serve_litserve.py"), str(self.model), str(self.port),
                       "--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms)]  # fmt: skip
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = "/readyz" if self.impl == "own" else "/health"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                connection.request("GET", ready)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: the server did not become ready")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server and its child processes have used so far."""
        process = psutil.Process(self.proc.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])

    def memory_mib(self) -> float:
        """RSS of the server and its child processes (LitServe runs its workers in processes)."""
        process = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, good requests that got 200
    errors: list[str] = field(default_factory=list)
    bad_ok: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # the server's CPU seconds over the run


def multipart(data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "mpad-bench"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="part.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return head + data + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


class NoDelayConnection(http.client.HTTPConnection):
    """http.client sends a request's headers and body in two writes: with Nagle's algorithm on, the body waits
    for the server's delayed ACK of the headers (~40 ms on Linux). curl and urllib3 set TCP_NODELAY; so do we."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(port: int) -> http.client.HTTPConnection:
    return NoDelayConnection("127.0.0.1", port, timeout=60)


def load(server: Server, good: list[bytes], bad: list, clients: int, requests: int, bad_every: int,
         form: bool, with_map: bool, time_limit_s: float) -> Result:  # fmt: skip
    """CLIENTS threads sending REQUESTS requests in all (module docstring); bounded by time_limit_s."""
    result, lock, counter = Result(), threading.Lock(), itertools.count()
    path = ("/v1/predict" if server.impl == "own" else "/predict") + ("" if with_map else "?map=false")
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        connection = connect(server.port)
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= requests:
                break
            is_bad = bad_every > 0 and i % bad_every == bad_every - 1
            name, body, want = bad[(i // bad_every) % len(bad)] if is_bad else ("good", good[i % len(good)], 200)
            body, headers = multipart(body) if form else (body, {"Content-Type": "application/octet-stream"})
            start = time.perf_counter()
            try:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                answer = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                status, answer = 0, str(err).encode()
                connection.close()
                connection = connect(server.port)
            took = time.perf_counter() - start
            with lock:
                if status != want:
                    result.errors.append(f"{name}: {status} instead of {want}: {answer[:160]!r}")
                elif is_bad:
                    result.bad_ok += 1
                else:
                    result.latencies.append(took)
            if status in (0, 413):  # the server may close a connection it did not read to the end
                connection.close()
                connection = connect(server.port)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu = server.cpu_s()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall = time.perf_counter() - start
    result.cpu = server.cpu_s() - cpu
    return result


def pooled(results: list[Result]) -> dict[str, float]:
    """The rounds of one configuration together: good requests per second of wall time, the server's CPU
    milliseconds per request (good or bad: what a busy machine's load changes least), latency percentiles of
    all good requests, errors and bad requests answered right."""
    ms = np.array([t for r in results for t in r.latencies]) * 1000
    answered = sum(len(r.latencies) + len(r.errors) + r.bad_ok for r in results)
    return {"good_per_s": len(ms) / sum(r.wall for r in results),
            "cpu_ms": 1000 * sum(r.cpu for r in results) / answered,
            **{f"p{q}": float(np.percentile(ms, q)) if len(ms) else float("nan") for q in (50, 95, 99)},
            "errors": sum(len(r.errors) for r in results), "bad_ok": sum(r.bad_ok for r in results)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mpad-tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single", type=int, default=200, help="requests of the 1-client run (0: none)")
    parser.add_argument("--bad-every", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="side of the good requests' PNGs (0: as generated)")
    parser.add_argument("--impl", choices=("own", "litserve"), default="own")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching servers' --max-batch")
    parser.add_argument("--max-wait-ms", default="5", help="the batching servers' --max-wait-ms (a,b,...: several)")
    parser.add_argument("--threads", type=int, default=0, help="the servers' onnxruntime threads (0: default)")
    parser.add_argument("--map", action="store_true", help="ask for the overlay and map PNGs too")
    parser.add_argument("--python", default=sys.executable, help="the servers' interpreter")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mpad-bench-serve")
    parser.add_argument("--time-limit-s", type=float, default=600, help="cap of each load run")
    args = parser.parse_args()
    model = export_model(args.backbone, args.workdir)
    good, bad = payloads(args.workdir, args.size)
    waits = [float(w) for w in args.max_wait_ms.split(",")]
    if args.impl == "own":  # the baseline first, then one batching server per --max-wait-ms
        servers = [Server("max-batch 1", "own", args.python, model, 1, 0.0, args.threads)]
        servers += [Server(f"batch {args.max_batch}, {w:g} ms", "own", args.python, model, args.max_batch, w,
                           args.threads) for w in waits]  # fmt: skip
    else:
        servers = [
            Server("mpad serve", "own", args.python, model, args.max_batch, waits[0], args.threads),
            Server("LitServe", "litserve", args.python, model, args.max_batch, waits[0]),
        ]
    form = args.impl == "litserve"
    model_only_ceiling(model, args.max_batch, args.threads)
    size = f"{args.size} px" if args.size else "generated-size"
    print(f"{args.backbone} (random weights), {size} PNGs, map {args.map}, {args.clients} clients, "
          f"{args.requests} requests a run (1 in {args.bad_every} bad), {'multipart' if form else 'raw'} bodies; "
          f"load before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    try:
        for server in servers:
            server.start()
            load(server, good, bad, min(args.clients, 4), 100, 0, form, args.map, args.time_limit_s)  # warm-up
            server.rss.append(server.memory_mib())
        runs: dict[tuple[str, int], list[Result]] = {}
        for round_ in range(args.rounds):
            for server in servers if round_ % 2 == 0 else servers[::-1]:
                for clients, requests in ((args.clients, args.requests), (1, args.single)):
                    if requests:
                        result = load(server, good, bad, clients, requests, args.bad_every, form, args.map,
                                      args.time_limit_s)  # fmt: skip
                        runs.setdefault((server.name, clients), []).append(result)
                        for error in sorted(set(result.errors))[:5]:
                            print(f"  {server.name}, {clients} clients: {error}")
                server.rss.append(server.memory_mib())
    finally:
        for server in servers:
            server.stop()
    report(servers, runs, args)


def model_only_ceiling(model: Path, max_batch: int, threads: int, seconds: float = 3.0) -> None:
    """onnxruntime alone, in this process before any server starts: ms per image at batch 1 and at max_batch, with
    the servers' thread count. Their ratio bounds what batching can gain in throughput on this machine: a server's
    other work per request (HTTP, decoding, answers) does not shrink with the batch."""
    import torch

    from mpad.deploy.runtime import OnnxScorer
    from mpad.deploy.sidecar import Sidecar

    scorer = OnnxScorer(model, "cpu", threads or None, spinning=False)
    input_size = Sidecar.load(model).input_size
    per_image = {}
    for batch in (1, max_batch):
        images = torch.rand(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
        scorer(images)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            scorer(images)
            calls += 1
        per_image[batch] = (time.perf_counter() - start) / calls / batch * 1000
    print(f"onnxruntime alone: {per_image[1]:.2f} ms an image at batch 1, {per_image[max_batch]:.2f} at batch "
          f"{max_batch}: batching can gain at most {per_image[1] / per_image[max_batch]:.2f}x here")  # fmt: skip


def report(servers: list[Server], runs: dict, args: argparse.Namespace) -> None:
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(f"{'server':<18} {'clients':>7} {'good/s':>8} {'CPU ms/req':>10} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'errors':>7} {'bad 4xx':>8} {'RSS MiB: warm, after each round':<32}")  # fmt: skip
    merged = {key: pooled(results) for key, results in runs.items()}
    for (name, clients), row in merged.items():
        server = next(s for s in servers if s.name == name)
        rss = ", ".join(f"{mib:.0f}" for mib in server.rss)
        print(f"{name:<18} {clients:>7} {row['good_per_s']:>8.1f} {row['cpu_ms']:>10.2f} {row['p50']:>8.1f} "
              f"{row['p95']:>8.1f} {row['p99']:>8.1f} {row['errors']:>7} {row['bad_ok']:>8}   {rss}")  # fmt: skip
    base = servers[0].name
    for other in (s.name for s in servers[1:]):
        if (base, args.clients) in merged and (other, args.clients) in merged:
            a, b = merged[base, args.clients], merged[other, args.clients]
            print(f"{other} / {base}, {args.clients} clients: throughput {b['good_per_s'] / a['good_per_s']:.2f}x, "
                  f"server CPU per request {b['cpu_ms'] / a['cpu_ms']:.2f}x, "
                  f"p95 {b['p95']:.1f} vs {a['p95']:.1f} ms")  # fmt: skip
        if (base, 1) in merged and (other, 1) in merged:
            print(f"{other} / {base}, 1 client: p50 {merged[other, 1]['p50']:.1f} vs {merged[base, 1]['p50']:.1f} ms")


if __name__ == "__main__":
    main()
