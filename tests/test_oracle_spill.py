"""GradientSpill: gradients kept in an unlinked temporary file, read back on lookup."""

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refopt.testing.spill import GradientSpill

_arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16, np.int64]),
                     hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
                     elements={"allow_nan": False, "allow_subnormal": True})


@settings(max_examples=40, deadline=None)
@given(arrays=st.lists(_arrays, max_size=6))
def test_round_trip_bit_for_bit(arrays):
    spill = GradientSpill()
    try:
        for i, a in enumerate(arrays):
            spill.put(f"g{i}", a if i % 2 else np.asarray(a, order="F"))       # any layout in
        assert list(spill) == [f"g{i}" for i in range(len(arrays))] and len(spill) == len(arrays)
        for i, a in enumerate(arrays):
            got = spill[f"g{i}"]
            assert got.dtype == a.dtype and got.shape == a.shape
            assert got.tobytes() == np.ascontiguousarray(a).tobytes()
        assert spill.nbytes == sum(a.nbytes for a in arrays)
    finally:
        spill.close()


def test_each_lookup_is_a_fresh_array_and_the_caller_may_free_its_own():
    spill = GradientSpill()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    spill.put("w", a)
    a[:] = -1                                               # the spill copied it
    first, second = spill["w"], spill["w"]
    assert first is not second and first[2, 3] == 11
    first[0, 0] = 99
    assert spill["w"][0, 0] == 0
    assert "missing" not in spill and spill.get("missing") is None
    spill.close()


def test_the_file_is_unlinked_and_in_the_directory_asked_for(tmp_path):
    spill = GradientSpill(directory=str(tmp_path))
    spill.put("w", np.ones(1000))
    assert os.listdir(tmp_path) == []                       # nothing named: gone with the process
    assert os.fstat(spill._file.fileno()).st_size == 8000
    spill.close()


def test_a_full_disk_is_a_named_error():
    # /dev/full accepts the open and fails every write with ENOSPC, as a full TMPDIR does
    import errno

    import pytest

    from refopt.errors import RefoptOSError

    spill = GradientSpill()
    spill._file.close()
    spill._file = open("/dev/full", "wb")
    with pytest.raises(RefoptOSError, match="gradient spill: could not write w") as e:
        spill.put("w", np.ones(1 << 16))                # larger than the file object's buffer
        spill._file.flush()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(RefoptOSError, match="could not create"):
        GradientSpill(directory="/nonexistent/refopt-spill")


def test_a_buffered_put_that_cannot_reach_the_disk_fails_on_lookup_by_name():
    import pytest

    from refopt.errors import RefoptOSError

    spill = GradientSpill()
    spill._file.close()
    spill._file = open("/dev/full", "w+b")
    spill.put("b", np.ones(4))                          # 32 bytes: still in the buffer
    with pytest.raises(RefoptOSError, match="could not write b"):
        spill["b"]


def test_a_tensor_written_in_row_blocks_reads_back_whole_and_by_rows():
    a = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    spill = GradientSpill()
    try:
        spill.put("before", np.ones(3))
        spill.put_parts("t", np.float32, a.shape, (a[i:i + 3] for i in range(0, 7, 3)))   # one block held at a time
        spill.put("after", np.zeros(2))
        assert spill["t"].tobytes() == a.tobytes() and spill.shape("t") == (7, 5)
        np.testing.assert_array_equal(spill.rows("t", 2, 6), a[2:6])
        assert spill["after"].tolist() == [0, 0] and spill["before"].tolist() == [1, 1, 1]
    finally:
        spill.close()


def test_parts_that_do_not_fill_the_shape_are_refused():
    import pytest

    spill = GradientSpill()
    try:
        with pytest.raises(ValueError, match="hold 40 of its 80 bytes"):
            spill.put_parts("short", np.float32, (4, 5), [np.zeros((2, 5))])
        with pytest.raises(ValueError, match="exceed its shape"):
            spill.put_parts("long", np.float32, (1, 5), [np.zeros((2, 5))])
        assert "short" not in spill and "long" not in spill
    finally:
        spill.close()
