"""``maspo-megatron eval``: Avg@k / Pass@k through a real SGLang server (CPU engine)."""

import json

import pytest

from maspo_megatron.cli import main
from maspo_megatron.demo import prepare_assets

pytestmark = pytest.mark.slow


def test_eval_command_reports_avg_and_pass_at_k(tmp_path, capsys):
    paths = prepare_assets(str(tmp_path / "demo"))
    out = tmp_path / "eval"
    code = main(["eval", f"model_path={paths['model']}", f"data.eval_path={paths['eval']}",
                 "reward.fn=synthetic", "reward.num_workers=0", "rollout.device=cpu",
                 "rollout.use_router=false", "rollout.sampling.max_new_tokens=2",
                 "rollout.sampling.temperature=1.0", "rollout.sampling.top_p=1.0", "k=4",
                 "max_prompts=40", f"output_dir={out}"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_prompts"] == 40
    avg, pass_k = result["eval/avg@4"], result["eval/pass@4"]
    # A random-init policy over 16 tokens: about 1/16 per sample, so Pass@4 is well above Avg@4.
    assert 0.0 < avg < 0.25 and avg <= pass_k <= 1.0 and pass_k > avg
    assert "eval/avg@4:" in capsys.readouterr().out


def test_eval_requires_a_model_and_a_dataset(tmp_path, capsys):
    assert main(["eval", f"output_dir={tmp_path}"]) == 2
    assert "eval needs model_path=DIR" in capsys.readouterr().err
