"""Input pipeline throughput: images/s of the grain training loader, from a VG folder and packed.

  python benchmarks/pipeline.py            # 480x640 and 240x320 from 480x640 sources, 480x640 from 768x1024
  python benchmarks/pipeline.py --quick    # 480x640 and 120x160 from 480x640 sources: < 2 minutes
  python benchmarks/pipeline.py --workdir /data/bench  # keep the synthetic images (default: a temp dir)
  python benchmarks/pipeline.py --per-core # 480x640 sources -> 480x640, 320x320, 120x160 on 1 thread:
                                           # img/s per CPU core, for sizing a GPU machine's host

Per source size, writes a synthetic split of photo-like JPEGs (aerial renders plus sensor noise,
quality 90: ~70 KB at 480x640, as Pitts30k's) in the VG folder format, and packs it
(`vgjax.data.tfds_builders`: a tensorflow-datasets dataset in array_record) at each training size as
JPEG (quality 95, 4:4:4; same-size sources copied verbatim) and as raw uint8. Then measures `pipeline.triplet_batches`, the training
loader (decode, PIL bilinear resize to the training size, batches of 8 uint8 images), reading
  folder       the JPEG files (`images.load_rgb`),
  packed jpeg  the packed JPEG records (`Pack.loader()`, the resize is then a no-op),
  packed raw   the packed raw records,
with 1, 2, 4 and os.cpu_count() host threads, and the same map in grain worker processes
(`mp_prefetch`, 1 and 2 workers of one thread each) for the folder and packed JPEG. Rates count
the batches after the first (so exclude start-up, reported separately); the page cache is warm
(the files were just written), so these are decode + copy rates, not disk reads. Also reports the
packing rate and the bytes per image of each form.
Prints a table and writes benchmarks/results/pipeline.json.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from vgjax.data import images as image_ops  # noqa: E402
from vgjax.data import packed, pipeline, synthetic, tfds_builders  # noqa: E402

BATCH = 8
QUICK_CASES = {(480, 640): [(480, 640), (120, 160)]}  # source size -> training sizes
FULL_CASES = {(480, 640): [(480, 640), (240, 320)], (768, 1024): [(480, 640)]}
PER_CORE_CASES = {(480, 640): [(480, 640), (320, 320), (120, 160)]}
COLUMNS = (f"| {'source':<11} | {'source -> training':<20} | {'parallel':<10} | {'img/s':>8} | "
           f"{'ms/img':>7} | {'vs folder':>9} |")
HEADER = COLUMNS + "\n" + "".join("|" if c == "|" else "-" for c in COLUMNS)


class _LoadAndResize(grain.transforms.Map):
    """path -> uint8 [H, W, 3] at the training size, as triplet_batches maps (for worker processes)."""

    def __init__(self, loader, size):
        self._loader, self._size = loader, size

    def map(self, path):
        return image_ops.resize_pil_bilinear(self._loader(path), self._size)


def write_source(root, size, count, seed=0):
    """A split `<root>/images/bench/{database,queries}` of `count` noisy aerial JPEGs of `size`."""
    world = synthetic.AerialWorld(seed=seed, size_m=400.0)
    texture = world.texture()
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 6, (*size, 3)).astype(np.float32)
    positions = rng.uniform(60, 340, (count, 2))

    def render(i, east, north):
        view = synthetic.render_view(texture, world, east - synthetic.UTM_ORIGIN[0],
                                     north - synthetic.UTM_ORIGIN[1], 37.0 * i, 48.0, size)
        return (view * 0.9 + np.roll(noise, 97 * i, axis=(0, 1))).clip(0, 255).astype(np.uint8)

    database = count - count // 4
    synthetic.write_split(root, "bench", positions[:database] + synthetic.UTM_ORIGIN,
                          positions[database:] + synthetic.UTM_ORIGIN, render=render, jpeg_quality=90)
    return root


def total_bytes(files):
    return sum(f.stat().st_size for f in files)


def time_batches(batches):
    """Consumes an iterator of uint8 [B, ...] batches; the rate counts the batches after the first."""
    tick = time.perf_counter()
    first, first_images, images = None, 0, 0
    for batch in batches:
        images += len(batch)
        if first is None:
            first, first_images = time.perf_counter(), len(batch)
    seconds = time.perf_counter() - first
    return {"images": images, "seconds": seconds, "first_batch_seconds": first - tick,
            "images_per_second": (images - first_images) / seconds if seconds > 0 else float("nan")}


def threaded_rate(paths, size, loader, threads, min_seconds):
    """triplet_batches over `paths` repeated until one pass lasts min_seconds (at most 64x)."""
    repeats = 1
    while True:
        tuples = [[p] for p in paths * repeats]
        batches = pipeline.triplet_batches(tuples, BATCH, size, num_threads=threads, loader=loader)
        result = time_batches(batches)
        if result["seconds"] >= min_seconds or repeats >= 64:
            return result
        repeats *= 2


def worker_rate(paths, size, loader, workers, repeats):
    """The same map in `workers` grain processes (one thread each) via mp_prefetch."""
    dataset = (grain.MapDataset.source(paths * repeats)
               .map(_LoadAndResize(loader, size))
               .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * BATCH))
               .batch(BATCH, drop_remainder=True)
               .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)))
    return time_batches(iter(dataset))


def pack_all(root, source_size, target_sizes):
    """Packs the bench split at every target size and encoding; returns {(size, encoding): info}."""
    packs = {}
    for size in target_sizes:
        for encoding in tfds_builders.ENCODINGS:
            builder = tfds_builders.vg_folder_pack(root / "packed", root, size, splits=("bench",), encoding=encoding,
                                            progress=False)
            tick = time.perf_counter()
            tfds_builders.build(builder, root)
            seconds = time.perf_counter() - tick
            pack = packed.open_pack(builder)
            count = sum(len(paths) for paths in pack.paths.values())
            packs[size, encoding] = {
                "pack": pack, "pack_seconds": seconds, "pack_images_per_second": count / seconds,
                "bytes_per_image": total_bytes(pack.folder.glob("*.array_record-*")) / count}
            print(f"packed {_size(source_size)} -> {_size(size)} {encoding}: "
                  f"{packs[size, encoding]['bytes_per_image'] / 1e3:.0f} KB/image, "
                  f"{count / seconds:.0f} images/s", flush=True)
    return packs


def measure_case(source_size, size, packs, args):
    """Rows of the table for one (source size, training size)."""
    pack = packs[size, "jpeg"]["pack"]
    paths = [str(pack.source / path) for split in pack.paths.values() for path in split]
    sources = {"folder": image_ops.load_rgb, "packed jpeg": pack.loader(),
               "packed raw": packs[size, "raw"]["pack"].loader()}
    threads = [1] if args.per_core else sorted({1, 2, 4, os.cpu_count() or 1})
    case = {"source_size": list(source_size), "image_size": list(size)}
    rows = []
    for name, loader in sources.items():
        workers = [] if args.per_core or name == "packed raw" else [(1, 1), (1, 2)]
        runs = [(count, 0) for count in threads] + workers
        for count, workers in runs:
            if workers:
                result = worker_rate(paths, size, loader, workers, args.worker_repeats)
            else:
                result = threaded_rate(paths, size, loader, count, args.min_seconds)
            rows.append({"source": name, **case, "threads": count, "workers": workers, **result})
            print(format_row(rows[-1], rows), flush=True)
    return rows


def _size(size):
    return f"{size[0]}x{size[1]}"


def format_row(row, rows):
    """A table line; the last column is the rate over the folder's at the same parallelism."""
    keys = ("source_size", "image_size", "threads", "workers")
    baseline = next(r for r in rows if r["source"] == "folder" and all(r[k] == row[k] for k in keys))
    count, unit = (row["workers"], "worker") if row["workers"] else (row["threads"], "thread")
    parallel = f"{count} {unit}{'s' * (count != 1)}"
    sizes = f"{_size(row['source_size'])} -> {_size(row['image_size'])}"
    return (f"| {row['source']:<11} | {sizes:<20} | {parallel:<10} | {row['images_per_second']:8.0f} | "
            f"{1000 / row['images_per_second']:7.2f} | "
            f"{row['images_per_second'] / baseline['images_per_second']:8.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="192 images, 480x640 sources, < 2 minutes")
    parser.add_argument("--per-core", action="store_true", help="1 thread, training sizes 480x640, 320x320, 120x160")
    parser.add_argument("--images", type=int, default=None, help="images per source size")
    parser.add_argument("--workdir", default="", help="where to write the synthetic images (default: temp)")
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args()
    args.min_seconds = 0.5 if args.quick else 2.0
    args.worker_repeats = 2 if args.quick else 4
    count = args.images or (192 if args.quick else 800)
    flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags
    rows, packing = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        cases = PER_CORE_CASES if args.per_core else QUICK_CASES if args.quick else FULL_CASES
        for source_size, sizes in cases.items():
            root = write_source(Path(tmp) / _size(source_size), source_size, count)
            folder_bytes = total_bytes(root.rglob("*.jpg")) / count
            print(f"source {_size(source_size)}: {count} JPEGs, {folder_bytes / 1e3:.0f} KB/image")
            packs = pack_all(root, source_size, sizes)
            packing += [{"source_size": list(source_size), "image_size": list(size), "encoding": encoding,
                         "folder_bytes_per_image": folder_bytes,
                         **{k: v for k, v in info.items() if k != "pack"}}
                        for (size, encoding), info in packs.items()]
            print(HEADER)
            for size in sizes:
                rows += measure_case(source_size, size, packs, args)
    print("\n" + HEADER + "\n" + "\n".join(format_row(row, rows) for row in rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "images_per_source": count, "batch": BATCH,
                               "packing": packing, "rows": rows}, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
