"""CIFAR-10, CIFAR-100 and SVHN (cropped), downloaded from their authors' sites and prepared once.

`load_split(name, split)` reads `<cache>/datasets/<name>/<split>/{images,labels}.npy` (`<cache>`:
`$PALM_JAX_CACHE`, else ~/.cache/palm_jax). A split that is not there is fetched from `ARCHIVES`:

1. a reachability check of the archive's host, at most `REACH_TIMEOUT_S` seconds, so that offline fails at
   once with one line naming `--data-dir` / `DATA_DIR=` and the opt-out;
2. the archive, with a progress bar, into a temporary file whose size and sha256 must match the table (a
   corrupt or partial download is an error and is deleted);
3. each split the archive holds is written to a temporary folder that is then renamed: a split folder exists
   only complete, and is never written again. The archive is deleted once its splits are written.

Downloading is the default; `PALM_JAX_DOWNLOAD=0` (or the older `PALM_JAX_TFDS_DOWNLOAD=0`) turns it off.
No TensorFlow and no pickle: CIFAR comes from its binary tarballs, SVHN from its .mat files (read with
`scipy.io.loadmat`; scipy comes with jax).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

import numpy as np

from palm_jax.data.sources import (
    NUM_CLASSES,
    POINT_AT_LOCAL_DATA,
    DataFormatError,
    DataNotFoundError,
    cache_dir,
    first_line,
)

DOWNLOAD_ENV = "PALM_JAX_DOWNLOAD"
LEGACY_DOWNLOAD_ENV = "PALM_JAX_TFDS_DOWNLOAD"  # its name when TFDS downloaded; still honoured
REACH_TIMEOUT_S = 4.0  # the reachability check: DNS, connect and the answer to a HEAD request
READ_TIMEOUT_S = 60.0  # a download stalled for this long fails
_CHUNK_BYTES = 1 << 20
_IMAGE_SHAPE = (32, 32, 3)


class Archive(NamedTuple):
    """One file to download: where, its size and sha256, and the splits it holds (split -> the member files of
    a tarball holding it, in order; a .mat file holds one split and lists no members)."""

    url: str
    size: int
    sha256: str
    splits: dict[str, tuple[str, ...]]


_KRIZ = "https://www.cs.toronto.edu/~kriz/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"
# Sizes and sha256 as TFDS 4.9.10 checks them (tensorflow_datasets/url_checksums/cifar10.txt, cifar100.txt,
# datasets/svhn_cropped/checksums.tsv).
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "cifar10": (Archive(
        _KRIZ + "cifar-10-binary.tar.gz", 170_052_171,
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        {"train": tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
         "test": ("cifar-10-batches-bin/test_batch.bin",)}),),
    "cifar100": (Archive(
        _KRIZ + "cifar-100-binary.tar.gz", 168_513_733,
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        {"train": ("cifar-100-binary/train.bin",), "test": ("cifar-100-binary/test.bin",)}),),
    "svhn": (
        Archive(_SVHN + "train_32x32.mat", 182_040_794,
                "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8", {"train": ()}),
        Archive(_SVHN + "test_32x32.mat", 64_275_384,
                "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b", {"test": ()}),
        Archive(_SVHN + "extra_32x32.mat", 1_329_278_602,
                "a133a4beb38a00fcdda90c9489e0c04f900b660ce8a316a5e854838379a71eb3", {"extra": ()}),
    ),
}
# CIFAR binary records: label byte(s), then the image as 3 planes of 32 x 32 (R, G, B). CIFAR-100's two label
# bytes are (coarse, fine); the class is the last one.
_CIFAR_LABEL_BYTES = {"cifar10": 1, "cifar100": 2}


def download_enabled(download=None) -> bool:
    """`download` if given, else `$PALM_JAX_DOWNLOAD` (or `$PALM_JAX_TFDS_DOWNLOAD`); on if both are unset."""
    if download is not None:
        return bool(download)
    for env in (DOWNLOAD_ENV, LEGACY_DOWNLOAD_ENV):
        value = os.environ.get(env, "").strip().lower()
        if value in ("0", "false", "no", "off"):
            return False
        if value in ("1", "true", "yes", "on"):
            return True
        if value:
            raise ValueError(f"{env}={value!r}: use 0 (never download) or 1 (download what is missing)")
    return True


def dataset_dir(name) -> str:
    """Where `name`'s prepared splits live: `<cache>/datasets/<name>`."""
    return os.path.join(cache_dir(), "datasets", name)


