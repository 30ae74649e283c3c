"""The README's "Using it" train command, run on a 20-row JSONL of word problems.

A newcomer's first run: the data format the README shows, the train command it shows (parsed out
of README.md, so this test breaks when the README drifts; only the paths are substituted), a
tiny random model. The run must use every row: none dropped as too long, every one trained on.

The same 2-rank run's stderr is checked for the upstream start-up noise that
``maspo_megatron/runtime/noise.py`` filters (TE/Apex fallbacks, megatron deprecation notices).

The tokenizer is character-level (one token per character, a chat template with special role
tokens), so these prompts are 4-5x longer in tokens than under a real BPE tokenizer: a recipe
whose prompt limit fits them fits real word problems with room to spare.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Grade-school word problems (written for this test) and their answers.
PROBLEMS = [
    ("A baker fills 12 trays with 9 rolls each and sells 70 rolls before noon. How many rolls are left?", "38"),
    ("Maya reads 14 pages of her book every evening. Her book has 210 pages. After 9 evenings, how many "
     "pages does she still have to read?", "84"),
    ("A school orders 6 boxes of pencils with 48 pencils in each box. The pencils are shared equally among "
     "32 students. How many pencils does each student get?", "9"),
    ("Tom buys 3 notebooks at $4 each and 2 pens at $1.50 each. He pays with a $20 bill. How much change "
     "does he get, in dollars?", "5"),
    ("A garden is 18 meters long and 7 meters wide. A path 1 meter wide runs along the inside of all four "
     "sides. What is the area of the garden that is not path, in square meters?", "80"),
    ("A train leaves at 9:40 and arrives at 13:15. How many minutes does the trip take?", "215"),
    ("Lena has twice as many stickers as Omar. Omar has 15 more stickers than Priya, who has 11. How many "
     "stickers do the three children have together?", "89"),
    ("A tank holds 240 liters. It is one quarter full. A pump adds 12 liters per minute. How many minutes "
     "until the tank is full?", "15"),
    ("A shop sells apples at 3 for $2. How many dollars do 27 apples cost?", "18"),
    ("In a class of 30 students, 40% walk to school, one third of the rest take the bus, and the others "
     "are driven. How many students are driven?", "12"),
    ("A farmer has 56 chickens and 18 cows. How many legs do the animals have in total?", "184"),
    ("Sam saves $7 every week. He already has $26. After how many weeks will he have exactly $103?", "11"),
    ("A rope 9 meters long is cut into pieces of 45 centimeters. How many whole pieces are there?", "20"),
    ("A cinema has 22 rows of 18 seats. On Friday 317 tickets were sold. How many seats were empty?", "79"),
    ("Three friends share a pizza bill of $38.40 and a tip of $4.80 equally. How many dollars does each "
     "friend pay?", "14.4"),
    ("A car uses 6 liters of fuel per 100 kilometers. How many liters does it use for a trip of 350 "
     "kilometers?", "21"),
    ("Nora is 4 years older than her brother. In 3 years the sum of their ages will be 30. How old is Nora "
     "now?", "14"),
    ("A library had 1,250 books. It gave away 175 books and bought 3 boxes of 40 new books. How many books "
     "does it have now?", "1195"),
    ("A cyclist rides at 18 kilometers per hour for 2 hours and then at 12 kilometers per hour for 30 "
     "minutes. How many kilometers does she ride?", "42"),
    ("A recipe needs 250 grams of flour for 10 cookies. How many grams of flour are needed for 36 "
     "cookies?", "900"),
]

# Upstream start-up noise (runtime/noise.py): none of it may reach a CPU run's stderr.
NOISE = [
    "Transformer Engine and Apex are not installed", "Apex is not installed", "IS DEPRECATED",
    "is deprecated", "is experimental", "No CUDA runtime is found", "full_param_layout not provided",
    "CUDA_DEVICE_MAX_CONNECTIONS", "Setting OMP_NUM_THREADS environment variable",
]


def using_it_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Using it\n(.*?)(?=^##? )", text, flags=re.M | re.S)
    assert match, "README.md has no '## Using it' section"
    return match.group(1)


def readme_data_example() -> dict:
    """The example row the README shows (its field names are the data format a newcomer uses)."""
    for line in using_it_section().splitlines():
        if line.strip().startswith("{"):
            return json.loads(line)
    raise AssertionError("README 'Using it' shows no example JSONL row")


def readme_train_command() -> list[str]:
    """The README's train command, continuation lines joined, as argv after the executable."""
    block = re.search(r"```bash\n(.*?)```", using_it_section(), flags=re.S)
    assert block, "README 'Using it' has no bash block"
    command = next(c for c in block.group(1).replace("\\\n", " ").splitlines()
                   if "maspo-megatron train " in c)
    argv = shlex.split(command, comments=True)
    assert argv[0].endswith("maspo-megatron") and argv[1] == "train", argv
    return argv[1:]


