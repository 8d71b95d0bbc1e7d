#!/usr/bin/env bash
# Build what a GPU session carries (run here, once, before `device run`): the device machine sees
# only the repository, and the working tree that travels is capped at 64 MiB, so the 52 MB
# CIFAR-10 archive and the parity fixtures cannot both go whole. This writes, under .gpu/
# (ignored through .git/info/exclude):
#   .gpu/cifar10-subset.zip   2,000 random training images per class and 100 test images per class
#   .gpu/shared/reference/ghn2-parity   the GHN-2 parity fixtures the CUDA tests compare against
# Then call the device with carry [".gpu"] and the command `bash bench/gpu_run.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${GHN_ONNX_SHARED:-$(pwd)/../shared}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/shared/reference
cp -r "$SHARED/reference/ghn2-parity" .gpu/shared/reference/
python3 - "$SHARED/data/cifar10-jpeg.zip" .gpu/cifar10-subset.zip <<'PY'
import random, sys, zipfile
src, dst = sys.argv[1:]
per = {"train": 2000, "test": 100}
with zipfile.ZipFile(src) as z:
    names = [n for n in z.namelist() if n.endswith(".jpg")]
    by = {}
    for n in names:
        parts = n.split("/")
        split, cls = parts[-3], parts[-2]
        by.setdefault((split, cls), []).append(n)
    rng = random.Random(0)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for (split, cls), files in sorted(by.items()):
            for n in sorted(rng.sample(sorted(files), per[split])):
                out.writestr(f"{split}/{cls}/{n.split('/')[-1]}", z.read(n))
PY
du -sh .gpu
