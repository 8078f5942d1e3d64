"""Downloading CIFAR-10/100 and SVHN: small archives in the real download formats, served from 127.0.0.1."""

import contextlib
import hashlib
import http.server
import io
import os
import socket
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import scipy.io

from palm_jax.data import DataFormatError, DataNotFoundError, download, load_dataset


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALM_JAX_CACHE", str(tmp_path / "cache"))
    for env in (download.DOWNLOAD_ENV, download.LEGACY_DOWNLOAD_ENV):
        monkeypatch.delenv(env, raising=False)
    return tmp_path / "cache"


# ---------------------------------------------------------------- archives in the authors' formats


def _random_split(rng, count, num_classes):
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, count)


def _cifar_records(images, *label_columns):
    """The binary format: label byte(s), then the R, G and B planes of 32 x 32 bytes."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.stack(label_columns, 1).astype(np.uint8), planes], 1).tobytes()


def _tarball(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar10_files(rng):
    """({file name: bytes} of cifar-10-binary.tar.gz: 5 x 2 training and 3 test images, {split: arrays})."""
    train, test = _random_split(rng, 10, 10), _random_split(rng, 3, 10)
    members = {f"cifar-10-batches-bin/data_batch_{i + 1}.bin": _cifar_records(train[0][2 * i:2 * i + 2],
                                                                              train[1][2 * i:2 * i + 2])
               for i in range(5)}
    members["cifar-10-batches-bin/test_batch.bin"] = _cifar_records(*test)
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    return {"cifar-10-binary.tar.gz": _tarball(members)}, {"train": train, "test": test}


def cifar100_files(rng):
    """cifar-100-binary.tar.gz: records with (coarse, fine) label bytes; the class is the fine one."""
    train, test = _random_split(rng, 4, 100), _random_split(rng, 3, 100)
    members = {f"cifar-100-binary/{split}.bin": _cifar_records(images, labels // 5, labels)
               for split, (images, labels) in (("train", train), ("test", test))}
    members["cifar-100-binary/fine_label_names.txt"] = b"apple\n"
    return {"cifar-100-binary.tar.gz": _tarball(members)}, {"train": train, "test": test}


def svhn_files(rng):
    """{train,test,extra}_32x32.mat: X [32, 32, 3, N] uint8, y [N, 1] in 1..10 (10 is the digit 0)."""
    files, splits = {}, {}
    for split, count in (("train", 4), ("test", 3), ("extra", 5)):
        images, labels = _random_split(rng, count, 10)
        labels[0] = 0  # stored as 10
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, {"X": images.transpose(1, 2, 3, 0), "y": np.where(labels == 0, 10, labels)
                                  .astype(np.uint8)[:, None]}, do_compression=True)
        files[f"{split}_32x32.mat"], splits[split] = buffer.getvalue(), (images, labels)
    return files, splits


DATASETS = {"cifar10": cifar10_files, "cifar100": cifar100_files, "svhn": svhn_files}


# ---------------------------------------------------------------- a bounded local server


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        self.server.requests.append((self.command, self.path.lstrip("/")))
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))  # the whole file, even when the body is cut short
        self.end_headers()
        if body:
            self.wfile.write(data[:self.server.cut_at])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(files, cut_at=None):
    """An HTTP server on 127.0.0.1 serving {file name: bytes} (bodies cut after `cut_at` bytes if given, as a
    dropped connection); it records (method, file) per request and stops on exit, or by itself after 60 s."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.cut_at, server.requests = files, cut_at, []
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    deadline = threading.Timer(60, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield server
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()


def point_at(monkeypatch, name, base_url, files):
    """The test-only override: `name`'s archives (their real member lists) at `base_url`, with the size and
    sha256 of `files`."""
    archives = []
    for archive in download.ARCHIVES[name]:
        file_name = archive.url.rsplit("/", 1)[1]
        data = files.get(file_name, b"")
        archives.append(archive._replace(url=base_url + file_name, size=len(data),
                                         sha256=hashlib.sha256(data).hexdigest()))
    monkeypatch.setitem(download.ARCHIVES, name, tuple(archives))


def _url(server):
    return f"http://127.0.0.1:{server.server_port}/"


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _assert_one_line(error, *needles):
    text = str(error)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_first_load_downloads_and_prepares_the_next_reads_without_network(name, cache, monkeypatch, capsys):
    files, expected = DATASETS[name](np.random.default_rng(0))
    with serving(files) as server:
        point_at(monkeypatch, name, _url(server), files)
        data = load_dataset(name)  # the default: no data_dir, no download flag
        fetched = [file for method, file in server.requests if method == "GET"]
        again = load_dataset(name)
        assert len(server.requests) == 2 * len(fetched)  # a HEAD (the reachability check) and a GET per file
    if name == "svhn":  # as in the originals, SVHN trains on train + extra
        expected["train"] = tuple(np.concatenate([expected["train"][i], expected["extra"][i]])
                                  for i in (0, 1))
        extra = download.load_split("svhn", "extra")  # prepared with the rest: read again, nothing fetched
        assert len(server.requests) == 2 * len(fetched)
        np.testing.assert_array_equal(extra[0], expected["extra"][0])
    assert sorted(fetched) == sorted(files)
    assert data.eval_split == "test" and data.num_classes == (100 if name == "cifar100" else 10)
    for loaded in (data, again):
        for prefix, split in (("train", "train"), ("eval", "test")):
            images, labels = getattr(loaded, f"{prefix}_images"), getattr(loaded, f"{prefix}_labels")
            assert images.dtype == np.uint8 and labels.dtype == np.int32
            np.testing.assert_array_equal(images, expected[split][0])
            np.testing.assert_array_equal(labels, expected[split][1])
    splits = ["train", "test", "extra"] if name == "svhn" else ["train", "test"]
    assert _files_under(cache) == sorted(f"datasets/{name}/{split}/{array}.npy" for split in splits
                                         for array in ("images", "labels"))  # no archive, no temporary file
    stderr = capsys.readouterr().err
    assert f"downloading {_url(server)}" in stderr and "100%" in stderr  # the progress bar's last state


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "dropped connection"])
def test_a_corrupt_or_partial_download_is_an_error_and_leaves_nothing(damage, cache, monkeypatch):
    good, expected = cifar10_files(np.random.default_rng(1))
    data = good["cifar-10-binary.tar.gz"]
    served = {"flipped byte": data[:100] + bytes([data[100] ^ 1]) + data[101:], "truncated": data[:-10],
              "dropped connection": data}[damage]
    with serving({"cifar-10-binary.tar.gz": served}, cut_at=len(data) // 2 if damage == "dropped connection"
                 else None) as server:
        point_at(monkeypatch, "cifar10", _url(server), good)
        with pytest.raises(DataNotFoundError) as error:
            load_dataset("cifar10")
    _assert_one_line(error.value, "DATA_DIR=", "run again")
    assert _files_under(cache) == []
    with serving(good) as server:  # the next run downloads again and succeeds
        point_at(monkeypatch, "cifar10", _url(server), good)
        np.testing.assert_array_equal(load_dataset("cifar10").eval_images, expected["test"][0])


