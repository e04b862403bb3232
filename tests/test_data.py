"""Dataset loaders on real files in the official formats, local and through gs:// (emulator).

Each test writes tiny files (IDX gz, CIFAR tarballs, a Tiny-ImageNet folder, an npz) the
way the official distributions lay them out, then loads them with `load_dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from doc_tables import first_table
from rcig import storage
from rcig.data import DATASETS, REGISTRY, DatasetError, load_dataset

RNG = np.random.default_rng(0)


# --- writers for the official formats ----------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x00000803 if arr.ndim == 3 else 0x00000801
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train=20, n_test=10, gz=True):
    data = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in data.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return data


def _cifar_rows(x_nhwc: np.ndarray) -> np.ndarray:
    return x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), 3072)  # R plane, G, B


def py2_pickle(obj) -> bytes:
    """A protocol-0 pickle as Python 2's cPickle wrote the official CIFAR files: `str` are
    byte strings (``S'...'``), arrays go through ``numpy.core.multiarray._reconstruct``."""
    out: list[bytes] = []

    def text(b: bytes):
        out.append(b"S'" + b"".join(b"\\x%02x" % c for c in b) + b"'\n")

    def put(o):
        if isinstance(o, str):
            text(o.encode("latin1"))
        elif isinstance(o, (int, np.integer)):
            out.append(b"I%d\n" % int(o))
        elif isinstance(o, (list, tuple)):
            out.append(b"(")
            for item in o:
                put(item)
            out.append(b"l" if isinstance(o, list) else b"t")
        elif isinstance(o, dict):
            out.append(b"(")
            for k, v in o.items():
                put(k)
                put(v)
            out.append(b"d")
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            out.append(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I0\ntS'b'\ntR")
            out.append(b"(I1\n(" + b"".join(b"I%d\n" % d for d in o.shape) + b"t")
            out.append(b"cnumpy\ndtype\n(S'u1'\nI0\nI1\ntR(I3\nS'|'\nNNNI-1\nI-1\nI0\ntb")
            out.append(b"I00\n")
            text(np.ascontiguousarray(o).tobytes())
            out.append(b"tb")
        else:
            raise TypeError(type(o))

    put(obj)
    return b"".join(out) + b"."


def cifar_members(dataset: str, n_train=20, n_test=10, protocol=2, bytes_keys=False):
    """Member name -> pickle bytes of a tiny CIFAR archive, plus the arrays written.

    ``protocol="py2"`` writes them as Python 2 did (the official files)."""
    classes = 10 if dataset == "cifar10" else 100
    x_tr = RNG.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    y_tr = RNG.integers(0, classes, n_train)
    x_te = RNG.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    y_te = RNG.integers(0, classes, n_test)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    dump = py2_pickle if protocol == "py2" else (lambda o: pickle.dumps(o, protocol=protocol))
    members = {}
    if dataset == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
            members[f"data_batch_{i}"] = dump({
                k("batch_label"): f"training batch {i} of 5", k("labels"): y_tr[part].tolist(),
                k("data"): _cifar_rows(x_tr[part]),
                k("filenames"): [f"img_{j}.png" for j in part]})
        members["test_batch"] = dump({k("batch_label"): "testing batch 1 of 1",
                                      k("labels"): y_te.tolist(), k("data"): _cifar_rows(x_te)})
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
        members["batches.meta"] = dump({k("label_names"): names, k("num_vis"): 3072})
    else:
        for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            members[split] = dump({k("fine_labels"): y.tolist(), k("coarse_labels"): (y // 5).tolist(),
                                   k("data"): _cifar_rows(x)})
        names = [f"class_{i}" for i in range(100)]
        members["meta"] = dump({k("fine_label_names"): names,
                                k("coarse_label_names"): [f"super_{i}" for i in range(20)]})
    return members, (x_tr, y_tr, x_te, y_te, names)


CIFAR_FILES = {"cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
               "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python")}


def write_cifar_tarball(folder: Path, dataset: str, members: dict[str, bytes]) -> Path:
    archive, inner = CIFAR_FILES[dataset]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / archive
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{inner}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_cifar_folder(folder: Path, dataset: str, members: dict[str, bytes]) -> Path:
    inner = folder / CIFAR_FILES[dataset][1]
    inner.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (inner / name).write_bytes(data)
    return inner


def write_tiny_imagenet(folder: Path, per_class=4, n_val=6):
    from PIL import Image

    root = folder / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander\n"
                                    "n01641577\tbullfrog, Rana catesbeiana\nn00000000\tother\n")
    def jpeg(path: Path, grey=False):
        arr = RNG.integers(0, 256, (64, 64) if grey else (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, format="JPEG")
        with Image.open(path) as img:  # what a decoder gives back (JPEG is lossy)
            return np.asarray(img.convert("RGB"))
    train, labels = [], []
    for c, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            train.append(jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", grey=(c, i) == (1, 2)))
            labels.append(c)
    val, val_labels, lines = [], [], []
    for i in range(n_val):
        c = i % 3
        val.append(jpeg(root / "val" / "images" / f"val_{i}.JPEG"))
        val_labels.append(c)
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root, (np.stack(train), np.array(labels), np.stack(val), np.array(val_labels))


def upload_tree(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, *path.relative_to(local).parts), path.read_bytes())


def assert_same_dataset(a, b):
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert (a.num_classes, a.image_shape, a.class_names) == (b.num_classes, b.image_shape, b.class_names)


def assert_pixels(ds, x_train, x_test, atol=2e-5):
    """The loaded (preprocessed) arrays map back to the written pixels."""
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    np.testing.assert_allclose(ds.to_pixels(ds.x_train), x_train / scale, atol=atol)
    np.testing.assert_allclose(ds.to_pixels(ds.x_test), x_test / scale, atol=atol)


# --- digits (embedded default) ------------------------------------------------------------


def _documented_datasets() -> dict[str, tuple[str, str]]:
    """name -> (standardisation, ZCA) cells of the table in docs/algorithm.md §12."""
    rows = first_table("docs/algorithm.md", "## 12 Datasets")[1:]
    return {re.match(r"`(\w+)`", r[0]).group(1): (r[4], r[5]) for r in rows}


def test_registry_is_the_documented_table():
    """The registry holds the datasets docs/algorithm.md §12 documents, with its constants and ZCA rule."""
    documented = _documented_datasets()
    assert set(DATASETS) == set(documented) and len(DATASETS) == len(REGISTRY)
    for name, (stats_cell, zca_cell) in documented.items():
        entry = REGISTRY[name]
        if entry.stats is None:
            assert stats_cell == "from train", name
        else:
            nums = [float(v) for v in re.findall(r"\d+\.\d+", stats_cell)]
            assert nums == [*entry.stats[0], *entry.stats[1]], name
        want_zca = {"no": False, "when 3 channels": None}.get(zca_cell, True)
        assert entry.zca is want_zca, f"{name}: ZCA {entry.zca} but documented {zca_cell!r}"
    with pytest.raises(DatasetError, match="expected one of " + ", ".join(DATASETS)):
        load_dataset("imagenet")


def test_digits_shapes_split_and_standardisation():
    ds = load_dataset("digits", data_dir="/nonexistent/ignored")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.image_shape == (8, 8, 1) and ds.preprocessor.zca is None
    counts_test = np.bincount(ds.y_test, minlength=10)
    assert counts_test.min() >= 35 and counts_test.max() <= 37  # stratified
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4
    # Pixels are the bundled 0..16 values / 16.
    pix = ds.to_pixels(ds.x_train)
    np.testing.assert_allclose(pix * 16, np.round(pix * 16), atol=1e-4)
    assert pix.min() > -1e-5 and pix.max() < 1 + 1e-5


def test_digits_split_is_pinned():
    """Golden checksum: the split must never change (runs compare across versions)."""
    from sklearn.datasets import load_digits

    from rcig.data.digits import split_indices

    train, test = split_indices(load_digits().target)
    assert len(train) == 1437 and len(np.intersect1d(train, test)) == 0
    digest = hashlib.sha256(test.astype(np.int64).tobytes()).hexdigest()[:16]
    # Update only on a deliberate, announced change of the split (it breaks comparisons).
    assert digest == "029b55daa6f2edd8", f"digits split changed: {digest}"


def test_unknown_dataset_and_missing_data_dir():
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'; expected one of digits"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match="dataset 'cifar10' needs data_dir"):
        load_dataset("cifar10")


# --- MNIST / Fashion-MNIST ------------------------------------------------------------------


@pytest.mark.parametrize("name,gz", [("mnist", True), ("fashion_mnist", False)])
def test_idx_loader_local(tmp_path, name, gz):
    data = write_idx(tmp_path / name, gz=gz)
    ds = load_dataset(name, str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(ds.y_train, data["train-labels-idx1-ubyte"])
    mean, std = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2861,), (0.3530,))}[name]
    np.testing.assert_allclose(
        ds.x_train[..., 0], (data["train-images-idx3-ubyte"] / 255 - mean[0]) / std[0], rtol=1e-5, atol=1e-5)
    assert_pixels(ds, data["train-images-idx3-ubyte"][..., None], data["t10k-images-idx3-ubyte"][..., None])
    assert ds.preprocessor.zca is None
    assert ds.class_names[0] == ("T-shirt/top" if name == "fashion_mnist" else "0")
    assert not (tmp_path / "cache").exists()  # no ZCA for MNIST-likes


def test_idx_missing_corrupt_and_wrong_magic(tmp_path):
    write_idx(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    labels.unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: not found \(expected the official mnist IDX file"):
        load_dataset("mnist", str(tmp_path))
    labels.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt gzip data"):
        load_dataset("mnist", str(tmp_path))
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels.write_bytes(good)
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: magic number 0x00000801, expected IDX images"):
        load_dataset("mnist", str(tmp_path))
    images.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: header says 20x28x28 = 15680 bytes"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.gcs
def test_idx_loader_from_gcs(tmp_path, gcs_bucket):
    write_idx(tmp_path / "local")
    upload_tree(tmp_path / "local", f"{gcs_bucket}/mnist")
    local = load_dataset("mnist", str(tmp_path / "local"))
    remote = load_dataset("mnist", f"{gcs_bucket}/mnist/")
    assert_same_dataset(local, remote)
    with pytest.raises(DatasetError, match=rf"{gcs_bucket}/nothing/train-images-idx3-ubyte\.gz: not found"):
        load_dataset("mnist", f"{gcs_bucket}/nothing")


# --- CIFAR-10 / CIFAR-100 ------------------------------------------------------------------


def _check_cifar(ds, written, dataset):
    x_tr, y_tr, x_te, y_te, names = written
    assert ds.x_train.shape == (len(x_tr), 32, 32, 3) and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.class_names == names and ds.num_classes == (10 if dataset == "cifar10" else 100)
    assert ds.preprocessor.zca is not None
    np.testing.assert_allclose(ds.preprocessor.mean, REGISTRY[dataset].stats[0], rtol=1e-6)
    assert_pixels(ds, x_tr, x_te, atol=1e-4)


@pytest.mark.parametrize("protocol,bytes_keys", [("py2", False), (2, True)], ids=["py2", "py3"])
def test_cifar10_tarball_and_extracted_folder(tmp_path, protocol, bytes_keys):
    members, written = cifar_members("cifar10", protocol=protocol, bytes_keys=bytes_keys)
    tarball = write_cifar_tarball(tmp_path / "tar", "cifar10", members)
    cache = str(tmp_path / "cache")
    from_dir = load_dataset("cifar10", str(tmp_path / "tar"), cache_dir=cache)
    _check_cifar(from_dir, written, "cifar10")
    assert_same_dataset(from_dir, load_dataset("cifar10", str(tarball), cache_dir=cache))
    inner = write_cifar_folder(tmp_path / "ext", "cifar10", members)
    assert_same_dataset(from_dir, load_dataset("cifar10", str(tmp_path / "ext"), cache_dir=cache))
    assert_same_dataset(from_dir, load_dataset("cifar10", str(inner), cache_dir=cache))
    assert len(os.listdir(tmp_path / "cache" / "zca")) == 1  # computed once, reused


def test_cifar10_whitened_training_covariance(tmp_path):
    """Loaded training data: cov = Sigma (Sigma + rI)^-1 with the spec's constants (docs/algorithm.md §1.5, §12)."""
    from tests.test_data_preprocess import _cov, _expected_whitened_cov

    members, (x_tr, *_rest) = cifar_members("cifar10", n_train=24)
    write_cifar_tarball(tmp_path, "cifar10", members)
    ds = load_dataset("cifar10", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])  # §12
    x_std = (x_tr / 255.0 - mean) / std
    cov, expected = _cov(ds.x_train), _expected_whitened_cov(x_std)
    np.testing.assert_allclose(cov, expected, atol=5e-5)
    # sum of lambda / (lambda + r): sensitive to r even when every lambda >> r
    np.testing.assert_allclose(np.trace(cov), np.trace(expected), rtol=2e-5)
    np.testing.assert_allclose(ds.from_pixels(ds.to_pixels(ds.x_test)), ds.x_test, atol=1e-4)


