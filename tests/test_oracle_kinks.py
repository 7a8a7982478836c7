"""ReLU's kink in the gradient check (refopt.testing.kinks): an fc1 input within rounding of zero may
fall on either side in a correct port; the oracle reads the side the port took from its own fc1
gradients and compares everything against the float64 gradient of that choice -- and excuses
nothing else."""

import numpy as np

from refopt.config import OPTConfig
from refopt.testing import checks as C
from refopt.testing import reference as R
from refopt.testing.adapter import RefoptAdapter
from refopt.testing.cases import Magnitudes, make_inputs, random_weights
from refopt.testing.modelcase import ModelCase

CFG = OPTConfig(vocabulary_size=30, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=12,
                max_sequence_length=16, dropout=0.0)
UNIT, ROW, POS = 3, 0, 4                        # the fc1 input of layer 0 put at the kink


def _case(offset):
    """A case whose layer-0 fc1 input (ROW, POS, UNIT) is ``offset`` in float64 (the unit's bias
    chosen to cancel the rest)."""
    rng = np.random.default_rng(0)
    params = random_weights(CFG, rng, magnitudes=Magnitudes(0.5))
    ids, right, ids_left, left = make_inputs(CFG, rng, 2, 10)
    acts = R.run_forward(params, CFG, ids, right)
    x = acts["layers.0.mlp_input"][ROW, POS]
    params["layers.0.fc1.bias"][UNIT] = offset - x @ params["layers.0.fc1.weight"][UNIT]
    return ModelCase(f"kink{offset:g}", CFG, params, ids, right, ids_left, left)


class SideTaker(RefoptAdapter):
    """refopt's float32 port taking ``side`` for one ReLU input of layer 0 (a correct port may, when
    that input is within rounding of zero)."""

    def __init__(self, side):
        super().__init__("numpy", "float32")
        self.side = side

    def loss_and_gradients(self, token_ids, padding_mask):
        from refopt.training.gradients import loss_and_gradients

        calls = []

        def relu_backward(d_y, x):
            calls.append(None)
            mask = x > 0
            if len(calls) == self.config.num_layers:           # layer 0 comes last in the backward
                mask[ROW, POS, UNIT] = self.side
            return d_y * mask

        y, sw = R.loss_targets(token_ids, padding_mask, self.config.pad_token_id)
        x = {"token_ids": np.asarray(token_ids, np.int64), "padding_mask": np.asarray(padding_mask, bool)}
        return loss_and_gradients(self.params, self.config, x, y, sw, ops=R.numpy_ops(relu_backward=relu_backward))


def test_either_side_of_an_ambiguous_input_passes_and_is_reported():
    case = _case(1e-12)                                      # within rounding of the kink
    for side in (True, False):
        result = C.check_gradients(SideTaker(side), case)
        assert result.status == C.PASS, (side, result.detail)
        kinks = result.data["kinks"]
        assert kinks["ambiguous"] >= 1 and kinks["flipped"] == (0 if side else 1), kinks
        assert "kink margin" in result.detail


def test_the_side_matters_so_resolving_it_is_needed():
    # the same port judged against float64's side: the unit's row is off by a whole token's share
    from refopt.testing.locator import compare_gradients

    case = _case(1e-12)
    port = SideTaker(False)
    port.load(case.config, case.params)
    _, grads = port.loss_and_gradients(*case.batch())
    _, float64_side = R.run_gradients(case.params, case.config, *case.batch())
    div = compare_gradients(case.config, grads, float64_side, "float32")
    assert div.first is not None and div.first.name.startswith("layers.0."), div.describe()


def test_an_input_far_from_the_kink_is_not_excused():
    # the same flip where the input is 0.3 from the kink: a wrong ReLU derivative, reported
    case = _case(0.3)
    result = C.check_gradients(SideTaker(False), case)
    assert result.status == C.FAIL and result.data["first_divergence"].startswith("layers.0."), result.detail
