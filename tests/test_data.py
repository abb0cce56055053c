import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import formats
import train
from conftest import write_idx, write_mnist
from batches import PAD, channel_stats, random_crop_flip
from data import DataError, ImageSet, epoch_plan, load_raw, prepare, split_train_val


def test_cifar10_loads_from_the_standard_layout(cifar_dir):
    train_x, train_y, test_x, test_y, classes = load_raw("cifar10", cifar_dir)
    assert train_x.shape == (200, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (50, 3, 32, 32) and test_y.dtype == torch.int64
    assert classes[0] == "airplane" and len(classes) == 10
    # the bytes of the first image are exactly the file's (R plane, G plane, B plane)
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)  # our own test file, so the plain unpickler is fine here
    assert torch.equal(train_x[0].flatten(), torch.from_numpy(first["data"][0]))
    assert train_y[:40].tolist() == first["labels"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_payload_in_a_batch_file_is_refused_and_never_runs(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f)
    with pytest.raises(DataError, match="data_batch_3.*refusing to load posix.system"):
        load_raw("cifar10", cifar_dir)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "broken CIFAR-10 batch file"),
    (lambda p: p.unlink(), "missing data_batch_2"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]})),
     "expected uint8 data"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})),
     "labels in 0..9"),
])
def test_broken_cifar_files_get_a_clear_error(cifar_dir, damage, message):
    damage(cifar_dir / "cifar-10-batches-py" / "data_batch_2")
    with pytest.raises(DataError, match=message):
        load_raw("cifar10", cifar_dir)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_plain_or_gzipped(tmp_path, compress):
    write_mnist(tmp_path / "mnist", compress=compress)
    train_x, train_y, test_x, test_y, classes = load_raw("mnist", tmp_path)
    assert train_x.shape == (120, 1, 28, 28) and test_x.shape == (40, 1, 28, 28)
    assert torch.equal(train_x[torch.arange(120), 0, train_y * 2], torch.full((120, 28), 255, dtype=torch.uint8))
    assert classes == [str(i) for i in range(10)]


def test_truncated_idx_file_is_refused(tmp_path):
    folder = write_mnist(tmp_path / "MNIST" / "raw", compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_raw("mnist", tmp_path)
    write_idx(path, np.zeros((3, 4), np.uint8), compress=False)  # 2-d where 3-d belongs
    with pytest.raises(DataError, match="not an IDX file of 3-d"):
        load_raw("mnist", tmp_path)


def billion_laughs(depth: int = 30) -> bytes:
    """A pickle of a few hundred bytes: a list of 2 references to a list of 2 references to ... (2**depth ints
    once expanded: what np.asarray would build)."""
    inner = [0]
    for _ in range(depth):
        inner = [inner, inner]
    return pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": inner})


def test_a_nest_of_shared_label_lists_is_refused_before_it_is_built(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(billion_laughs())
    assert len(billion_laughs()) - len(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]})) < 1000
    with pytest.raises(DataError, match="N labels in 0..9"):
        load_raw("cifar10", cifar_dir)


def test_a_corrupt_or_lying_gzipped_idx_file_is_one_clear_error(tmp_path):
    folder = write_mnist(tmp_path / "MNIST" / "raw", compress=True)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[10] = 0xFF  # the first deflate block header after gzip's 10 bytes: block type 3, which does not exist
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_raw("mnist", tmp_path)
    # a header that declares 65535**3 bytes: refused from the header, before anything is allocated
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 65535, 65535, 65535)))
    with pytest.raises(DataError, match="refusing more than"):
        load_raw("mnist", tmp_path)
    # a header that claims more than the stream holds: read up to what is there, then refused
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1000, 28, 28) + bytes(100)))
    with pytest.raises(DataError, match="truncated or too long"):
        load_raw("mnist", tmp_path)