def load_split(name, split, *, download=None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 32, 32, 3], int32 labels [N]) of `split` ("train", "test"; SVHN also "extra") of
    `name`, downloaded and prepared on first use (see the module docstring)."""
    archive = _archive_holding(name, split)
    folder = os.path.join(dataset_dir(name), split)
    if not os.path.isdir(folder):
        _download_and_prepare(name, archive, download)
    return _read_split(folder, NUM_CLASSES[name])


def _archive_holding(name, split) -> Archive:
    if name not in ARCHIVES:
        raise ValueError(f"no download for dataset {name!r}; choose one of {sorted(ARCHIVES)}")
    for archive in ARCHIVES[name]:
        if split in archive.splits:
            return archive
    splits = [s for archive in ARCHIVES[name] for s in archive.splits]
    raise ValueError(f"{name} has no split {split!r}; choose one of {splits}")


def _download_and_prepare(name, archive, download):
    where = dataset_dir(name)
    if not download_enabled(download):
        raise DataNotFoundError(f"{name} is not prepared in {where} and downloading is off "
                                f"({DOWNLOAD_ENV}=0); unset it to download, or {POINT_AT_LOCAL_DATA}")
    host = urllib.parse.urlsplit(archive.url).hostname
    problem = _unreachable(archive.url)
    if problem is not None:
        raise DataNotFoundError(f"cannot download {name}: {host} is unreachable ({problem}); "
                                f"{POINT_AT_LOCAL_DATA}, or set {DOWNLOAD_ENV}=0 to never try")
    file_name = os.path.basename(urllib.parse.urlsplit(archive.url).path)
    try:
        os.makedirs(where, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=where, prefix=f".{file_name}.", suffix=".part")
    except OSError as e:
        raise DataNotFoundError(f"cannot write to {where} ({first_line(e)}); set PALM_JAX_CACHE to a "
                                f"writable folder, or {POINT_AT_LOCAL_DATA}") from e
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(archive, out, f"{name}: {file_name}")
        print(f"palm_jax: preparing {name} {'/'.join(archive.splits)} in {where} (once)", file=sys.stderr)
        if file_name.endswith(".mat"):
            (split,) = archive.splits
            arrays = {split: _read_svhn_mat(part, archive.url)}
        else:
            arrays = _read_cifar_tarball(part, archive, _CIFAR_LABEL_BYTES[name], NUM_CLASSES[name])
        for split, (images, labels) in arrays.items():
            _write_split(os.path.join(where, split), images, labels)
    finally:
        os.remove(part)


def _unreachable(url) -> str | None:
    """None if `url`'s host answers a HEAD request within REACH_TIMEOUT_S seconds (any HTTP status counts),
    else why not. It runs in a daemon thread, so that not even a hanging DNS lookup can hold the caller."""
    outcome = []

    def probe():
        try:
            urllib.request.urlopen(_request(url, "HEAD"), timeout=REACH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # the host answered
        except (OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            is_error = isinstance(reason, BaseException)  # URLError.reason may also be a string
            outcome.append(f"{type(reason).__name__}: {first_line(reason)}" if is_error else str(reason))
            return
        outcome.append(None)

    thread = threading.Thread(target=probe, daemon=True, name="palm_jax reachability check")
    thread.start()
    thread.join(REACH_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer within {REACH_TIMEOUT_S:g} s"


def _request(url, method="GET"):
    return urllib.request.Request(url, method=method, headers={"User-Agent": "palm_jax"})


def _fetch(archive, out, desc):
    """Streams `archive.url` into the open file `out` with a progress bar; its size and sha256 must match."""
    digest, size = hashlib.sha256(), 0
    print(f"palm_jax: downloading {archive.url} ({archive.size / 2**20:.0f} MiB, once)", file=sys.stderr)
    bar = _progress_bar(archive.size, desc)
    try:
        with urllib.request.urlopen(_request(archive.url), timeout=READ_TIMEOUT_S) as response:
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, a dropped connection
        raise DataNotFoundError(f"downloading {archive.url} failed after {size} of {archive.size} bytes "
                                f"({type(e).__name__}: {first_line(e)}); run again, or {POINT_AT_LOCAL_DATA}"
                                ) from e
    finally:
        if bar is not None:
            bar.close()
    if size != archive.size or digest.hexdigest() != archive.sha256:
        raise DataFormatError(f"{archive.url}: the download is corrupt or partial ({size} bytes, sha256 "
                              f"{digest.hexdigest()[:16]}...; expected {archive.size} bytes, sha256 "
                              f"{archive.sha256[:16]}...) and was deleted; run again, or "
                              f"{POINT_AT_LOCAL_DATA}")


def _progress_bar(total_bytes, desc):
    """tqdm over bytes (a terminal redraws each second, a log gets a line every 30 s); None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # PYTHON=... without tqdm: the "downloading" line only
        return None
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def _read_cifar_tarball(path, archive, label_bytes, num_classes):
    """{split: (images, labels)} from a CIFAR binary tarball."""
    record_bytes = label_bytes + int(np.prod(_IMAGE_SHAPE))
    arrays = {}
    with tarfile.open(path, "r:gz") as tar:
        for split, members in archive.splits.items():
            chunks = []
            for member in members:
                try:
                    data = tar.extractfile(member).read()
                except KeyError:
                    raise DataFormatError(f"{archive.url}: no {member} in the archive") from None
                if len(data) % record_bytes:
                    raise DataFormatError(f"{archive.url}: {member} has {len(data)} bytes, not a multiple of "
                                          f"the {record_bytes}-byte record")
                chunks.append(np.frombuffer(data, np.uint8).reshape(-1, record_bytes))
            records = np.concatenate(chunks)
            images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            arrays[split] = (np.ascontiguousarray(images), records[:, label_bytes - 1].astype(np.int32))
            _check_labels(arrays[split][1], num_classes, f"{archive.url}: {split}")
    return arrays