@pytest.mark.gcs
def test_cifar100_tarball_and_folder_from_gcs(tmp_path, gcs_bucket):
    members, written = cifar_members("cifar100", protocol=pickle.HIGHEST_PROTOCOL)
    write_cifar_tarball(tmp_path / "tar", "cifar100", members)
    write_cifar_folder(tmp_path / "ext", "cifar100", members)
    upload_tree(tmp_path / "tar", f"{gcs_bucket}/tar")
    upload_tree(tmp_path / "ext", f"{gcs_bucket}/ext")
    cache = str(tmp_path / "cache")
    local = load_dataset("cifar100", str(tmp_path / "tar"), cache_dir=cache)
    _check_cifar(local, written, "cifar100")
    assert_same_dataset(local, load_dataset("cifar100", f"{gcs_bucket}/tar", cache_dir=cache))
    assert_same_dataset(local, load_dataset("cifar100", f"{gcs_bucket}/ext", cache_dir=cache))


@pytest.mark.gcs
def test_cifar10_tarball_from_gcs(tmp_path, gcs_bucket):
    members, written = cifar_members("cifar10")
    write_cifar_tarball(tmp_path, "cifar10", members)
    upload_tree(tmp_path, f"{gcs_bucket}/c10")
    ds = load_dataset("cifar10", f"{gcs_bucket}/c10/cifar-10-python.tar.gz",
                      cache_dir=str(tmp_path / "cache"))
    _check_cifar(ds, written, "cifar10")


