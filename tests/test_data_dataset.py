"""Prompt datasets: JSONL/Parquet, field config, templates, length filter, errors, resumable cursor."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maspo_megatron.data import DataConfig, DataError, PromptDataset, PromptLoader, load_tokenizer, make_demo_tokenizer

# The demo tokenizer's vocabulary order: <pad> <unk> <bos> <eos> 0..9 + =
BOS, UNK = 2, 1
IDS = {c: i + 4 for i, c in enumerate("0123456789+=")}


def ids(text):
    return tuple(IDS[c] for c in text)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tok")
    make_demo_tokenizer(str(model_dir))
    return load_tokenizer(str(model_dir))  # through AutoTokenizer, as the trainer does


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_with_chat_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "3+4=", "answer": "7"}, {"prompt": "1+1=", "answer": 2}])
    ds = PromptDataset(path, DataConfig(), tokenizer)
    assert len(ds) == 2 and ds.num_rows == 2 and not ds.dropped
    assert ds[0].prompt == "<bos>3+4=" and ds[0].prompt_ids == (BOS,) + ids("3+4=")
    assert ds[0].answer == "7" and ds[1].answer == "2"  # numbers become strings
    assert ds[1].source == f"{path}:line 2" and ds[1].index == 1


def test_parquet_nested_fields_and_message_lists(tokenizer, tmp_path):
    # verl-style rows: chat-message prompt, answer nested under reward_model.ground_truth
    table = pa.Table.from_pylist(
        [
            {"q": [{"role": "user", "content": "2+2="}], "reward_model": {"ground_truth": "4"}},
            {"q": [{"role": "user", "content": "9+0="}], "reward_model": {"ground_truth": "9"}},
        ]
    )
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path)
    ds = PromptDataset(path, DataConfig(prompt_field="q", answer_field="reward_model.ground_truth"), tokenizer)
    assert [s.answer for s in ds] == ["4", "9"]
    assert ds[1].prompt_ids == (BOS,) + ids("9+0=") and ds[1].source == f"{path}:row 1"


def test_prompt_template_system_prompt_and_chat_template(tokenizer, tmp_path):
    tok = make_demo_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+2=", "sol": "3"}])
    config = DataConfig(
        prompt_field="problem",
        answer_field="sol",
        prompt_template="{prompt} Put the answer in \\boxed{}.",
        system_prompt="S",
    )
    sample = PromptDataset(path, config, tok)[0]
    expected = "[system]S[user]1+2= Put the answer in \\boxed{}.[assistant]"
    assert sample.prompt == expected
    assert sample.prompt_ids == tuple(tok(expected, add_special_tokens=False)["input_ids"])


def test_raw_prompts_skip_the_chat_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "5", "answer": "5"}])
    sample = PromptDataset(path, DataConfig(apply_chat_template=False, prompt_template="{prompt}+0="), tokenizer)[0]
    assert sample.prompt == "5+0="
    assert sample.prompt_ids == (BOS,) + ids("5+0=")  # the tokenizer's own BOS is still added


def test_missing_chat_template_is_explained(tmp_path):
    tok = make_demo_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1=", "answer": "1"}])
    with pytest.raises(ValueError, match="apply_chat_template=False"):
        PromptDataset(path, DataConfig(), tok)


def test_length_filter_drops_and_reports(tokenizer, tmp_path, caplog):
    rows = [{"prompt": "1=", "answer": "1"}, {"prompt": "1+2+3=", "answer": "6"}, {"prompt": "2+2=", "answer": "4"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(path, DataConfig(max_prompt_len=5), tokenizer)  # "<bos>2+2=" is 5 tokens
    assert [s.answer for s in ds] == ["1", "4"] and [s.index for s in ds] == [0, 1]
    assert ds.dropped == [(f"{path}:line 2", 7)]
    assert "dropped 1 of 3 prompts longer than max_prompt_len=5" in caplog.text
    with pytest.raises(DataError, match="all 3 prompts are longer than max_prompt_len=1"):
        PromptDataset(path, DataConfig(max_prompt_len=1), tokenizer)


@pytest.mark.parametrize(
    "lines,match",
    [
        (['{"prompt": "1=", "answer": "1"}', "", "{not json"], r"d\.jsonl: line 3: invalid JSON"),
        (['{"prompt": "1=", "answer": "1"}', '{"prompt": "2="}'], r"d\.jsonl: line 2: field 'answer' is missing \(row has fields \['prompt'\]\)"),
        (['{"prompt": 12, "answer": "1"}'], r"line 1: field 'prompt': expected a string or a non-empty list of chat messages, got int"),
        (['{"prompt": "1=", "answer": [1]}'], r"line 1: field 'answer': expected a string or a number, got list"),
        (['{"prompt": [{"role": "user"}], "answer": "1"}'], r"line 1: field 'prompt': message 0 must be an object with string 'role' and 'content'"),
        (['["prompt", "answer"]'], r"line 1: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(tokenizer, tmp_path, lines, match):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=match):
        PromptDataset(path, DataConfig(), tokenizer)


def test_bad_parquet_row_names_row_index(tokenizer, tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["1=", None], "answer": ["1", "2"]}), path)
    with pytest.raises(DataError, match=r"d\.parquet: row 1: field 'prompt': expected a string .* got NoneType"):
        PromptDataset(path, DataConfig(), tokenizer)


def test_bad_config_and_files(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="must contain '\\{prompt\\}'"):
        DataConfig(prompt_template="no placeholder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataset(str(tmp_path / "missing.jsonl"), DataConfig(), tokenizer)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset format"):
        PromptDataset(str(tmp_path / "d.csv"), DataConfig(), tokenizer)


@pytest.fixture
def seven_prompts(tokenizer, tmp_path):
    rows = [{"prompt": f"{i}=", "answer": str(i)} for i in range(7)]
    return PromptDataset(write_jsonl(tmp_path / "d.jsonl", rows), DataConfig(), tokenizer)


BATCHES = [3, 5, 1, 4, 6, 2, 3]  # 24 prompts: 3 epochs of 7 and 3 more, crossing epoch ends mid-batch


def test_cursor_epochs_are_permutations(seven_prompts):
    loader = PromptLoader(seven_prompts, shuffle=True, seed=1)
    stream = [s.index for n in BATCHES for s in loader.next_batch(n)]
    epochs = [stream[i : i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch
    assert (loader.epoch, loader.index, loader.consumed) == (3, 3, 24)
    unshuffled = PromptLoader(seven_prompts, shuffle=False)
    assert [s.index for s in unshuffled.next_batch(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


@pytest.mark.parametrize("stop_after", range(1, len(BATCHES)))
def test_cursor_resume_has_no_repeats_or_skips(seven_prompts, stop_after):
    reference = PromptLoader(seven_prompts, seed=3)
    uninterrupted = [s.index for n in BATCHES for s in reference.next_batch(n)]

    first = PromptLoader(seven_prompts, seed=3)
    before = [s.index for n in BATCHES[:stop_after] for s in first.next_batch(n)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = PromptLoader(seven_prompts, seed=3)
    resumed.load_state_dict(state)
    after = [s.index for n in BATCHES[stop_after:] for s in resumed.next_batch(n)]
    assert before + after == uninterrupted


def test_cursor_refuses_other_data_or_order(seven_prompts, tokenizer, tmp_path):
    loader = PromptLoader(seven_prompts, seed=3)
    loader.next_batch(2)
    state = loader.state_dict()
    other = PromptDataset(write_jsonl(tmp_path / "o.jsonl", [{"prompt": "1=", "answer": "1"}] * 7), DataConfig(), tokenizer)
    with pytest.raises(ValueError, match="different dataset"):
        PromptLoader(other, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3"):
        PromptLoader(seven_prompts, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks keys \\['epoch'\\]"):
        PromptLoader(seven_prompts, seed=3).load_state_dict({k: v for k, v in state.items() if k != "epoch"})
