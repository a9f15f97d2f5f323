"""A SlotSource over files ships paths, and DALI's C++ reader loads the bytes: same composites
as shipping the bytes, image sizes from the header alone, unreadable files named."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
from PIL import Image  # noqa: E402

from mixpipe.bench.speedup.dali_arm import FirstImages  # noqa: E402
from mixpipe.core.plan import Layout, MixPlan  # noqa: E402
from mixpipe.dali import (InMemoryImages, ListedFiles, PlanBoard, RandomView,  # noqa: E402
                          SlotSource, epoch_walk, output_names)
from mixpipe.dali.source import file_image_size  # noqa: E402

from test_dali import jpeg, run_raw, smooth_image  # noqa: E402

SIZES = [(40, 48), (37, 53), (50, 30), (64, 64), (33, 47), (45, 45), (30, 60), (52, 36), (36, 44)]
SLOTS = [([0], [1.0], Layout.SINGLE), ([1, 2], [0.25, 0.75], Layout.HALVES),
         ([3, 4], [0.4, 0.6], Layout.BLEND), ([5, 6, 7, 8], [0.25] * 4, Layout.QUADS)]


def write_tree(root, encoded):
    names = []
    for i, data in enumerate(encoded):
        names.append(f"img{i}.jpg")
        with open(os.path.join(root, names[-1]), "wb") as handle:
            handle.write(data)
    return names


def test_paths_and_bytes_give_the_same_composites(tmp_path):
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    labels = [i % 3 for i in range(len(SIZES))]
    files = ListedFiles(str(tmp_path), write_tree(str(tmp_path), encoded), labels)
    plan = MixPlan.from_slots(SLOTS, len(SIZES))
    walk = epoch_walk(plan, batch_size=2, shuffle=False)
    runs = {}
    for name, images in [("paths", files), ("bytes", InMemoryImages(encoded, labels))]:
        source = SlotSource(images, PlanBoard.temporary(), (48, 64), stride=8,
                            view=RandomView(), seed=4)
        assert source.reads_paths == (name == "paths")
        runs[name] = run_raw(source, walk, 2)
    assert len(runs["paths"]) == len(SLOTS)
    for a, b in zip(runs["paths"], runs["bytes"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_only_sources_with_real_paths_ship_paths(tmp_path):
    encoded = [jpeg(smooth_image(20, 20, i)) for i in range(3)]
    files = ListedFiles(str(tmp_path), write_tree(str(tmp_path), encoded), [0, 1, 2])
    memory = InMemoryImages(encoded, [0, 1, 2])
    board = PlanBoard.temporary()
    assert SlotSource(FirstImages(files, 2), board, (16, 16)).reads_paths
    # a subset view forwards path() to a base without one: bytes, not a crash
    assert not SlotSource(FirstImages(memory, 2), board, (16, 16)).reads_paths
    assert not SlotSource(memory, board, (16, 16)).reads_paths


def test_a_header_behind_a_large_segment_is_still_found(tmp_path):
    image = smooth_image(41, 67, 2)
    plain = jpeg(image)
    # a 60 kB application segment before the frame header (as large EXIF/ICC blocks are)
    segment = b"\xff\xe9" + (60002).to_bytes(2, "big") + bytes(60000)
    padded = plain[:2] + segment + plain[2:]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(padded))), np.asarray(
        Image.open(io.BytesIO(plain))))
    path = tmp_path / "padded.jpg"
    path.write_bytes(padded)
    assert file_image_size(str(path)) == (41, 67)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    assert file_image_size(str(png)) == (41, 67)


def test_a_missing_file_is_named(tmp_path):
    encoded = [jpeg(smooth_image(20, 20, i)) for i in range(2)]
    files = ListedFiles(str(tmp_path), write_tree(str(tmp_path), encoded), [0, 1])
    os.remove(tmp_path / "img1.jpg")
    source = SlotSource(files, PlanBoard.temporary(), (16, 16))
    with pytest.raises(ValueError, match=r"img1\.jpg: cannot be read \(FileNotFoundError\)"):
        source.slot(MixPlan.singles(2), 1)


def test_sizes_read_ahead_travel_to_workers_and_change_nothing(tmp_path):
    import pickle

    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    files = ListedFiles(str(tmp_path), write_tree(str(tmp_path), encoded), [0] * len(SIZES))
    plan = MixPlan.from_slots(SLOTS, len(SIZES))
    lazy = SlotSource(files, PlanBoard.temporary(), (48, 64), stride=8, seed=2)
    ahead = SlotSource(files, PlanBoard.temporary(), (48, 64), stride=8, seed=2)
    ahead.read_sizes()
    assert ahead._sizes == {i: size for i, size in enumerate(SIZES)}
    copy = pickle.loads(pickle.dumps(ahead))  # what a worker process receives
    assert copy._sizes == ahead._sizes and copy._walk_cache == {}
    for row in range(plan.num_slots):
        assert str(lazy.slot(plan, row)) == str(copy.slot(plan, row))


def test_a_stream_no_slot_of_the_batch_uses_goes_dense_and_empty():
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    source = SlotSource(InMemoryImages(encoded, [0] * len(SIZES)), PlanBoard.temporary(),
                        (48, 64), stride=8)
    plan = MixPlan.from_slots(SLOTS, len(SIZES))
    # a SINGLE and a HALVES slot: streams 2 and 3 unused
    out = dict(zip(output_names(4), source.batch(plan, 0, 2)))
    assert isinstance(out["file0"], list) and isinstance(out["file1"], list)
    assert out["file1"][0].size == 0 and out["file1"][1].tobytes() == encoded[2]
    for i in (2, 3):
        assert isinstance(out[f"file{i}"], np.ndarray) and out[f"file{i}"].shape == (2, 0)


def test_paths_go_as_one_nul_padded_array_per_stream(tmp_path):
    encoded = [jpeg(smooth_image(h, w, i)) for i, (h, w) in enumerate(SIZES)]
    names = write_tree(str(tmp_path), encoded)
    names[2] = os.path.join("deeper", "a-much-longer-name-than-the-others.jpg")
    os.makedirs(tmp_path / "deeper")
    (tmp_path / names[2]).write_bytes(encoded[2])
    source = SlotSource(ListedFiles(str(tmp_path), names, [0] * len(SIZES)),
                        PlanBoard.temporary(), (48, 64), stride=8)
    out = dict(zip(output_names(4), source.batch(MixPlan.from_slots(SLOTS, len(SIZES)), 0, 2)))
    first, second = out["file0"], out["file1"]
    assert first.dtype == np.uint8 and first.shape[0] == 2 and second.shape[0] == 2
    as_text = lambda row: row.tobytes().rstrip(b"\0").decode()  # noqa: E731
    assert [as_text(r) for r in first] == [os.path.join(str(tmp_path), names[i]) for i in (0, 1)]
    assert as_text(second[0]) == "" and not second[0].any()  # slot 0 has one constituent
    assert as_text(second[1]) == os.path.join(str(tmp_path), names[2])
    assert second.shape[1] == len(os.path.join(str(tmp_path), names[2])) + 1
    assert out["file2"].shape == (2, 0) and out["file3"].shape == (2, 0)
