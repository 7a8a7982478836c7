"""A memory-mapped checkpoint's pages dropped from the resident set between the port's passes
(refopt.testing.residency): dropped pages come back unchanged, a mapping something wrote to is
left alone, and the transformers port computes the same bits with its pages dropped as it goes."""

import sys

import numpy as np
import pytest

from refopt.testing import residency

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def _mapped(tmp_path, mode):
    values = np.random.default_rng(0).standard_normal(1 << 19)              # 4 MiB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    return values, np.memmap(path, np.float64, mode, shape=values.shape), residency.mapped_files(tmp_path)


def _resident(paths):
    return sum(rss for _, _, rss, _ in residency.file_mappings(paths))


@pytest.mark.parametrize("mode", ["r", "c"])          # shared read-only, private copy-on-write
def test_dropped_pages_come_back_unchanged(tmp_path, mode):
    values, mapped, paths = _mapped(tmp_path, mode)
    assert float(mapped.sum()) == float(values.sum())
    assert _resident(paths) >= values.nbytes // 2
    pages = residency.Pages(paths)
    assert pages.release() == 1
    assert _resident(paths) == 0
    np.testing.assert_array_equal(mapped, values)                            # mapped again, the same
    assert _resident(paths) >= values.nbytes // 2


def test_a_mapping_written_to_is_left_alone(tmp_path):
    # a private mapping's written pages are copies the file does not have: dropping them would
    # bring back the file's values, so the mapping is not dropped at all
    values, mapped, paths = _mapped(tmp_path, "c")
    mapped[12345] = 7.0
    pages = residency.Pages(paths)
    assert pages.release() == 0
    assert mapped[12345] == 7.0 and float(mapped[:1000].sum()) == float(values[:1000].sum())
    assert _resident(paths) > 0


def test_other_files_and_no_files():
    assert residency.Pages([]).release() == 0
    assert residency.mapped_files("/nonexistent/folder") == frozenset()


def test_the_port_computes_the_same_bits_with_its_pages_dropped(tmp_path):
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[peers]')")
    pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[peers]')")
    from refopt.config import OPTConfig
    from refopt.testing.adapters.transformers import TransformersAdapter
    from refopt.testing.cases import make_inputs
    from refopt.testing.streaming import write_random_checkpoint

    cfg = OPTConfig(vocabulary_size=512, num_layers=3, num_heads=4, hidden_dim=64, intermediate_dim=128,
                    max_sequence_length=32, dropout=0.0)
    ids, mask, _, _ = make_inputs(cfg, np.random.default_rng(0), 2, 9)
    dropping = TransformersAdapter(spill_gradients=True, drop_pages=True)
    keeping = TransformersAdapter(spill_gradients=True, drop_pages=False)
    small = TransformersAdapter()                       # the default: only for a model of more than 64 MiB
    for name, a in (("dropping", dropping), ("keeping", keeping), ("small", small)):
        write_random_checkpoint(tmp_path / name, cfg, "float32", seed=1)    # the same weights, own files
        a.load_preset(tmp_path / name)
    assert keeping._pages is None and small._pages is None
    paths = dropping._pages.paths
    assert paths and _resident(paths) == 0                                  # dropped after loading

    calls = []
    drop = dropping._pages.drop
    dropping._pages.drop = lambda: calls.append(1) or drop()
    np.testing.assert_array_equal(dropping.logits(ids, mask), keeping.logits(ids, mask))
    assert len(calls) >= cfg.num_layers and _resident(paths) == 0          # each layer's, then all
    loss_d, grads_d = dropping.loss_and_gradients(ids, mask)
    loss_k, grads_k = keeping.loss_and_gradients(ids, mask)
    assert loss_d == loss_k and sorted(grads_d) == sorted(grads_k)
    for name in grads_d:
        np.testing.assert_array_equal(np.asarray(grads_d[name]), np.asarray(grads_k[name]), err_msg=name)
    assert dropping.greedy([2, 7, 9], 4) == keeping.greedy([2, 7, 9], 4)
    assert _resident(paths) == 0
