"""`pp-ext report`: the summary of a run's metrics.jsonl, its curves, and the comparison
of several runs (no model needed: samples need a run's export and are skipped here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pp_ext.cli import main as cli


def fake_run(folder: Path, final_loss: float) -> Path:
    folder.mkdir()
    entries = [{"step": 0, "eval_loss": 4.5, "eval_accuracy": 0.0}]
    entries += [
        {
            "step": s,
            "loss": 4.5 - (4.5 - final_loss) * s / 20,
            "lr": 1e-3,
            "tokens_per_s": 1000.0 + s,
            "step_time_s": 0.1,
        }
        for s in range(1, 21)
    ]
    entries.append({"step": 20, "eval_loss": final_loss, "eval_accuracy": 0.75})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder


def test_one_run(tmp_path, capsys):
    run = fake_run(tmp_path / "run", 0.5)
    assert cli(["report", str(run), "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "run " + str(run) + ": 20 steps" in out
    assert "train loss         4.3000 (step 1)  0.5000 (step 20)" in out
    assert "answer accuracy    0.0000 (step 0)  0.7500 (step 20)" in out
    assert "tokens/s (median)                   1011" in out
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_several_runs_are_compared(tmp_path, capsys):
    runs = [fake_run(tmp_path / name, loss) for name, loss in (("sync", 0.5), ("async", 0.55))]
    assert cli(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["run", "steps"]
    assert out[1].split()[1:3] == [
        "20",
        f"{sum(4.5 - 4.0 * s / 20 for s in range(11, 21)) / 10:.4f}",
    ]
    assert out[2].split()[3:5] == ["0.5500", "0.7500"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_missing_metrics_is_one_line(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "metrics.jsonl does not exist: give the output_dir of a training run" in err
    )


@pytest.mark.parametrize("export", ["model", "lora"])
def test_samples_print_no_progress_bar(tmp_path, capfd, export):
    """The samples load the exported model (a LoRA run's: the adapter on its base, and its
    answers are the adapted model's, not the base's): transformers' weight-loading bar
    stays out of the report (stdout and stderr both, as the terminal shows them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pp_ext.config.recipe import load

    root = Path(__file__).resolve().parents[1]
    run = fake_run(tmp_path / "run", 0.5)
    recipe = load(root / "recipes/quickstart.yaml", [f"data.path={root}/recipes/data/reverse"])
    (run / "recipe.yaml").write_text(OmegaConf.to_yaml(recipe))
    model_dir = root / "configs/models/quickstart"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
    if export == "lora":
        model.save_pretrained(tmp_path / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, lora).eval()  # B random: the answers change
    model.save_pretrained(run / "hf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(run / "hf")
    prompt = OmegaConf.load(run / "recipe.yaml")  # the first held-out prompt's answer
    first = json.loads(Path(root / "recipes/data/reverse/validation.jsonl").open().readline())
    ids = tokenizer(first[prompt.data.prompt_field], return_tensors="pt").input_ids
    new = len(tokenizer(first[prompt.data.completion_field]).input_ids) + 1
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    capfd.readouterr()
    assert cli(["report", str(run), "--samples", "2"]) == 0
    out, err = capfd.readouterr()
    assert "of 2 held-out prompts answered exactly" in out
    assert repr(answer) in out, (answer, out)
    assert "Loading weights" not in out + err and "%|" not in out + err
