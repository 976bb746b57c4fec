"""Write the stratified ModelNet10 subset in this folder from the full archive.

Usage: python data/modelnet10/make_subset.py /path/to/ModelNet10_pcd.tar.gz

Takes, per class, a seeded random sample of TRAIN_PER_CLASS training and TEST_PER_CLASS test files and packs them,
unchanged and with their original paths, into a reproducible tar.gz (sorted names, fixed owner and time, no gzip
timestamp).
"""

import gzip
import io
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath


TRAIN_PER_CLASS = 40
TEST_PER_CLASS = 20
SEED = 0
OUTPUT = Path(__file__).resolve().parent / "ModelNet10_pcd_subset.tar.gz"


def main(source: str) -> None:
    by_group = defaultdict(list)
    with tarfile.open(source, "r:gz") as archive:
        members = {member.name: member for member in archive.getmembers() if member.name.endswith(".pcd")}
        for name in sorted(members):
            parts = PurePosixPath(name).parts
            by_group[(parts[-3], parts[-2])].append(name)

        rng = random.Random(SEED)
        chosen = []
        for (_, split), names in sorted(by_group.items()):
            count = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
            chosen.extend(rng.sample(names, count))

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as subset:
            for name in sorted(chosen):
                data = archive.extractfile(members[name]).read()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = members[name].mtime
                info.mode = 0o644
                subset.addfile(info, io.BytesIO(data))
    with open(OUTPUT, "wb") as file, gzip.GzipFile(fileobj=file, mode="wb", compresslevel=9, mtime=0) as compressed:
        compressed.write(buffer.getvalue())
    print(f"wrote {len(chosen)} files to {OUTPUT}")


if __name__ == "__main__":
    main(sys.argv[1])
