import pytest

from temde_hf.data import text
from temde_hf.data.text import is_visible_text, text_problem
from temde_hf.models.temde import processing_temde
from temde_hf.testing import tiny_processor


@pytest.mark.parametrize("value", ["", "   ", "\t\n", "\u200b", "\u200b \ufeff\u2060", None, 42, ["a"]])
def test_blank_or_non_string_text_is_refused(value):
    assert not is_visible_text(value)
    assert text_problem(value)


@pytest.mark.parametrize("value", ["a dog", " \u200bcat ", "犬"])
def test_visible_text_is_accepted(value):
    assert is_visible_text(value)
    assert text_problem(value) is None


def test_the_reason_names_the_value_the_way_a_json_file_writes_it():
    assert text_problem(None) == "missing (null / None), not a string"
    assert text_problem(["a", "b"]) == "not a string (list ['a', 'b'])"


@pytest.mark.parametrize("text", ["", "  ", "\u200b", ["a dog", "\ufeff"], ["a dog", None]], ids=repr)
def test_the_processor_refuses_text_with_nothing_to_embed(text):
    # tokenised to [CLS] [SEP], a blank text was embedded like a caption (also as Hub remote code)
    with pytest.raises(ValueError, match=r"text\[\d\] = .*not a string with a visible character.*pass words"):
        tiny_processor()(text=text)
    assert tiny_processor()(text=["a dog", " \u200bcat "])["input_ids"].shape[0] == 2


def test_the_text_rule_has_one_definition_in_the_model_folder():
    # Hub remote code (the processor, the Endpoints handler) carries the model folder only
    assert text.text_problem is processing_temde.text_problem
    assert text.is_visible_text is processing_temde.is_visible_text
