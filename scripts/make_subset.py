"""Make data/cifar10_subset.npz: a small, class-balanced, real subset of CIFAR-10, shipped in the repo.

    python scripts/make_subset.py /path/to/cifar10-jpeg.tar.gz          # writes data/cifar10_subset.npz

The archive is the JPEG release of CIFAR-10 (tar.gz holding cifar10/{train,test}/<class>/NNNN.jpg).
We keep the original JPEG bytes (no re-encoding, so pixels are exactly the archive's) and let
np.savez_compressed squeeze out the headers the files share: ~310 bytes an image, 15,000 images 4.65 MB.
The choice is reproducible: file names are sorted, then each class is sampled with random.Random(SEED).
train.py reads the file with --dataset cifar10-subset (its default) and needs no network.
"""

import argparse
import hashlib
import random
import tarfile
from pathlib import Path

import numpy as np

SEED = 0
TRAIN_PER_CLASS = 500  # 5,000 train images: enough for a demo that learns something in a minute on a CPU
TEST_PER_CLASS = (
    1000  # all 10,000 test images of CIFAR-10: one accuracy is ±1 point (95%), not ±3 as with 1,000
)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", help="cifar10-jpeg.tar.gz")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parent.parent / "data" / "cifar10_subset.npz")
    )
    args = ap.parse_args()

    sha = hashlib.sha256(Path(args.archive).read_bytes()).hexdigest()
    files = {}  # (split, class) -> {name: jpeg bytes}
    with tarfile.open(args.archive, "r:gz") as tar:
        for m in tar:
            parts = m.name.split("/")  # cifar10/<split>/<class>/<NNNN>.jpg
            if m.isfile() and len(parts) == 4 and parts[1] in ("train", "test") and parts[3].endswith(".jpg"):
                files.setdefault((parts[1], parts[2]), {})[parts[3]] = tar.extractfile(m).read()
    assert sorted({c for _, c in files}) == CLASSES, f"unexpected class folders in {args.archive}"

    rng = random.Random(SEED)
    out = {"classes": np.array(CLASSES), "source_sha256": np.array(sha), "seed": np.array(SEED)}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        blobs, labels, names = [], [], []
        for label, cls in enumerate(CLASSES):
            for name in sorted(rng.sample(sorted(files[(split, cls)]), per_class)):
                blobs.append(files[(split, cls)][name])
                labels.append(label)
                names.append(f"{cls}/{name}")
        out[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        out[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        out[f"{split}_labels"] = np.array(labels, dtype=np.uint8)
        out[f"{split}_names"] = np.array(names)
    np.savez_compressed(args.out, **out)
    print(
        f"wrote {args.out}: {len(out['train_labels'])} train + {len(out['test_labels'])} test images, "
        f"{Path(args.out).stat().st_size / 1e6:.2f} MB (source sha256 {sha[:12]}...)"
    )


if __name__ == "__main__":
    main()
