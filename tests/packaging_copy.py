"""Copy the checkout's files (git-tracked plus untracked-but-not-ignored; everything but build and VCS folders
when git is not there) to a new folder, for packaging checks that must not write into the checkout.

    python3 tests/packaging_copy.py DEST
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = (".git", ".venv", "node_modules", "out", "build", "dist", "__pycache__", "*.egg-info", "artifacts")


def copy_checkout(dest: Path, root: Path = ROOT) -> Path:
    dest = Path(dest)
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*SKIP))
        return dest
    for name in filter(None, listed.decode().split("\0")):
        src = root / name
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/packaging_copy.py DEST")
    copy_checkout(Path(sys.argv[1]))
