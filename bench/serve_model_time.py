"""The model's share of a serving load: `mpad serve`'s model calls timed inside the server.

Starts one server per configuration (this file as its own server process, `--serve`: the app of `mpad serve`
with its scorer wrapped in a timer), sends each bench/serve.py's wrk load (8 clients, REQUESTS requests,
--bad-every as there), and prints, from the calls after the first fifth: the mean batch, the share of the
time the model was busy, its ms per image, and the gaps between calls. What it answers: whether a server is
held by its model or by its own work, and which batches the closed-loop clients form.

    .venv/bin/python bench/serve_model_time.py [--requests 3000] [--bad-every 0] [--configs 1,8,8,1]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_server(model: str, port: int, max_batch: int) -> None:
    """The server side: `mpad serve`'s app and limits as bench/serve.py starts them, the calls timed; prints
    one JSON line of figures when stopped."""
    import uvicorn
    from serve import MAX_BYTES  # bench/serve.py: the servers' --max-bytes

    from mpad.serve.app import Limits, create_app
    from mpad.serve.model import load_model
    from stages.serve import _listen, _quiet_decoders

    served = load_model(model, None, "cpu", None)
    calls: list[tuple[float, float, int]] = []
    scorer = served.scorer

    def timed(images):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        out = scorer(images)
        calls.append((start, time.perf_counter(), len(images)))
        return out

    served = dataclasses.replace(served, scorer=timed)

    def figures() -> None:
        kept = calls[len(calls) // 5 :]  # after the warm-up and the load's start
        if len(kept) < 10:
            return
        span = kept[-1][1] - kept[0][0]
        busy = sum(end - start for start, end, _ in kept)
        images = sum(n for *_, n in kept)
        gaps = sorted(b[0] - a[1] for a, b in zip(kept, kept[1:], strict=False))
        print(json.dumps({"mean_batch": images / len(kept), "busy": busy / span, "ms_per_image": 1000 * busy / images,
                          "gap_p50_ms": 1000 * gaps[len(gaps) // 2], "gap_mean_ms": 1000 * sum(gaps) / len(gaps)}),
              flush=True)  # fmt: skip

    atexit.register(figures)
    _quiet_decoders()
    app = create_app(served, Limits(max_batch=max_batch, max_queue=256, max_bytes=MAX_BYTES))
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[_listen("127.0.0.1", port)])
    except KeyboardInterrupt:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--bad-every", type=int, default=0, help="1 in N requests a bad one (0: none)")
    parser.add_argument("--configs", default="1,8,8,1", help="the servers' --max-batch, in the order they run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpad-bench-serve"))
    parser.add_argument("--serve", nargs=3, metavar=("MODEL", "PORT", "MAX_BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return timed_server(args.serve[0], int(args.serve[1]), int(args.serve[2]))
    sys.path.insert(0, str(ROOT / "bench"))
    import serve as bench  # bench/serve.py: the model, the payloads, wrk's load

    model = bench.export_model("mpad-tiny", args.workdir)
    good, bad = bench.payloads(args.workdir, 0)
    for max_batch in (int(b) for b in args.configs.split(",")):
        server = bench.Server(f"max-batch {max_batch}", "own", sys.executable, model, max_batch)
        server.port = bench.free_port()
        server.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(model), str(server.port),
                                        str(max_batch)], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
        server.wait_ready("/readyz")
        bench.load(server, good, bad, 8, 500, 0, False, False, 600)  # warm-up
        result = bench.load(server, good, bad, 8, args.requests, args.bad_every, False, False, 600)
        server.proc.send_signal(signal.SIGINT)
        inside = json.loads(server.proc.communicate(timeout=60)[0].strip().splitlines()[-1])
        print(f"max-batch {max_batch}: {len(result.latencies) / result.wall:.0f} good req/s, errors "
              f"{len(result.errors)}; model: mean batch {inside['mean_batch']:.2f}, busy {100 * inside['busy']:.1f} %, "
              f"{inside['ms_per_image']:.3f} ms an image, gaps p50 {inside['gap_p50_ms']:.3f} ms, "
              f"mean {inside['gap_mean_ms']:.3f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
