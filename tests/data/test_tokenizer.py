import pytest
from transformers import AutoTokenizer

from jaxalign.data.tokenizer import DEFAULT_CHARS, SPECIAL_TOKENS, build_char_tokenizer

# Hand-computed ids: specials 0..6, then DEFAULT_CHARS in order ("0" is 7, "+" is 17, "=" is 20).
ID = {c: 7 + i for i, c in enumerate(DEFAULT_CHARS)}
PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT = range(7)


def test_vocab_layout(tok):
    assert len(tok) == 7 + len(DEFAULT_CHARS) == 54
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert ID["0"] == 7 and ID["9"] == 16 and ID["+"] == 17 and ID["-"] == 18 and ID["="] == 20
    assert ID[" "] == 21 and ID["a"] == 22 and ID["\n"] == 53


def test_plain_text_ids(tok):
    assert tok("12+3=")["input_ids"] == [BOS, 8, 9, 17, 10, 20]
    assert tok("12+3=", add_special_tokens=False)["input_ids"] == [8, 9, 17, 10, 20]
    # special tokens inside text are matched whole; unknown characters map to <unk>
    assert tok("7<eos>", add_special_tokens=False)["input_ids"] == [14, EOS]
    assert tok("Q", add_special_tokens=False)["input_ids"] == [UNK]
    assert tok("a b\n", add_special_tokens=False)["input_ids"] == [22, 21, 23, 53]


def test_decode(tok):
    ids = [BOS, USER, 8, 17, 9, 20, ASSISTANT, 10, EOS, PAD]
    assert tok.decode(ids) == "<bos><|user|>1+2=<|assistant|>3<eos><pad>"
    assert tok.decode(ids, skip_special_tokens=True) == "1+2=3"


def test_chat_template(tok):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(conv, tokenize=False) == \
        "<bos><|system|>be brief<|user|>2+2=<|assistant|>4<eos>"
    assert tok.apply_chat_template(conv[1:2], tokenize=False, add_generation_prompt=True) == \
        "<bos><|user|>2+2=<|assistant|>"
    ids = tok.apply_chat_template(conv[1:], tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == [BOS, USER, 9, 17, 9, 20, ASSISTANT, 11, EOS]


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("12+3=")["input_ids"] == tok("12+3=")["input_ids"]
    assert again.chat_template == tok.chat_template
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_custom_chars_and_error():
    small = build_char_tokenizer(chars="01+=")
    assert len(small) == 11
    assert small("10+1=", add_special_tokens=False)["input_ids"] == [8, 7, 9, 8, 10]
    with pytest.raises(ValueError, match="distinct"):
        build_char_tokenizer(chars="00")