def test_an_interrupted_prepare_leaves_no_split_that_later_reads_trust(cache, monkeypatch):
    files, expected = cifar10_files(np.random.default_rng(2))
    real_save, saved = np.save, []

    def save_then_fail(path, array, **kwargs):
        if len(saved) == 3:  # train written, test half written
            raise OSError(28, "No space left on device")
        saved.append(path)
        real_save(path, array, **kwargs)

    with serving(files) as server:
        point_at(monkeypatch, "cifar10", _url(server), files)
        with monkeypatch.context() as patch:
            patch.setattr(download.np, "save", save_then_fail)
            with pytest.raises(OSError, match="No space"):
                load_dataset("cifar10")
        assert _files_under(cache) == [f"datasets/cifar10/train/{a}.npy" for a in ("images", "labels")]
        data = load_dataset("cifar10")  # only the missing test split is prepared again
    np.testing.assert_array_equal(data.eval_labels, expected["test"][1])
    np.testing.assert_array_equal(data.train_images, expected["train"][0])


@contextlib.contextmanager
def silent_server():
    """A TCP port that accepts connections (the kernel does) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"


@contextlib.contextmanager
def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("unreachable", [silent_server, closed_port])
def test_offline_fails_within_seconds_with_one_line_naming_data_dir(unreachable, cache, monkeypatch):
    with unreachable() as url:
        point_at(monkeypatch, "cifar10", url, {})
        start = time.perf_counter()
        with pytest.raises(DataNotFoundError) as error:
            load_dataset("cifar10")
        seconds = time.perf_counter() - start
    assert seconds < 10  # an offline download would retry for minutes
    _assert_one_line(error.value, "127.0.0.1 is unreachable", "DATA_DIR=", "PALM_JAX_DOWNLOAD=0")
    assert not os.path.exists(cache / "datasets" / "cifar10" / "train")


@pytest.mark.parametrize("env", ["PALM_JAX_DOWNLOAD", "PALM_JAX_TFDS_DOWNLOAD"])
def test_download_off_never_touches_the_network(env, monkeypatch):
    files, _ = cifar10_files(np.random.default_rng(3))
    monkeypatch.setenv(env, "0")
    with serving(files) as server:
        point_at(monkeypatch, "cifar10", _url(server), files)
        with pytest.raises(DataNotFoundError) as error:
            load_dataset("cifar10")
        assert server.requests == []
    _assert_one_line(error.value, "downloading is off", "DATA_DIR=")
    monkeypatch.setenv(env, "sometimes")
    with pytest.raises(ValueError, match=env):
        load_dataset("cifar10")


def test_a_damaged_prepared_split_names_the_folder_to_delete(cache, monkeypatch):
    files, _ = cifar10_files(np.random.default_rng(4))
    with serving(files) as server:
        point_at(monkeypatch, "cifar10", _url(server), files)
        load_dataset("cifar10")
    (cache / "datasets" / "cifar10" / "test" / "images.npy").write_bytes(b"not an array")
    with pytest.raises(DataFormatError) as error:
        load_dataset("cifar10")
    _assert_one_line(error.value, str(cache / "datasets" / "cifar10" / "test"), "delete that folder")


def test_without_tqdm_the_download_works_without_a_bar(monkeypatch, capsys):
    files, expected = cifar10_files(np.random.default_rng(5))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # PYTHON=... an environment without tqdm
    with serving(files) as server:
        point_at(monkeypatch, "cifar10", _url(server), files)
        data = load_dataset("cifar10")
    np.testing.assert_array_equal(data.train_labels, expected["train"][1])
    assert "downloading" in capsys.readouterr().err
