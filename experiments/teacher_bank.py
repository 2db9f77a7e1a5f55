"""Trained teachers kept between GPU sessions, in parts small enough for the device tool's transfers.

A lent GPU machine starts bare every session, and the paper's 60k-image ResNet-34 teacher takes ~3.5 of its 15
minutes to train again; each retraining is also another teacher. So, there, after a chunk, `send` copies every
teacher the chunk trained to $OUT as 15 MiB parts, over as many calls as the limits on what comes back need;
here, `collect` gathers them into a git-ignored bank; the next session carries the parts (over two calls: 64 MiB
each) and `paper.py run --teacher-bank` restores the teacher its cells would train.

A teacher is named by what it was trained from, its params section and its data's identity (the teacher stage's
own resume key), so only a teacher those cells would train is restored; every part's name carries the checksum
of the whole, so only a complete and intact set is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.io import atomic_path, read_json  # noqa: E402
from pipeline.teacher import training_key  # noqa: E402

PART_BYTES = 15 * 2**20
PART = re.compile(r"teacher-(?P<id>[0-9a-f]{16})\.(?P<sha>[0-9a-f]{12})\.(?P<i>\d{2})-of-(?P<n>\d{2})\.part")
FROM_BANK = "teacher.from-bank"  # beside a restored teacher: it came from the bank, so it is not sent back


def part_sets(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """Parts in `folder` by (teacher identity, checksum of the whole), in order."""
    sets: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.glob("teacher-*.part")) if folder.is_dir() else []:
        if match := PART.fullmatch(path.name):
            sets.setdefault((match["id"], match["sha"]), []).append(path)
    return sets


def missing(parts: list[Path]) -> list[int]:
    """Indices absent from one set of parts."""
    total = int(PART.fullmatch(parts[0].name)["n"])
    return sorted(set(range(total)) - {int(PART.fullmatch(p.name)["i"]) for p in parts})


def joined(parts: list[Path], sha: str) -> bytes | None:
    """The whole a set of parts makes, if it is complete and joins to the checksum their names carry."""
    if missing(parts):
        return None
    whole = b"".join(p.read_bytes() for p in parts)
    return whole if hashlib.sha256(whole).hexdigest()[:12] == sha else None


def pack(shared: Path, into: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """The teacher of `shared` (teacher/ and teacher.json, as paper.py lays them out) as parts in `into`, made once."""
    manifest = read_json(shared / "teacher" / "manifest.json")
    ident = training_key(manifest["params"], manifest["inputs"]["data"])
    for (other, _), parts in part_sets(into).items():
        if other == ident:
            if not missing(parts):
                return parts
            for part in parts:  # a packing cut short
                part.unlink()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(shared / "teacher", arcname="teacher")
        tar.add(shared / "teacher.json", arcname="teacher.json")
    whole = buffer.getvalue()
    digest, count = hashlib.sha256(whole).hexdigest()[:12], -(-len(whole) // part_bytes)
    if count > 99:
        raise ValueError(f"{shared}: {len(whole)} bytes make more than 99 parts of {part_bytes}")
    parts = [into / f"teacher-{ident}.{digest}.{i:02d}-of-{count:02d}.part" for i in range(count)]
    for i, part in enumerate(parts):
        with atomic_path(part) as tmp:  # (a hidden temporary name: no part pattern matches one left behind)
            tmp.write_bytes(whole[i * part_bytes:(i + 1) * part_bytes])
    return parts


def send(work: Path, out: Path, max_bytes: int, max_files: int, only: set[int] | None = None,
         part_bytes: int = PART_BYTES) -> tuple[list[str], int]:
    """Copy to `out`, in order and while they fit `max_bytes` and `max_files`, the parts not sent yet (or, with
    `only`, those of these indices again) of every teacher trained under `work` (a `paper.py run --work` folder);
    teachers restored from a bank stay. Returns the names sent and how many parts are left for a later call."""
    staged = work.with_name(f"{work.name}.parts")  # beside the work folder: its teachers' parts, which were sent
    log = staged / "sent.txt"
    sent = set(log.read_text().split()) if log.is_file() else set()

    def wanted(part: Path) -> bool:
        return int(PART.fullmatch(part.name)["i"]) in only if only is not None else part.name not in sent

    trained = [m.parent.parent for m in work.glob("*/teacher-*/teacher/manifest.json")
               if not (m.parent.parent / FROM_BANK).is_file()]
    trained.sort(key=lambda shared: -read_json(shared / "teacher.json")["train_seconds"])  # the dearest first
    todo = [p for shared in trained for p in pack(shared, staged, part_bytes) if wanted(p)]
    names: list[str] = []
    for part in todo:
        if len(names) >= max_files or part.stat().st_size > max_bytes:
            break
        with atomic_path(out / part.name) as tmp:
            shutil.copyfile(part, tmp)
        names.append(part.name)
        max_bytes -= part.stat().st_size
        log.write_text("\n".join(sorted(sent | set(names))) + "\n")
    return names, len(todo) - len(names)


def restore(bank: Path, ident: str, shared: Path) -> bool:
    """Extract the banked teacher `ident` into `shared` from a complete set of its parts that joins to the checksum
    their names carry and holding a teacher of that training; False (and nothing written) if there is none."""
    for (other, sha), parts in part_sets(bank).items():
        whole = joined(parts, sha) if other == ident else None
        if whole is None:
            continue
        shared.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=shared) as tmp:
            with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
                tar.extractall(tmp, filter="data")
            manifest = read_json(Path(tmp) / "teacher" / "manifest.json")
            if training_key(manifest["params"], manifest["inputs"]["data"]) != ident:  # misnamed parts
                continue
            shutil.rmtree(shared / "teacher", ignore_errors=True)  # what a killed training may have left
            shutil.move(Path(tmp) / "teacher.json", shared / "teacher.json")
            (shared / FROM_BANK).write_text(f"{ident}.{sha}\n")  # not to be sent back
            shutil.move(Path(tmp) / "teacher", shared / "teacher")  # last: its manifest marks the teacher as made
        return True
    return False


def collect(sources: list[Path], bank: Path) -> None:
    """Copy the parts in `sources` (folders that came back from calls) into `bank`; say what is complete, what is
    missing, and how to carry each complete teacher. The bank keeps one training per teacher identity: parts of
    another training of a teacher it holds complete are left out (GPU training need not repeat bit for bit)."""
    bank.mkdir(parents=True, exist_ok=True)
    for folder in sources:
        for (ident, sha), parts in part_sets(folder).items():
            held = [other for (i, other), have in part_sets(bank).items() if i == ident and joined(have, other)]
            if held and sha not in held:
                print(f"teacher-{ident} ({sha}): not collected, the bank holds another training of it ({held[0]}); "
                      f"remove that one's parts to keep this one instead")
                continue
            for part in parts:
                with atomic_path(bank / part.name) as tmp:  # a copy cut short leaves no part behind
                    shutil.copyfile(part, tmp)
    for (ident, sha), parts in part_sets(bank).items():
        size = sum(p.stat().st_size for p in parts) / 2**20
        gaps = missing(parts)
        whole = None if gaps else joined(parts, sha)
        print(f"teacher-{ident} ({sha}): {len(parts)} parts, {size:.1f} MiB; " +
              (f"missing {' '.join(f'{i:02d}' for i in gaps)} (TEACHER_PARTS for `device_check.sh teachers`)" if gaps
               else "complete" if whole else "CORRUPT: they do not join to their checksum (remove them)"))
        if whole:  # a first call takes 60 MiB of them, the experiment's call the rest beside the data
            first = parts[:int(60 * 2**20 // PART_BYTES)]
            print(f"  carry first: {[str(p) for p in first]}\n  then beside .whl and .fmnist: "
                  f"{[str(p) for p in parts[len(first):]]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    send_ap = sub.add_parser("send", help="(on the GPU machine) parts of newly trained teachers to an output folder")
    send_ap.add_argument("--work", type=Path, required=True, help="the work folder of `paper.py run`")
    send_ap.add_argument("--out", type=Path, required=True)
    send_ap.add_argument("--max-mib", type=float, required=True, help="room left in what comes back")
    send_ap.add_argument("--max-files", type=int, required=True, help="files that may still come back")
    send_ap.add_argument("--only", type=int, nargs="*", help="send the parts of these indices again (e.g. 3 4)")
    collect_ap = sub.add_parser("collect", help="(here) gather parts that came back into the bank")
    collect_ap.add_argument("sources", type=Path, nargs="+")
    collect_ap.add_argument("--bank", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.command == "send":
        only = set(args.only) if args.only is not None else None
        names, left = send(args.work, args.out, int(args.max_mib * 2**20), args.max_files, only)
        print(f"teacher parts sent: {' '.join(names) or 'none'}; {left} left for another call")
    else:
        collect(args.sources, args.bank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
