"""The demo task: dataset, locally made tokenizer and model, and the random policy's reward."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maspo_megatron.data import (
    DataConfig,
    PromptDataset,
    SyntheticTaskConfig,
    make_demo_model,
    make_demo_tokenizer,
    make_synthetic_dataset,
)
from maspo_megatron.reward import get_reward


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_model")
    make_demo_model(str(out), make_demo_tokenizer(), seed=0)
    return str(out)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_dataset_is_deterministic_and_correct(tmp_path):
    a = make_synthetic_dataset(str(tmp_path / "a"), SyntheticTaskConfig(num_train=50, num_eval=20, seed=1))
    b = make_synthetic_dataset(str(tmp_path / "b"), SyntheticTaskConfig(num_train=50, num_eval=20, seed=1))
    c = make_synthetic_dataset(str(tmp_path / "c"), SyntheticTaskConfig(num_train=50, num_eval=20, seed=2))
    train, evals = read(a[0]), read(a[1])
    assert (len(train), len(evals)) == (50, 20)
    assert train == read(b[0]) and evals == read(b[1]) and train != read(c[0])
    assert train != evals[: len(train)]
    for row in train + evals:
        x, y = row["prompt"].rstrip("=").split("+")
        assert 0 <= int(x) <= 4 and 0 <= int(y) <= 4
        assert row["answer"] == str((int(x) + int(y)) % 10)
    for row in read(make_synthetic_dataset(str(tmp_path / "d"), SyntheticTaskConfig(task="copy", num_train=30))[0]):
        assert row["prompt"] == row["answer"] + "="
    with pytest.raises(ValueError, match="'add', 'copy' or 'shift'"):
        SyntheticTaskConfig(task="mul")


def test_shift_task_maps_every_digit(tmp_path):
    config = SyntheticTaskConfig(task="shift", num_train=300, num_eval=50, seed=3)
    train_path, eval_path = make_synthetic_dataset(str(tmp_path / "a"), config)
    rows = read(train_path) + read(eval_path)
    assert config.answer_tokens == 8 and SyntheticTaskConfig().answer_tokens == 1
    seen = set()
    for row in rows:
        prompt, answer = row["prompt"], row["answer"]
        assert prompt.endswith("=") and len(prompt) == 9 and len(answer) == 8
        for i, ch in enumerate(prompt[:-1]):
            assert 0 <= int(ch) <= 4
            assert int(answer[i]) == (int(ch) + 3) % 10
            seen.add(ch)
    assert seen == set("01234")  # every allowed digit is drawn
    assert len({r["prompt"] for r in rows}) > 0.95 * len(rows)  # 5**8 prompts: nearly all distinct
    assert read(make_synthetic_dataset(str(tmp_path / "b"), config)[0]) == read(train_path)
    wide = read(make_synthetic_dataset(str(tmp_path / "c"), SyntheticTaskConfig(
        task="shift", num_digits=12, offset=7, max_operand=9, num_train=200, num_eval=0))[0])
    assert {len(r["answer"]) for r in wide} == {12}
    assert {c for r in wide for c in r["prompt"][:-1]} == set("0123456789")
    assert all(r["answer"] == "".join(str((int(c) + 7) % 10) for c in r["prompt"][:-1]) for r in wide)
    with pytest.raises(ValueError, match="num_digits"):
        SyntheticTaskConfig(task="shift", num_digits=0)
    with pytest.raises(ValueError, match="offset"):
        SyntheticTaskConfig(task="shift", offset=10)


def test_shift_prompt_fits_the_demo_recipe(tmp_path):
    from maspo_megatron.cli import load_recipe

    tok = make_demo_tokenizer()
    _, eval_path = make_synthetic_dataset(str(tmp_path), SyntheticTaskConfig(task="shift", num_train=1, num_eval=20))
    cfg = load_recipe("tiny_cpu").data
    data = PromptDataset(eval_path, DataConfig(max_prompt_len=cfg.max_prompt_len), tok)
    assert len(data) == 20  # none dropped as too long
    for sample in data:
        assert len(sample.prompt_ids) == 10 and sample.prompt_ids[0] == tok.bos_token_id
        assert tok.decode(sample.prompt_ids) == sample.prompt and len(sample.answer) == 8


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    make_demo_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 16
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for text in ["0123456789", "3+4=7", "9+9=8", "="]:
        encoded = tok(text)["input_ids"]
        assert encoded[0] == tok.bos_token_id and len(encoded) == len(text) + 1  # one token per character
        assert tok.decode(encoded, skip_special_tokens=True) == text
        assert tok.decode(encoded) == "<bos>" + text
    assert tok("a")["input_ids"] == [2, tok.unk_token_id]
    rendered = tok.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos>3+4="
    assert tok.apply_chat_template(
        [{"role": "user", "content": "1="}, {"role": "assistant", "content": "1"}], tokenize=False
    ) == "<bos>1=1<eos>"


def test_model_loads_and_is_seeded(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert (config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers) == ("llama", 16, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == config.vocab_size
    same = make_demo_model(str(tmp_path / "same"), make_demo_tokenizer(), seed=0)
    other = make_demo_model(str(tmp_path / "other"), make_demo_tokenizer(), seed=1, family="qwen2")
    for (name, p), q in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(p, q), name
    assert other.config.model_type == "qwen2"
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_random_policy_earns_about_one_in_sixteen(model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, eval_path = make_synthetic_dataset(str(tmp_path), SyntheticTaskConfig(num_train=1, num_eval=200))
    data = PromptDataset(eval_path, DataConfig(), tok)
    with torch.no_grad():
        ids = torch.tensor([s.prompt_ids for s in data])  # all prompts are "<bos>a+b=": same length
        probs = model(ids).logits[:, -1].float().softmax(-1)
    answer_ids = torch.tensor([tok.convert_tokens_to_ids(s.answer) for s in data])
    expected = probs.gather(1, answer_ids[:, None]).mean().item()
    assert 0.04 < expected < 0.09  # near-uniform over 16 tokens: 1/16 = 0.0625

    reward = get_reward("synthetic")
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs, 20, replacement=True, generator=generator)
    rewards = [
        reward(tok.decode([t], skip_special_tokens=False), s.answer).reward
        for s, row in zip(data, draws.tolist())
        for t in row
    ]
    assert abs(sum(rewards) / len(rewards) - expected) < 0.02  # 4000 draws: ~5 standard errors


def test_synthetic_reward_rule():
    reward = get_reward("synthetic")
    assert reward("7<eos>", "7").reward == 1.0
    assert reward("78", "7").reward == 1.0  # only the first token(s) count
    assert reward("<eos>7", "7").reward == 0.0
    assert reward("8", "7").reward == 0.0
    empty = reward("", "7")
    assert empty.reward == 0.0 and empty.no_answer


def test_synthetic_reward_counts_digits_in_place():
    reward = get_reward("synthetic")
    assert reward("73546677<eos>", "73546677").reward == 1.0
    assert reward("73546670", "73546677").reward == 7 / 8
    assert reward("37546677", "73546677").reward == 6 / 8  # a swap costs both places
    assert reward("1234567", "01234567").reward == 0.0  # shifted by one: nothing in place
    cut = reward("735<eos>", "73546677")
    assert cut.reward == 3 / 8 and cut.extracted == "735<eos>"
    # A special token fills one position (it is one token), so the digits after it stay aligned.
    assert reward("7<unk>546677", "73546677").reward == 7 / 8
    assert reward("735466779999", "73546677").reward == 1.0  # what follows the answer is ignored
    # Accuracy (and eval Avg@k / Pass@k) counts full answers only, not partial credit.
    assert reward("73546677", "73546677").correct and not reward("73546670", "73546677").correct