def _read_svhn_mat(path, url):
    """(images, labels) from an SVHN cropped .mat file: X is [32, 32, 3, N], y [N, 1] with 10 for digit 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
        images, labels = mat["X"], mat["y"].reshape(-1)
    except (ValueError, KeyError, OSError) as e:
        raise DataFormatError(f"{url}: not an SVHN .mat file ({type(e).__name__}: {first_line(e)})") from e
    if images.dtype != np.uint8 or images.shape[:3] != _IMAGE_SHAPE or images.shape[3] != len(labels):
        raise DataFormatError(f"{url}: X is {images.dtype} {images.shape} for {len(labels)} labels; expected "
                              f"uint8 [32, 32, 3, N]")
    _check_labels(labels - 1, 10, url)  # 1..10
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), (labels % 10).astype(np.int32)


def _check_labels(labels, num_classes, where):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{where}: labels outside [0, {num_classes}): {labels.min()}..{labels.max()}")


def _write_split(folder, images, labels):
    """Writes a temporary folder, then renames it to `folder`: readers see the whole split or none."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{os.path.basename(folder)}.")
    try:
        np.save(os.path.join(tmp, "images.npy"), images, allow_pickle=False)
        np.save(os.path.join(tmp, "labels.npy"), labels, allow_pickle=False)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise  # else another process prepared it meanwhile: keep that one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_split(folder, num_classes):
    """The prepared split, checked (dtype, shape, labels); a damaged one is a one-line error naming it."""
    try:
        images = np.load(os.path.join(folder, "images.npy"), allow_pickle=False)
        labels = np.load(os.path.join(folder, "labels.npy"), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataFormatError(f"{folder}: unreadable ({type(e).__name__}: {first_line(e)}); delete that "
                              "folder to download it again") from e
    if images.dtype != np.uint8 or images.shape[1:] != _IMAGE_SHAPE or labels.dtype != np.int32 \
            or labels.shape != images.shape[:1]:
        raise DataFormatError(f"{folder}: holds {images.dtype} {images.shape} images and {labels.dtype} "
                              f"{labels.shape} labels; delete that folder to download it again")
    _check_labels(labels, num_classes, folder)
    return images, labels
