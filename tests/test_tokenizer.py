import pytest
import torch

from clip.tokenizer import CONTEXT_LENGTH, BPETokenizer, train_tokenizer

CAPTIONS = [
    "A cheerful green Bulbasaur ready for its next adventure.",
    "A red and yellow fire creature with a flaming tail.",
    "A blue turtle with a brown shell and a curly tail.",
    "一只开朗的绿色妙蛙种子，准备好开启下一段冒险。",
    "一只红黄相间的火焰生物，尾巴上燃着火焰。",
    "一只蓝色的乌龟，有着棕色的壳和卷曲的尾巴。",
]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return train_tokenizer(CAPTIONS, vocab_size=400)


def test_special_ids_are_distinct_and_fixed_length(tokenizer):
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}) == 3
    assert tokenizer.context_length == CONTEXT_LENGTH == 77
    assert 259 <= tokenizer.vocab_size <= 400


@pytest.mark.parametrize("text", [
    "A blue turtle with a brown shell.",
    "一只蓝色的乌龟，有着棕色的壳。",
    "Unseen words: Zygarde & Ω, mixed 中文 and English!",
])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode([text])[0]
    assert tokenizer.decode(ids) == text


def test_padding_layout(tokenizer):
    ids = tokenizer.encode(["a red tail", "A blue turtle with a brown shell and a curly tail."])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    for row in ids:
        eos_at = (row == tokenizer.eos_id).nonzero().flatten()
        assert row[0] == tokenizer.bos_id and len(eos_at) == 1
        assert (row[eos_at.item() + 1:] == tokenizer.pad_id).all()
        assert not (row[1:eos_at.item()] == tokenizer.pad_id).any()
    assert (ids[0] == tokenizer.eos_id).nonzero().item() < (ids[1] == tokenizer.eos_id).nonzero().item()


def test_empty_prompt(tokenizer):
    ids = tokenizer.encode([""])[0]
    assert ids[0] == tokenizer.bos_id and ids[1] == tokenizer.eos_id
    assert (ids[2:] == tokenizer.pad_id).all()
    assert tokenizer.decode(ids) == ""


def test_truncation_keeps_bos_and_eos(tokenizer):
    long_en = " ".join(["a red and yellow fire creature"] * 40)
    long_zh = "一只红黄相间的火焰生物" * 40
    ids = tokenizer.encode([long_en, long_zh])
    assert ids.shape == (2, 77)
    assert (ids[:, 0] == tokenizer.bos_id).all() and (ids[:, -1] == tokenizer.eos_id).all()
    assert not (ids == tokenizer.pad_id).any()
    assert long_en.startswith(tokenizer.decode(ids[0])[:50])
    assert tokenizer.dropped_tokens(long_en) > 0 and not tokenizer.fits(long_en) and not tokenizer.fits(long_zh)
    assert tokenizer.dropped_tokens("a red fire creature") == 0 and tokenizer.fits("a red fire creature")


def test_special_token_text_cannot_end_a_prompt_early(tokenizer):
    ids = tokenizer.encode(["red <|endoftext|> tail <|pad|>"])[0]
    assert (ids == tokenizer.eos_id).sum() == 1
    assert ids[0] == tokenizer.bos_id


def test_training_is_deterministic(tmp_path):
    first, second = train_tokenizer(CAPTIONS, 400), train_tokenizer(CAPTIONS, 400)
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert first.fingerprint == second.fingerprint
    assert train_tokenizer(CAPTIONS[:3], 400).fingerprint != first.fingerprint


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.fingerprint == tokenizer.fingerprint
    assert torch.equal(loaded.encode(CAPTIONS), tokenizer.encode(CAPTIONS))


def test_bad_input_is_explained(tokenizer, tmp_path):
    with pytest.raises(TypeError, match="list"):
        tokenizer.encode("a single string")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="clip"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_a_normalising_tokenizer_ignores_case_and_accents_and_keeps_chinese(tmp_path):
    plain = train_tokenizer(CAPTIONS + ["A Pokémon with red eyes."], vocab_size=400)
    normal = train_tokenizer(CAPTIONS + ["A Pokémon with red eyes."], vocab_size=400, normalize=True)
    assert not torch.equal(plain.encode(["A Pokémon"]), plain.encode(["a pokemon"]))
    assert torch.equal(normal.encode(["A Pokémon"]), normal.encode(["a pokemon"]))
    assert normal.decode(normal.encode(["A Red POKÉMON"])[0]) == "a red pokemon"
    chinese = "一只蓝色的乌龟，有着棕色的壳。"
    assert normal.decode(normal.encode([chinese])[0]) == "一只蓝色的乌龟,有着棕色的壳。"
    # full-width forms fold to plain ones: a prompt typed with "," or "ＲＥＤ" reads as the captions' "，" / "red"
    assert torch.equal(normal.encode([chinese]), normal.encode(["一只蓝色的乌龟,有着棕色的壳。"]))
    assert torch.equal(normal.encode(["ＲＥＤ！"]), normal.encode(["red!"]))
    assert not torch.equal(plain.encode([chinese]), plain.encode(["一只蓝色的乌龟,有着棕色的壳。"]))
    # only accents go: kana keep their voicing marks, emoji their variation selectors and keycaps
    for kept in ("ポケモン ガ", "❤️ 1️⃣"):
        assert normal.decode(normal.encode([kept])[0]) == kept
    normal.save(tmp_path / "tokenizer.json")  # the setting travels with the saved tokenizer
    assert torch.equal(BPETokenizer.load(tmp_path / "tokenizer.json").encode(["Pokémon"]), normal.encode(["pokemon"]))