@pytest.fixture
def corrupt_mirror():
    """A local server that answers every request with bytes that are not the file asked for."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Garbage(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b"not the file")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.parametrize("mirror", ["offline", "corrupt"])
def test_a_failed_fashion_mnist_download_leaves_nothing_it_created(tmp_path, monkeypatch, corrupt_mirror, mirror):
    """Offline (the discard port: nothing answers), torchvision leaves an empty FashionMNIST/raw/; from a mirror
    that serves a corrupt file, that file too. Both are removed; what was there before stays."""
    import torchvision
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors",
                        ["http://127.0.0.1:9/" if mirror == "offline" else corrupt_mirror])
    monkeypatch.setattr(formats, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")  # (else found there)
    root = tmp_path / "data"
    if mirror == "corrupt":  # a folder of the user's, where the download goes
        (root / "FashionMNIST" / "raw").mkdir(parents=True)
        (root / "FashionMNIST" / "raw" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"^fashion-mnist not found in .* and the download failed \(RuntimeError\); "
                                        r"put the IDX files in .*FashionMNIST/raw or apt-get install"):
        load_raw("fashion-mnist", root)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ([] if mirror == "offline" else ["data", "data/FashionMNIST", "data/FashionMNIST/raw",
                                                    "data/FashionMNIST/raw/notes.txt"])


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_raw("imagenet", ".")


def test_channel_stats_are_the_real_per_channel_mean_and_std():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    for c in range(3):
        assert mean[c] == pytest.approx(x[:, c].mean().item(), abs=1e-12)
        assert std[c] == pytest.approx(x[:, c].std().item(), abs=1e-12)


def test_channel_stats_are_exact_across_chunks():
    """More images than one chunk of channel_stats (4096), values where float sums would round: the results are
    the correctly rounded exact ones, computed here with fractions."""
    from fractions import Fraction
    images = torch.full((5000, 1, 2, 2), 255, dtype=torch.uint8)
    images[::3] = 1
    mean, std = channel_stats(images)
    values = [Fraction(int(v), 255) for v in images.flatten()]
    n = len(values)
    exact_mean = sum(values) / n
    exact_var = sum((v - exact_mean) ** 2 for v in values) / (n - 1)
    assert mean == [float(exact_mean)]
    assert std[0] == pytest.approx(float(exact_var) ** 0.5, rel=1e-15)


def test_a_channel_the_same_in_every_image_normalizes_to_zero_not_nan():
    """Red and blue images only: green is 0 everywhere, its std 0; it is normalized by one pixel level instead, so
    that training starts from finite inputs (0 / 0 made every loss NaN)."""
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    images[:3, 0], images[3:, 2] = 200, 180
    mean, std = channel_stats(images)
    assert mean[1] == 0.0 and std[1] == 1 / 255 and std[0] > 0.3
    x = (images.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.isfinite(x).all() and (x[:, 1] == 0).all()


def test_validation_split_is_seeded_and_disjoint():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100) % 5
    (tx, ty), (vx, vy) = split_train_val(images, labels, 0.2, seed=3)
    (tx2, ty2), (vx2, vy2) = split_train_val(images, labels, 0.2, seed=3)
    assert len(vy) == 20 and len(ty) == 80 and torch.equal(vy, vy2)
    assert sorted(tx.view(-1).tolist() + vx.view(-1).tolist()) == list(range(100))
    assert torch.bincount(vy).tolist() == [4] * 5  # each class's share
    assert not torch.equal(split_train_val(images, labels, 0.2, seed=4)[1][1], vy)


def test_epoch_plan_depends_on_seed_and_epoch_only():
    plan = epoch_plan(1000, seed=1, epoch=2)
    assert torch.equal(plan, epoch_plan(1000, seed=1, epoch=2))
    assert not torch.equal(plan, epoch_plan(1000, seed=1, epoch=3))
    assert sorted(plan[:, 0].tolist()) == list(range(1000))  # each sample exactly once
    assert plan[:, 1:3].min() == 0 and plan[:, 1:3].max() == 2 * PAD
    assert set(plan[:, 3].tolist()) == {0, 1}


def test_alternate_flips_show_each_image_mirrored_in_every_other_epoch():
    plans = [epoch_plan(1000, seed=3, epoch=e, alternate_flips=True) for e in (1, 2, 3)]
    flips = [p[p[:, 0].argsort(), 3] for p in plans]  # per image, in image order
    assert 400 < flips[0].sum() < 600  # epoch 1: a random half
    assert torch.equal(flips[1], 1 - flips[0]) and torch.equal(flips[2], flips[0])
    assert torch.equal(plans[1], epoch_plan(1000, seed=3, epoch=2, alternate_flips=True))
    other_seed = epoch_plan(1000, seed=4, epoch=1, alternate_flips=True)
    assert not torch.equal(other_seed[other_seed[:, 0].argsort(), 3], flips[0])
    assert torch.equal(plans[0][:, :3], epoch_plan(1000, seed=3, epoch=1)[:, :3])  # order and crops unchanged


def test_crop_offsets_follow_the_padding():
    plan = epoch_plan(1000, seed=1, epoch=1, pad=2)
    assert plan[:, 1:3].min() == 0 and plan[:, 1:3].max() == 4
    x = torch.randint(0, 256, (1000, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, plan[:, 1:], pad=2)
    assert out.shape == x.shape
    unmoved = (plan[:, 1] == 2) & (plan[:, 2] == 2) & (plan[:, 3] == 0)
    assert torch.equal(out[unmoved], x[unmoved])


def test_random_crop_flip_matches_a_per_image_reference():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    plan = epoch_plan(50, seed=0, epoch=1)[:, 1:]
    out = random_crop_flip(x, plan)
    for i, (dy, dx, flip) in enumerate(plan.tolist()):
        ref = F.pad(x[i].float(), (PAD,) * 4, mode="reflect").byte()[:, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], ref.flip(2) if flip else ref)


def test_imageset_batch_normalizes_with_the_given_stats():
    images = torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8)  # (2, 1, 1, 2)
    data = ImageSet(images, torch.tensor([3, 4]), torch.tensor([0.2]), torch.tensor([0.5]))
    x, y = data.batch(torch.tensor([1, 0]))
    assert y.tolist() == [4, 3]
    assert torch.allclose(x, torch.tensor([[[[0.0, 0.4]]], [[[-0.4, 1.6]]]]))


def test_prepare_holds_out_validation_and_computes_stats_on_training_part(cifar_dir):
    train, val, test, classes = prepare("cifar10", cifar_dir, 0.1, seed=0, device="cpu")
    assert (len(train), len(val), len(test)) == (180, 20, 50)
    mean, std = channel_stats(train.images)
    assert train.mean.tolist() == pytest.approx(mean) and test.std.tolist() == pytest.approx(std)
    assert prepare("cifar10", cifar_dir, 0.0, seed=0, device="cpu")[1] is None


def test_a_validation_split_that_leaves_no_training_image_is_refused(cifar_dir):
    with pytest.raises(DataError, match="--val-split 0.999 of the 200 training images leaves 0 to train on; it "
                                        "needs at least 2: give a smaller --val-split"):
        prepare("cifar10", cifar_dir, 0.999, seed=0, device="cpu")


def test_an_epoch_leaves_out_a_last_step_that_would_give_batchnorm_a_single_image():
    from data import images_per_epoch
    assert images_per_epoch(81, 16, 16, 1) == 80      # resnet18 on 81 images, --batch-size 16
    assert images_per_epoch(82, 16, 16, 1) == 82      # a last batch of 2 is fine
    assert images_per_epoch(80, 16, 16, 1) == 80      # no remainder
    assert images_per_epoch(66, 32, 8, 1) == 66       # a last step of 2 images: one micro-batch of 2
    assert images_per_epoch(65, 32, 8, 1) == 64       # one image left: dropped
    assert images_per_epoch(34, 32, 32, 2) == 32      # torchrun x 2 splitting a last step of 2: one image each
    assert images_per_epoch(36, 32, 32, 2) == 36      # two each


def test_a_batchnorm_model_trains_on_a_last_batch_of_one_image(tmp_path, cifar_dir):
    import train
    out = tmp_path / "run"
    results = train.main(["--data-dir", str(cifar_dir), "--device", "cpu", "--model", "resnet9", "--widths", "8,8,8,8",
                          "--val-split", "0", "--batch-size", "199", "--epochs", "1", "--out-dir", str(out)])
    assert results["epochs_completed"] == 1  # 200 images: the 200th (a batch of 1) is left out of the epoch


def test_color_jitter_is_planned_per_image_and_epoch_and_leaves_the_rest_of_the_plan_alone():
    from batches import JITTER_UNIT, color_jitter
    plain, jittered = epoch_plan(500, seed=1, epoch=2), epoch_plan(500, seed=1, epoch=2, jitter=0.2)
    assert jittered.shape == (500, 6) and torch.equal(jittered[:, :4], plain)  # order, crops and flips unchanged
    assert torch.equal(jittered, epoch_plan(500, seed=1, epoch=2, jitter=0.2))  # from (seed, epoch) alone: resumable
    assert not torch.equal(jittered[:, 4:], epoch_plan(500, seed=1, epoch=3, jitter=0.2)[:, 4:])
    factors = jittered[:, 4:].double() / JITTER_UNIT
    assert 0.8 <= factors.min() < 0.82 and 1.18 < factors.max() <= 1.2  # brightness and contrast in [0.8, 1.2]
    # one image with two pixel values: brightness x1.5, then contrast x0.5 around the image's mean
    x = torch.tensor([[[[40, 80]]]], dtype=torch.uint8)  # (1, 1, 1, 2)
    out = color_jitter(x, torch.tensor([[int(1.5 * JITTER_UNIT), int(0.5 * JITTER_UNIT)]]))
    assert out.tolist() == [[[[75.0, 105.0]]]]  # 60, 120 -> mean 90 -> 90 -/+ 15
    bright = color_jitter(torch.tensor([[[[200]]]], dtype=torch.uint8), torch.tensor([[2 * JITTER_UNIT, JITTER_UNIT]]))
    assert bright.item() == 255.0  # clipped


def test_a_validation_split_too_small_to_pick_the_best_epoch_warns_in_one_line(cifar_dir, tmp_path, capsys):
    prepare("cifar10", cifar_dir, 0.1, seed=0, device="cpu")  # 20 of 200 images for 10 classes: 1 to 3 each
    assert capsys.readouterr().err == (
        "warning: --val-split 0.1 holds out 20 images for 10 classes, 1 of class cat: too few to pick the best epoch "
        "by; give a larger --val-split, or --val-split 0 with a fixed --epochs\n")
    for enough in (0.9, 0):  # 10 or more images of each class (cat has 12 in all); no validation
        prepare("cifar10", cifar_dir, enough, seed=0, device="cpu")
        assert capsys.readouterr().err == ""
    from image_files import make_image_folder
    root = make_image_folder(tmp_path / "images")
    prepare("imagefolder", root, 0.2, seed=0, device="cpu", image_size=8)
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: --val-split")]
    assert warning == ("warning: --val-split 0.2 holds out 2 images for 2 classes, 1 of class blue: too few to pick "
                       "the best epoch by; give a val/ folder next to train/, a larger --val-split, or --val-split 0 "
                       "with a fixed --epochs")


def test_the_validation_split_is_stratified_and_a_rare_class_is_met_at_the_door(tmp_path, capsys):
    """Each class gives its share to validation (a rare class at least one image), on both data paths, and a run
    whose largest class has 5x the images of its smallest says so once, with the flags that help."""
    labels = torch.tensor([0] * 100 + [1] * 10 + [2] * 2 + [3])[torch.randperm(113)]
    kept, held = data.split_indices(labels, 0.1, seed=0)
    assert torch.bincount(labels[held], minlength=4).tolist() == [10, 1, 1, 0]  # 10% of 100 and of 10; 1 of 2
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(113))
    assert torch.equal(data.split_indices(labels, 0.1, seed=0)[1], held)  # (seeded)

    from test_stream import write_photos
    photos = write_photos(tmp_path / "photos", {"train": 68, "test": 1}, sizes=(20, 30))
    for p in sorted((photos / "train" / "green").iterdir())[2:]:  # green: 2 training images, the others 68
        p.unlink()
    flags = ["--dataset", "imagefolder", "--data-dir", str(photos), "--image-size", "16", "--val-split", "0.25",
             "--epochs", "8", "--batch-size", "64", "--device", "cpu", "--log-interval", "0"]
    for extra in ([], ["--workers", "1"]):  # in memory, streamed
        train.main([*flags, *extra, "--out-dir", str(tmp_path / f"run{len(extra)}")])
        out = capsys.readouterr()
        assert "imagefolder: 103 train, 35 val, 3 test images" in out.out  # 17 + 1 + 17: each class's share
        assert [line for line in out.err.splitlines() if line.startswith("note:")] == [
            "note: class green has 1 training image, blue 51: for rare classes, weigh the loss by class for the last "
            "quarter of the run: --class-weights balanced --class-weights-from-epoch 7 (README: FAQ)"]
    train.main([*flags, "--class-weights", "balanced", "--out-dir", str(tmp_path / "weighed")])
    assert "note:" not in capsys.readouterr().err
