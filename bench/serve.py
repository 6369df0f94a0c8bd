"""Load test of `mpad serve` on loopback: dynamic batching against `--max-batch 1`, bad requests, memory.

Exports a model of BACKBONE with random weights (prompts at their initialisation; scoring, map size and
memory as the pipeline would export them: `exported_scoring`), starts one server per configuration on
127.0.0.1 (free ports, all up at once), and sends each the same load in turn, alternating the order from
round to round so that both see the same machine. A load: CLIENTS connections, each keep-alive, sending one
request after the other until REQUESTS have been sent (or --time-limit-s has passed); every --bad-every-th
request is a bad one (empty, not an image, GIF, truncated PNG, a decompression bomb's header, a body over
--max-bytes), checked for its 4xx. The clients are wrk's threads (Debian's `wrk`, a load generator in C,
scripted by bench/serve_load.lua), not Python's: the Python clients used before took, by the server's
share of the cores, about 0.6 of the 2, and so diluted what the server's own work decides.
Good requests: generated parts, upscaled to --size px PNGs, `?map=false` unless --map.

First prints onnxruntime's own ms per image at batch 1, 2, 4 ... --max-batch, with the servers' threads and with
one, in this process before any server starts: the ratio of batch 1 to --max-batch bounds what batching can
gain. Then per configuration: throughput of good requests, p50 / p95 / p99 latency, errors (a good request
without 200, a bad one without its status, a failed connection: must be 0), the server's RSS after a warm-up
and after each round, then the ratios. `--form` sends the images as multipart forms instead of raw bodies.

`--hostile` measures instead one `mpad serve` at its default limits under issue 32's hostile mix against the
same server's clean run, the two alternating (bench/harness.py): the good clients (wrk, --clients) alone, then
with 32 slow clients sending a body at 1 byte a second, 4 clients sending 25-megapixel PNGs one after the other,
and a client that aborts uploads (1,000 of 50,000 announced bytes, then close). Targets: the good clients keep
>= 0.8x the clean throughput and <= 2x its p95, none of their requests fails, the server's RSS stays under 1.5 GB,
its log holds no traceback.

    .venv/bin/python bench/serve.py [--backbone mpad-tiny] [--clients 8] [--requests 2000] [--rounds 2]
        [--single 200] [--form] [--map] [--python PATH] [--time-limit-s 600] [--hostile]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import os
import shutil
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
sys.path.insert(0, str(ROOT / "bench"))
from harness import alternate, ratio, summary  # noqa: E402

# The thresholds file the model is exported with (image_threshold and map range: placeholders); its scoring and
# map resolution are params.yaml's, with presets/offline.txt's changes for mpad-tiny (`exported_scoring`).
THRESHOLDS = {"category": "disc", "image_threshold": 0.5, "map_low": 0.0, "map_high": 1.0}
MAX_BYTES = 4 * 2**20  # the servers' --max-bytes: a bad request's body goes just over it


def exported_scoring(backbone: str) -> tuple[dict, bool]:
    """(the thresholds file's scoring fields, whether the prompts carry a visual memory), as the pipeline would
    export them: params.yaml's scoring, evaluate.resolution and memory.enabled, changed by presets/offline.txt
    for mpad-tiny (the offline preset's model)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    values = {
        f"{group}.{key}": value for group in ("scoring", "evaluate", "memory") for key, value in params[group].items()
    }
    if backbone == "mpad-tiny":
        for line in (ROOT / "presets/offline.txt").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                values[key] = yaml.safe_load(value)
    scoring = {key: values[f"scoring.{key}"] for key in ("smoothing_sigma", "image_score", "topk")}
    return {**scoring, "resolution": values["evaluate.resolution"]}, bool(values["memory.enabled"])


def export_model(backbone: str, folder: Path) -> Path:
    """<folder>/<backbone>-<scoring>.onnx: a random-weight detector exported by `mpad export` (reused when present)."""
    scoring, memory = exported_scoring(backbone)
    name = f"{backbone}-{scoring['image_score']}-{scoring['resolution']}{'-memory' if memory else ''}"
    model = folder / f"{name}.onnx"  # its prompts and thresholds: <folder>/<name>/
    if model.with_suffix(".onnx.json").is_file():
        return model
    from tiny_records import tiny_record

    from mpad.clip import load_clip

    project = folder / name
    (project / "prompts").mkdir(parents=True, exist_ok=True)
    (project / "thresholds").mkdir(exist_ok=True)
    tiny_record(load_clip(backbone, "none", "cpu"), "disc", memory=memory).save(project / "prompts/disc.pt")
    digest = hashlib.sha256((project / "prompts/disc.pt").read_bytes()).hexdigest()  # pairs the two files
    (project / "thresholds/disc.json").write_text(json.dumps({**THRESHOLDS, **scoring, "prompts_sha256": digest}))
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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server to take (LitServe takes no socket; ours could say it itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A `mpad serve` process on 127.0.0.1."""

    name: str
    python: str
    model: Path
    max_batch: int
    max_wait_ms: float = 5.0
    threads: int = 0
    proc: subprocess.Popen | None = None
    port: int = 0
    rss: list[float] = field(default_factory=list)
    options: tuple[str, ...] = ("--max-queue", "256")  # more options of `mpad serve`
    log: Path | None = None  # where its stdout and stderr go (None: nowhere)

    def start(self) -> None:
        self.port = free_port()
        command = [self.python, "-c", "import stages.cli; stages.cli.app()", "serve", "--model", str(self.model),
                   "--port", str(self.port), "--max-batch", str(self.max_batch), "--max-wait-ms",
                   str(self.max_wait_ms), "--max-bytes", str(MAX_BYTES), *self.options,
                   *(["--threads", str(self.threads)] if self.threads else [])]  # fmt: skip
        out = self.log.open("wb") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.wait_ready("/readyz")

    def wait_ready(self, path: str, timeout_s: float = 600) -> None:
        """Returns once the server answers 200 at `path`; SystemExit when it exits or timeout_s pass first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                connection.request("GET", path)
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
    wall: float = 0.0  # first request sent to last answer received
    cpu: float = 0.0  # the server's CPU seconds over the run
    client_cpu: float = 0.0  # wrk's


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "mpad-bench"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="part.png"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def requests_file(path: Path, good: list[bytes], bad: list, bad_every: int, form: bool) -> None:
    """The records bench/serve_load.lua sends (its header says the format): every bad_every-th a bad one."""
    count = max(len(good), bad_every * len(bad) if bad_every else 1)
    with path.open("wb") as out:
        for i in range(count):
            is_bad = bad_every > 0 and i % bad_every == bad_every - 1
            name, body, want = bad[(i // bad_every) % len(bad)] if is_bad else ("good", good[i % len(good)], 200)
            body, kind = multipart(body) if form else (body, "application/octet-stream")
            out.write(f"{want} {name.replace(' ', '_')} {kind.replace(' ', '')} {len(body)}\n".encode() + body)


def load(server: Server, good: list[bytes], bad: list, clients: int, requests: int, bad_every: int,
         form: bool, with_map: bool, time_limit_s: float) -> Result:  # fmt: skip
    """CLIENTS connections sending REQUESTS requests in all (rounded up to a multiple of CLIENTS), driven by wrk
    (bench/serve_load.lua); bounded by time_limit_s."""
    path = "/v1/predict" + ("" if with_map else "?map=false")
    per_client = -(-requests // clients)
    with tempfile.TemporaryDirectory(prefix="mpad-load-") as folder:
        records = Path(folder) / "requests.bin"
        requests_file(records, good, bad, bad_every, form)
        cpu = server.cpu_s()
        wrk = subprocess.Popen(
            ["wrk", "-t", str(clients), "-c", str(clients), "-d", f"{time_limit_s:.0f}s", "--timeout",
             f"{time_limit_s:.0f}s", "-s", str(ROOT / "bench/serve_load.lua"), f"http://127.0.0.1:{server.port}",
             "--", str(records), str(per_client), path, folder],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        files = [Path(folder) / f"thread-{i}.txt" for i in range(clients)]
        while wrk.poll() is None and not all(f.is_file() for f in files):
            time.sleep(0.01)  # wrk waits out its -d even when every thread has stopped: stop it once they have
        server_cpu = server.cpu_s() - cpu
        client_cpu = float("nan")  # unknown if wrk ended by itself (its -d ran out)
        with contextlib.suppress(psutil.NoSuchProcess):
            client_cpu = sum(psutil.Process(wrk.pid).cpu_times()[:2])
        wrk.send_signal(signal.SIGINT)
        output = wrk.communicate(timeout=60)[0]
        result = Result(cpu=server_cpu, client_cpu=client_cpu)
        spans = []
        for f in files:
            if not f.is_file():
                result.errors.append(f"a client did not finish its {per_client} requests within {time_limit_s:g} s")
                continue
            head, *lines = f.read_text().splitlines()
            first, last, good_n, bad_ok, _ = map(int, head.split())
            spans.append((first, last))
            result.bad_ok += bad_ok
            result.latencies += [int(line) / 1e6 for line in lines if not line.startswith("error ")]
            result.errors += [line.removeprefix("error ") for line in lines if line.startswith("error ")]
        socket_errors = [int(line.split()[-1]) for line in output.splitlines() if line.startswith("mpad-load")]
        if not socket_errors:
            raise SystemExit(f"wrk did not report: {output[-2000:]}")
        result.errors += ["failed connection, read or write (wrk)"] * socket_errors[0]
        result.wall = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e6 if spans else float("nan")
    return result


def pooled(results: list[Result]) -> dict[str, float]:
    """The rounds of one configuration together: good requests per second of wall time, the server's CPU
    milliseconds per request (good or bad: what a busy machine's load changes least), latency percentiles of
    all good requests, errors and bad requests answered right."""
    ms = np.array([t for r in results for t in r.latencies]) * 1000
    answered = sum(len(r.latencies) + len(r.errors) + r.bad_ok for r in results)
    return {"good_per_s": len(ms) / sum(r.wall for r in results),
            "cpu_ms": 1000 * sum(r.cpu for r in results) / answered,
            "client_cpu_ms": 1000 * sum(r.client_cpu for r in results) / answered,
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
    parser.add_argument("--form", action="store_true", help="multipart forms instead of raw bodies")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching servers' --max-batch")
    parser.add_argument("--max-wait-ms", default="2", help="the batching servers' --max-wait-ms (a,b,...: several)")
    parser.add_argument("--threads", type=int, default=0, help="the servers' onnxruntime threads (0: default)")
    parser.add_argument("--map", action="store_true", help="ask for the overlay and map PNGs too")
    parser.add_argument("--python", default=sys.executable, help="the servers' interpreter")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mpad-bench-serve")
    parser.add_argument("--time-limit-s", type=float, default=600, help="cap of each load run")
    parser.add_argument("--hostile", action="store_true", help="the hostile mix against the clean run (issue 32)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/serve.py drives the load with wrk, a load generator in C: apt-get install wrk")
    model = export_model(args.backbone, args.workdir)
    good, bad = payloads(args.workdir, args.size)
    if args.hostile:
        return hostile_mix(model, good, args)
    waits = [float(w) for w in args.max_wait_ms.split(",")]
    # the baseline first, then one batching server per --max-wait-ms
    servers = [Server("max-batch 1", args.python, model, 1, 0.0, args.threads)]
    servers += [Server(f"batch {args.max_batch}, {w:g} ms", args.python, model, args.max_batch, w,
                       args.threads) for w in waits]  # fmt: skip
    form = args.form
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


SLOW_CLIENTS, LARGE_CLIENTS, LARGE_SIDE = 32, 4, 5000  # issue 32's mix: 1 byte/s senders, 25-megapixel PNGs
RSS_LIMIT_MIB = 1536


def hostile_mix(model: Path, good: list[bytes], args: argparse.Namespace) -> None:
    """One `mpad serve` at its default limits; per round, the good clients alone ("clean") and beside the hostile
    clients ("hostile"), alternated; prints both arms' figures and the SUMMARY line with the targets met or not."""
    log = args.workdir / "hostile-server.log"
    server = Server("mpad serve", args.python, model, args.max_batch, float(args.max_wait_ms.split(",")[0]),
                    args.threads, options=(), log=log)  # fmt: skip
    large = png(Image.linear_gradient("L").resize((LARGE_SIDE, LARGE_SIDE)).convert("RGB"))
    print(f"{args.backbone} (random weights), {args.clients} good clients x {args.requests} requests an arm; hostile: "
          f"{SLOW_CLIENTS} slow clients at 1 B/s, {LARGE_CLIENTS} clients of {LARGE_SIDE}x{LARGE_SIDE} PNGs "
          f"({len(large) / 1000:.0f} kB each), 1 aborting client; load before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    runs: dict[str, list[Result]] = {"clean": [], "hostile": []}
    peaks: list[float] = []
    others: dict[str, int] = {}

    def arm(name: str) -> float:
        with Hostile(server.port, large, peaks, server, others) if name == "hostile" else contextlib.nullcontext():
            result = load(server, good, [], args.clients, args.requests, 0, False, args.map, args.time_limit_s)
        runs[name].append(result)
        row = pooled([result])
        print(f"  {name:<8} good/s {row['good_per_s']:7.1f}  p50 {row['p50']:7.1f} ms  p95 {row['p95']:7.1f} ms  "
              f"errors {row['errors']}  {', '.join(sorted(set(result.errors)))[:200]}")  # fmt: skip
        return row["good_per_s"]

    try:
        server.start()
        load(server, good, [], 4, 100, 0, False, args.map, args.time_limit_s)  # warm-up
        throughput = alternate(args.rounds, {"clean": lambda: arm("clean"), "hostile": lambda: arm("hostile")},
                               warmup=False)  # fmt: skip
        server.rss.append(server.memory_mib())
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    tracebacks = text.count("Traceback")
    p95 = ratio([pooled([r])["p95"] for r in runs["hostile"]], [pooled([r])["p95"] for r in runs["clean"]])
    kept = ratio(throughput["hostile"], throughput["clean"])
    errors = sum(len(r.errors) for r in runs["hostile"])
    peak = max(peaks, default=float("nan"))
    print(f"hostile clients' answers: {dict(sorted(others.items()))}; server log: {tracebacks} tracebacks, "
          f"{text.count('upload aborted')} aborted-upload lines; load after: {os.getloadavg()[0]:.2f}")  # fmt: skip
    met = kept.median >= 0.8 and p95.median <= 2 and errors == 0 and peak <= RSS_LIMIT_MIB and tracebacks == 0
    summary("serve", f"hostile/clean good throughput {kept}", f"p95 {p95}", f"good errors {errors}",
            f"peak RSS {peak:.0f} MiB", f"tracebacks {tracebacks}", f"targets {'met' if met else 'MISSED'}",
            f"{args.backbone}, {args.clients} clients")  # fmt: skip


class Hostile:
    """The hostile clients of issue 32 against 127.0.0.1:`port` while the block runs (threads; each stops at the
    block's end); samples the server's RSS into `peaks` and counts the statuses the hostile clients get."""

    def __init__(self, port: int, large: bytes, peaks: list[float], server: Server, others: dict[str, int]) -> None:
        self.port, self.large, self.peaks, self.server, self.others = port, large, peaks, server, others
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.slow, daemon=True) for _ in range(SLOW_CLIENTS)]
        self.threads += [threading.Thread(target=self.big, daemon=True) for _ in range(LARGE_CLIENTS)]
        self.threads += [threading.Thread(target=self.aborting, daemon=True), threading.Thread(target=self.rss)]

    def __enter__(self) -> Hostile:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def count(self, what: str) -> None:
        with self.lock:
            self.others[what] = self.others.get(what, 0) + 1

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)

    def slow(self) -> None:
        """A body of 1,000 bytes at 1 byte a second; again when the server closes the connection."""
        while not self.stop.is_set():
            try:
                with self.connect() as sock:
                    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Length: 1000\r\n\r\n")
                    sock.settimeout(1.0)
                    while not self.stop.is_set():
                        try:
                            answer = sock.recv(64)
                        except TimeoutError:
                            sock.sendall(b"x")
                            continue
                        self.count(f"slow: {answer.split(b' ')[1].decode()}" if answer else "slow: closed")
                        break
            except OSError as err:
                self.count(f"slow: {type(err).__name__}")
                self.stop.wait(1.0)

    def big(self) -> None:
        while not self.stop.is_set():
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                connection.request("POST", "/v1/predict?map=false", self.large)
                response = connection.getresponse()
                response.read()
                self.count(f"large: {response.status}")
                connection.close()
            except OSError as err:
                self.count(f"large: {type(err).__name__}")

    def aborting(self) -> None:
        while not self.stop.wait(0.1):
            with contextlib.suppress(OSError), self.connect() as sock:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Length: 50000\r\n\r\n" + bytes(1000))
            self.count("aborted")

    def rss(self) -> None:
        while not self.stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peaks.append(self.server.memory_mib())


def model_only_ceiling(model: Path, max_batch: int, threads: int, seconds: float = 2.0) -> None:
    """onnxruntime alone, in this process before any server starts: ms per image at batch 1, 2, 4, ... max_batch,
    with the servers' thread count and with one thread. The servers' ratio of batch 1 to max_batch bounds what
    batching can gain in throughput on this machine (a server's other work per request, HTTP, decoding, answers,
    does not shrink with the batch); 8 closed-loop clients mostly form batches of 4 (two groups taking turns)."""
    import torch

    from mpad.deploy.runtime import OnnxScorer
    from mpad.deploy.sidecar import Sidecar

    input_size = Sidecar.load(model).input_size
    batches = sorted({1, max_batch, *(b for b in (2, 4, 8, 16) if b < max_batch)})
    servers_threads = threads or None  # None: onnxruntime's default, as the servers get it
    per_image: dict[tuple[int | None, int], float] = {}
    for count in dict.fromkeys((servers_threads, 1)):
        scorer = OnnxScorer(model, "cpu", count, spinning=False)
        for batch in batches:
            images = torch.rand(batch, 3, *input_size, generator=torch.Generator().manual_seed(0))
            scorer(images)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                scorer(images)
                calls += 1
            per_image[count, batch] = (time.perf_counter() - start) / calls / batch * 1000
        print(f"onnxruntime alone, {threads_named(count)}, ms an image: "
              + ", ".join(f"batch {b} {per_image[count, b]:.2f}" for b in batches))  # fmt: skip
    ratio = per_image[servers_threads, 1] / per_image[servers_threads, max_batch]
    print(f"with the servers' threads ({threads_named(servers_threads)}), batching can gain at most {ratio:.2f}x here")


def threads_named(count: int | None) -> str:
    return "onnxruntime's default, one thread a core" if count is None else f"{count} thread{'s' * (count > 1)}"


def report(servers: list[Server], runs: dict, args: argparse.Namespace) -> None:
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(f"{'server':<18} {'clients':>7} {'good/s':>8} {'CPU ms/req':>10} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'wrk CPU':>7} {'errors':>7} {'bad 4xx':>8} "
          f"{'RSS MiB: warm, after each round':<32}")  # fmt: skip
    merged = {key: pooled(results) for key, results in runs.items()}
    for (name, clients), row in merged.items():
        server = next(s for s in servers if s.name == name)
        rss = ", ".join(f"{mib:.0f}" for mib in server.rss)
        print(f"{name:<18} {clients:>7} {row['good_per_s']:>8.1f} {row['cpu_ms']:>10.2f} {row['p50']:>8.1f} "
              f"{row['p95']:>8.1f} {row['p99']:>8.1f} {row['client_cpu_ms']:>7.2f} {row['errors']:>7} "
              f"{row['bad_ok']:>8}   {rss}")  # fmt: skip
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
