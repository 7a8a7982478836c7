"""KerasHub's ``opt_causal_lm_test.py``, ported: the same vocabulary, model config, prompts and
expectations, with KerasHub's ``run_task_test`` written out (a ``tf.data`` dataset batched by 2
becomes ``batch_size=2``; its ``map(preprocessor)`` the preprocessed arrays)."""

from unittest.mock import patch

import numpy as np
import pytest

from kh_support import opt_test_vocab, presets_or_skip, run_serialization_test
from refopt.models import OPTBackbone, OPTCausalLM, OPTCausalLMPreprocessor, OPTTokenizer

VOCAB, MERGES = opt_test_vocab(sort_specials=True)
TRAIN_DATA = ([" airplane at airport", " airplane at airport"],)


@pytest.fixture
def init_kwargs():
    preprocessor = OPTCausalLMPreprocessor(OPTTokenizer(vocabulary=VOCAB, merges=MERGES),
                                           sequence_length=8)
    backbone = OPTBackbone(vocabulary_size=preprocessor.tokenizer.vocabulary_size(), num_layers=2,
                           num_heads=2, hidden_dim=4, intermediate_dim=8,
                           max_sequence_length=preprocessor.sequence_length)
    return {"preprocessor": preprocessor, "backbone": backbone}


def test_causal_lm_basics(init_kwargs):
    task = OPTCausalLM(**init_kwargs)
    run_serialization_test(task)
    preprocessor = task.preprocessor
    vocabulary_size = preprocessor.tokenizer.vocabulary_size()
    x = TRAIN_DATA[0]
    # the preprocessor's output is what the model takes
    assert set(preprocessor(*TRAIN_DATA)[0]) == {"token_ids", "padding_mask"}
    # predict, on strings, batch by batch, and with preprocessing split off
    output = task.predict(x)
    assert output.shape == (2, 8, vocabulary_size)
    np.testing.assert_allclose(task.predict(x, batch_size=1), output, rtol=1e-6, atol=1e-6)
    task.preprocessor = None
    np.testing.assert_allclose(task.predict(preprocessor(x)[0]), output, rtol=1e-6, atol=1e-6)
    task.preprocessor = preprocessor
    # fit, on strings, batch by batch, and with preprocessing split off
    task.fit(x, None, sample_weight=None, verbose=0)
    task.fit(x, batch_size=2, verbose=0)
    task.preprocessor = None
    task.fit(*preprocessor(x), batch_size=2, verbose=0)
    task.preprocessor = preprocessor
    # without the default compilation, fit must ask for compile()
    task = OPTCausalLM(**init_kwargs, compile=False)
    with pytest.raises(ValueError, match="You must call `compile"):
        task.fit(x, batch_size=2, verbose=0)


def test_generate(init_kwargs):
    causal_lm = OPTCausalLM(**init_kwargs)
    # String input.
    prompt = " airplane at airport"
    output = causal_lm.generate(" airplane at airport")
    assert prompt in output
    # Int tensor input.
    prompt_ids = init_kwargs["preprocessor"].generate_preprocess([prompt])
    causal_lm.preprocessor = None
    outputs = causal_lm.generate(prompt_ids, stop_token_ids=None)
    # Assert prompt is in output in token id space.
    np.testing.assert_array_equal(outputs["token_ids"][:, :5], prompt_ids["token_ids"][:, :5])
    np.testing.assert_array_equal(outputs["padding_mask"][:, :5], prompt_ids["padding_mask"][:, :5])


def test_early_stopping(init_kwargs):
    causal_lm = OPTCausalLM(**init_kwargs)
    call_with_cache = causal_lm.call_with_cache

    def wrapper(*args, **kwargs):
        """Modify output logits to always favor end_token_id"""
        logits, hidden_states, cache = call_with_cache(*args, **kwargs)
        index = init_kwargs["preprocessor"].tokenizer.end_token_id
        logits = logits.copy()
        logits[:, :, index] = 1.0e9
        return logits, hidden_states, cache

    with patch.object(causal_lm, "call_with_cache", wraps=wrapper):
        prompt = [" airplane at airport", " airplane"]
        output = causal_lm.generate(prompt)
        # We should immediately abort and output the prompt.
        assert prompt == output


def test_generate_compilation(init_kwargs):
    causal_lm = OPTCausalLM(**init_kwargs)
    # Assert we do not recompile with successive calls.
    causal_lm.generate(" airplane at airport")
    first_fn = causal_lm.generate_function
    causal_lm.generate(" airplane at airport")
    second_fn = causal_lm.generate_function
    assert first_fn == second_fn
    # Assert we do recompile after compile is called.
    causal_lm.compile(sampler="greedy")
    assert causal_lm.generate_function is None


def test_saved_model(init_kwargs, tmp_path):
    # KerasHub saves a .keras file and reloads it; refopt's saved form is the preset
    model = OPTCausalLM(**init_kwargs)
    input_data = init_kwargs["preprocessor"](*TRAIN_DATA)[0]
    model_output = model.predict(input_data)
    model.save_to_preset(tmp_path / "model")
    restored = OPTCausalLM.from_preset(tmp_path / "model")
    assert isinstance(restored, OPTCausalLM)
    restored.preprocessor = None
    np.testing.assert_allclose(restored.predict(input_data), model_output, atol=1e-6, rtol=1e-6)


def test_litert_export():
    pytest.skip("documented difference: KerasHub exports a compiled LiteRT (TFLite) graph; "
                "refopt's model is plain NumPy arrays and functions, with no graph to export")


def test_all_presets():
    for preset in presets_or_skip(OPTCausalLM):
        model = OPTCausalLM.from_preset(preset)
        model.predict(model.preprocessor(*TRAIN_DATA)[0])
