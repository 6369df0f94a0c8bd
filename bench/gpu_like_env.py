"""Make a Python environment that sees only what the GPU machine has, to dry-run bench/gpu_check.sh here.

Run: .venv/bin/python bench/gpu_like_env.py DEST bench/gpu_packages.txt
The names file lists the GPU image's packages (KINDS.md's "Python packages already there"; comma or
line separated, # comments). DEST/site gets a symlink to every top-level module of each distribution of
this venv whose name is listed, and DEST/env/bin/python is a venv (with pip) whose only extra path is
DEST/site (a .pth file). Packages the GPU image lacks (open_clip, dvc, dvclive, ...) are thus missing
there too: the carried wheels must supply them. Versions are this venv's, not the GPU's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(dest: Path, names_file: Path) -> None:
    lines = [line for line in names_file.read_text().splitlines() if not line.startswith("#")]
    wanted = {norm(n) for n in re.split(r"[,\s]+", " ".join(lines)) if n}
    site = dest / "site"
    site.mkdir(parents=True, exist_ok=True)
    for dist in distributions():
        if norm(dist.metadata["Name"]) not in wanted:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists() and top != "__pycache__":
                (site / top).symlink_to(src)
    subprocess.run([sys.executable, "-m", "venv", str(dest / "env")], check=True)
    purelib = sysconfig.get_path("purelib", vars={"base": str(dest / "env"), "platbase": str(dest / "env")})
    Path(purelib, "gpu_like.pth").write_text(str(site.resolve()) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