def write_word_problems(path: Path) -> None:
    example = readme_data_example()
    prompt_key, answer_key = list(example)
    assert len(PROBLEMS) == 20
    with open(path, "w") as f:
        for question, answer in PROBLEMS:
            f.write(json.dumps({prompt_key: question, answer_key: answer}) + "\n")


def make_char_model(model_dir: Path) -> None:
    """A character-level tokenizer over printable ASCII with a chat template, and a tiny Llama."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from maspo_megatron.data import make_demo_model

    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    make_demo_model(str(model_dir), tokenizer, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    from maspo_megatron.cli import load_recipe
    from maspo_megatron.config import describe

    tmp = tmp_path_factory.mktemp("readme")
    data, model, out = tmp / "train.jsonl", tmp / "model", tmp / "run"
    write_word_problems(data)
    make_char_model(model)
    argv = readme_train_command()
    recipe = argv[argv.index("--recipe") + 1]
    substituted = {"model.path": str(model), "data.train_path": str(data)}
    for i, item in enumerate(argv):
        key = item.split("=", 1)[0]
        if key in substituted:
            argv[i] = f"{key}={substituted.pop(key)}"
    assert not substituted, f"the README command does not set {sorted(substituted)}"
    # Only run length: 2 steps of 10 prompts (one pass over the data), 8 new tokens (the random
    # model never stops by itself), and every group trained on (a random model's rewards are all
    # 0, which dynamic sampling would filter: it is the draw, not the data, that is tested).
    max_new_tokens = next(k.key for k in describe(load_recipe(recipe)) if k.key.endswith("max_new_tokens"))
    argv += [f"output_dir={out}", "steps=2", "prompts_per_step=10", f"{max_new_tokens}=8",
             "algorithm.dynamic_sampling=false", "eval_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "maspo_megatron.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"README train command failed ({argv}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_command_trains_on_every_row_of_a_small_word_problem_set(readme_run):
    out, proc = readme_run
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    trained = [i for r in records for i in r["trained"]]
    # 20 distinct dataset indices trained on: the dataset kept all 20 rows (a dropped row would
    # leave fewer indices to draw from), and every one of them went into an update.
    assert sorted(trained) == list(range(20)), trained
    assert "longer than max_prompt_len" not in proc.stderr + proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["sampling/groups_kept"] == 10 and "actor/loss" in m for m in metrics), metrics
    config = json.loads((out / "config.json").read_text())
    assert config["reward"]["fn"] == "math"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_rank_run_prints_no_upstream_start_up_noise(readme_run):
    _, proc = readme_run
    assert "step    2/2" in proc.stdout
    noisy = [line for line in proc.stderr.splitlines()
             if any(n in line for n in NOISE) or re.search(r"\b\w*Warning: ", line)]
    assert not noisy, "\n".join(noisy) + "\n--- full stderr ---\n" + proc.stderr[-6000:]
