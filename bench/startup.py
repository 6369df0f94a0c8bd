"""The two start-up costs cut for `make run JOBS=N`, old way against new, alternating in one process.

Run: .venv/bin/python bench/startup.py [--model ViT-B-16-plus-240] [--repeats 3]

- weights: building the model and loading a checkpoint file of its (random) weights, as open_clip does it
  (`torch.load` into new memory, then `load_state_dict` copies it into the model), against mpad.clip's
  `_mapped_weights` (the file memory-mapped, its tensors taken as the model's weights); then the first forward
  pass of 4 images, which reads the mapped pages.
- ensemble: one category's 252 meta-prompt sentences through `encode_text` (all 77 positions) against
  `mpad.prompts.encode_tokens` (up to the last end token), and the largest difference of the two.

Prints each time and the load average: other work on the machine slows both, so compare within a repeat.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from itertools import product
from pathlib import Path

import open_clip
import torch

from mpad import clip
from mpad.prompts import ANOMALY_STATES, NORMAL_STATES, TEMPLATES, encode_tokens


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-plus-240")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        torch.save(clip.load_clip(args.model, "none").model.state_dict(), path)
        print(f"{args.model}: {path.stat().st_size / 2**20:.0f} MiB checkpoint, {torch.get_num_threads()} threads")
        images = torch.randn(4, 3, *clip.load_clip(args.model, "none").image_size)
        for repeat in range(args.repeats):
            for name, context in (("read + copy", clip._no_weight_init), ("mapped", clip._mapped_weights)):
                gc.collect()
                with context():
                    model, build = timed(lambda: open_clip.create_model(args.model, pretrained=str(path)))
                with torch.no_grad():
                    _, forward = timed(lambda m=model: m.encode_image(images))
                print(
                    f"[{repeat}] weights, {name}: build + load {build:.2f} s, first forward (4 images) {forward:.2f} s"
                    f" (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                del model
        bundle = clip.load_clip(args.model, str(path))
        sentences = [t.format(s.format("metal nut")) for t, s in product(TEMPLATES, NORMAL_STATES + ANOMALY_STATES)]
        tokens = bundle.tokenizer(sentences)
        for repeat in range(args.repeats):
            with torch.no_grad():
                full, before = timed(lambda: bundle.model.encode_text(tokens))
                short, after = timed(lambda: encode_tokens(bundle.model, tokens))
            print(
                f"[{repeat}] ensemble of {len(sentences)} sentences: encode_text {before:.2f} s, encode_tokens "
                f"{after:.2f} s ({after / before:.2f}x), largest difference {float((full - short).abs().max()):.1e} "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
