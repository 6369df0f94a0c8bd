"""The same service on LitServe, for bench/serve.py's comparison (`--impl litserve`): an mpad export model
behind `litserve.LitAPI` with its own dynamic batching (max_batch_size, batch_timeout).

The same decoding (mpad.serve.images) and answers (mpad.serve.model) as `mpad serve`, in LitServe's shape:
LitServe reads JSON or a form (not a raw body), so clients send a multipart form with the field `image`;
decode_request runs in the inference worker, per batch, before the model call; a BadImage becomes an
HTTPException with its status. Needs `pip install litserve` (not a project dependency).

    python bench/serve_litserve.py MODEL PORT [--max-batch 8] [--max-wait-ms 5] [--max-pixels 25000000]
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch
from fastapi import HTTPException

from mpad.serve.images import BadImage, decode_image
from mpad.serve.model import load_model


class MpadAPI(ls.LitAPI):
    def __init__(self, model: str, max_pixels: int, **batching) -> None:
        super().__init__(**batching)
        self.path, self.max_pixels = model, max_pixels

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)  # as `mpad serve` decodes: the parallelism is the model's
        self.model = load_model(self.path)
        self.model.scorer(torch.zeros(1, 3, *self.model.input_size))

    def decode_request(self, request):
        try:
            return self.model.prepare(decode_image(request["image"].file.read(), self.max_pixels))
        except BadImage as err:
            raise HTTPException(err.status, str(err)) from err

    def batch(self, inputs):
        return torch.cat(inputs)

    def predict(self, images):
        return self.model.scorer(images)

    def unbatch(self, output):
        maps, scores = output
        return list(zip(maps, scores, strict=True))

    def encode_response(self, output):
        amap, score = output
        return self.model.answer(None, amap, float(score), None)  # no image: no map (as ?map=false)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("port", type=int)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-pixels", type=int, default=25_000_000)
    args = parser.parse_args()
    api = MpadAPI(args.model, args.max_pixels, max_batch_size=args.max_batch, batch_timeout=args.max_wait_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