PROBE_MODULE = "rcig_test_import_probe"


class _CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_naming_other_classes_is_refused_without_import(tmp_path, monkeypatch):
    # A module that would leave a trace if it were ever imported.
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    marker = tmp_path / "imported"
    (probe_dir / f"{PROBE_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Boom:\n    pass\n")
    monkeypatch.syspath_prepend(str(probe_dir))
    members, _ = cifar_members("cifar10")
    bad = dict(members)
    bad["data_batch_3"] = (b"\x80\x02c" + PROBE_MODULE.encode() + b"\nBoom\nq\x00)\x81q\x01.")
    write_cifar_tarball(tmp_path / "a", "cifar10", bad)
    with pytest.raises(DatasetError, match=rf"cifar-10-python\.tar\.gz!data_batch_3: pickle refers to {PROBE_MODULE}\.Boom, which is not allowed"):
        load_dataset("cifar10", str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"))
    assert PROBE_MODULE not in sys.modules and not marker.exists()

    # os.system (pickled as posix.system) in an extracted folder's meta file.
    ran = tmp_path / "ran"
    bad = dict(members)
    bad["batches.meta"] = pickle.dumps({"label_names": _CallsSystem(ran)}, protocol=2)
    write_cifar_folder(tmp_path / "b", "cifar10", bad)
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/batches\.meta: pickle refers to (posix|nt|os)\.system"):
        load_dataset("cifar10", str(tmp_path / "b"), cache_dir=str(tmp_path / "cache"))
    assert not ran.exists()


def test_cifar_missing_and_corrupt_files(tmp_path):
    members, _ = cifar_members("cifar10")
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: not found \(expected the official cifar10 python archive"):
        load_dataset("cifar10", str(tmp_path))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage" * 10)
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz: corrupt archive"):
        load_dataset("cifar10", str(tmp_path))
    partial = {k: v for k, v in members.items() if k != "test_batch"}
    write_cifar_tarball(tmp_path / "p", "cifar10", partial)
    with pytest.raises(DatasetError, match=r"cifar-10-python\.tar\.gz!test_batch: member missing"):
        load_dataset("cifar10", str(tmp_path / "p"))
    truncated = dict(members)
    truncated["data_batch_2"] = members["data_batch_2"][:300]
    write_cifar_folder(tmp_path / "t", "cifar10", truncated)
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/data_batch_2: corrupt pickle"):
        load_dataset("cifar10", str(tmp_path / "t"))
    wrong = dict(members)
    wrong["data_batch_1"] = pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
    write_cifar_folder(tmp_path / "w", "cifar10", wrong)
    with pytest.raises(DatasetError, match=r"data_batch_1: 'data' is ndarray \(4, 100\); expected a uint8 array of shape \(N, 3072\)"):
        load_dataset("cifar10", str(tmp_path / "w"))


# --- Tiny-ImageNet --------------------------------------------------------------------------


def _check_tiny(ds, written):
    x_tr, y_tr, x_te, y_te = written
    assert ds.x_train.shape == (12, 64, 64, 3) and ds.x_test.shape == (6, 64, 64, 3)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.num_classes == 3 and ds.class_names[0] == "goldfish, Carassius auratus"
    assert ds.preprocessor.zca is not None
    assert_pixels(ds, x_tr, x_te, atol=2e-4)


def test_tiny_imagenet_local_folder(tmp_path):
    root, written = write_tiny_imagenet(tmp_path / "data")
    cache = str(tmp_path / "cache")
    ds = load_dataset("tiny_imagenet", str(tmp_path / "data"), cache_dir=cache)
    _check_tiny(ds, written)
    assert_same_dataset(ds, load_dataset("tiny_imagenet", str(root), cache_dir=cache))
    (root / "val" / "images" / "val_4.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"val/images/val_4\.JPEG: cannot decode image"):
        load_dataset("tiny_imagenet", str(root), cache_dir=cache)
    (root / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(DatasetError, match=r"val/images/val_4\.JPEG: not found"):
        load_dataset("tiny_imagenet", str(root), cache_dir=cache)


@pytest.mark.gcs
def test_tiny_imagenet_from_gcs(tmp_path, gcs_bucket):
    _, written = write_tiny_imagenet(tmp_path / "data")
    upload_tree(tmp_path / "data", f"{gcs_bucket}/ti")
    ds = load_dataset("tiny_imagenet", f"{gcs_bucket}/ti", cache_dir=str(tmp_path / "cache"))
    _check_tiny(ds, written)
    with pytest.raises(DatasetError, match=rf"{gcs_bucket}/none/tiny-imagenet-200/wnids\.txt: not found"):
        load_dataset("tiny_imagenet", f"{gcs_bucket}/none")


# --- npz ------------------------------------------------------------------------------------


def _npz_arrays(shape, dtype):
    n_tr, n_te = 20, 10
    if dtype == np.uint8:
        x_tr = RNG.integers(0, 256, (n_tr, *shape), dtype=np.uint8)
        x_te = RNG.integers(0, 256, (n_te, *shape), dtype=np.uint8)
    else:
        x_tr = RNG.uniform(size=(n_tr, *shape)).astype(dtype)
        x_te = RNG.uniform(size=(n_te, *shape)).astype(dtype)
    return dict(x_train=x_tr, y_train=RNG.integers(0, 4, n_tr), x_test=x_te,
                y_test=RNG.integers(0, 4, n_te))


def test_npz_uint8_rgb_uses_zca_and_float_grey_does_not(tmp_path):
    rgb = _npz_arrays((6, 6, 3), np.uint8)
    np.savez(tmp_path / "rgb.npz", **rgb)
    ds = load_dataset("npz", str(tmp_path / "rgb.npz"), cache_dir=str(tmp_path / "cache"))
    assert ds.image_shape == (6, 6, 3) and ds.preprocessor.zca is not None
    assert ds.num_classes == int(max(rgb["y_train"].max(), rgb["y_test"].max())) + 1
    assert_pixels(ds, rgb["x_train"], rgb["x_test"], atol=1e-4)

    grey = _npz_arrays((5, 7), np.float64)  # NHW floats in [0, 1]
    (tmp_path / "grey").mkdir()
    np.savez(tmp_path / "grey" / "data.npz", class_names=np.array(list("abcde")), **grey)
    ds = load_dataset("npz", str(tmp_path / "grey"))
    assert ds.image_shape == (5, 7, 1) and ds.preprocessor.zca is None
    assert ds.num_classes == 5 and ds.class_names == list("abcde")
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4
    assert_pixels(ds, grey["x_train"][..., None], grey["x_test"][..., None], atol=1e-5)


def test_npz_bad_inputs(tmp_path):
    arrays = _npz_arrays((4, 4, 3), np.uint8)
    path = tmp_path / "d.npz"
    with pytest.raises(DatasetError, match=r"d\.npz: not found \(expected an \.npz with x_train"):
        load_dataset("npz", str(path))
    np.savez(path, **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(DatasetError, match=r"d\.npz: missing y_test"):
        load_dataset("npz", str(path))
    np.savez(path, **{**arrays, "x_train": arrays["x_train"] * 2.0})
    with pytest.raises(DatasetError, match=r"d\.npz: 'x_train' spans 0\.\.510; expected floats in \[0, 1\]"):
        load_dataset("npz", str(path))
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DatasetError, match=r"d\.npz: corrupt or not an npz"):
        load_dataset("npz", str(path))
    np.savez(path, **{**arrays, "y_train": np.array([object()] * 20)})
    with pytest.raises(DatasetError, match=r"d\.npz: holds object arrays \(pickled data\), which are not loaded"):
        load_dataset("npz", str(path))


@pytest.mark.gcs
def test_npz_from_gcs(tmp_path, gcs_bucket):
    arrays = _npz_arrays((4, 4, 3), np.uint8)
    np.savez(tmp_path / "data.npz", **arrays)
    storage.write_bytes(f"{gcs_bucket}/sets/data.npz", (tmp_path / "data.npz").read_bytes())
    cache = str(tmp_path / "cache")
    assert_same_dataset(load_dataset("npz", str(tmp_path), cache_dir=cache),
                        load_dataset("npz", f"{gcs_bucket}/sets", cache_dir=cache))
