"""EleutherAI's lm-evaluation-harness scores precision modes through a real server (issue 18).

`python -m lm_eval --model local-completions` runs as a user would, against `quantserve` in its
own process, on a small multiple-choice task written here (a YAML and a JSONL: no hub, no
download). Its per-choice log-likelihoods must equal those computed directly from the model,
the way `quantserve-eval` loads and quantizes it (`tools/quality.py`), and fp32 against int4
must move the way their perplexities do.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.api import quantize_
from quant.checkpoints import DEFAULT_MODEL
from quant.config import QuantOptions
from quant.registry import make_config
from tests.support.env import clean_env
from tests.support.live_server import serve_process
from tools.quality import load_text, score, tokenize

# two real servers, two harness runs and the model loaded anew: well over a minute on 2 cores
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TASK = "quantserve_mc"
# question, choices, index of the right one
QUESTIONS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin", "Rankine"], 0),
    ("The largest planet in the solar system is", ["Jupiter", "Mars", "Venus", "Mercury"], 0),
    ("A week has seven", ["days", "months", "years", "hours"], 0),
    ("The opposite of hot is", ["cold", "warm", "loud", "tall"], 0),
    ("Bees make", ["honey", "milk", "silk", "wool"], 0),
]
MATCH_TOLERANCE = 1e-3  # nats, per choice: the server's lean forward against transformers'
OFFLINE = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def write_task(directory: Path) -> Path:
    """A local multiple-choice task: the JSONL and the YAML that points at it."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


def run_harness(base_url: str, tokenizer_dir: Path, task_dir: Path, output: Path) -> list[dict]:
    """`python -m lm_eval` against the server; its logged samples (one per question)."""
    model_args = ",".join(
        [
            f"base_url={base_url}/v1/completions",
            "model=quantserve",
            "tokenizer_backend=huggingface",
            f"tokenizer={tokenizer_dir}",
            "max_retries=1",
        ]
    )
    command = [
        sys.executable,
        *("-m", "lm_eval", "--model", "local-completions", "--model_args", model_args),
        *("--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(output), "--log_samples"),
        *("--batch_size", "8"),  # eight prompts per request: our multi-prompt completions
    ]
    env = clean_env(**OFFLINE, HF_HOME=str(output / "hf-home"))  # an empty hub cache: nothing to find there
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    [samples_file] = output.rglob(f"samples_{TASK}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))  # ran to the end
    return samples


def harness_loglikelihoods(samples: list[dict]) -> dict[tuple[str, str], float]:
    """(context, continuation) -> the log-likelihood the harness read from the server."""
    scores = {}
    for sample in samples:
        for index, response in enumerate(sample["resps"]):
            arguments = sample["arguments"][f"gen_args_{index}"]
            scores[(arguments["arg_0"], arguments["arg_1"])] = float(response[0][0])
    return scores


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's split of a request into context and continuation tokens (trailing spaces move right)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def quality_model(mode: str, cache_dir: Path):
    """The model of `mode` as `quantserve-eval` builds it: the float checkpoint, quantized."""
    from quant.checkpoints import load_float_model

    model, tokenizer, _ = load_float_model(DEFAULT_MODEL, cache_dir, "cpu")
    quantize_(model, make_config(mode, QuantOptions(device="cpu")))
    return model.eval(), tokenizer


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = context_ids + continuation_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    positions = range(len(context_ids) - 1, len(ids) - 1)
    return sum(float(logprobs[p, ids[p + 1]]) for p in positions)


def text_perplexity(model, tokenizer) -> float:
    """Perplexity over the start of the quality tool's default text, with its scorer."""
    scores = score(model, tokenize(tokenizer, load_text(None), 512), context=512, stride=512)
    return math.exp(scores.nll_sum / scores.count)


def evaluate_mode(mode: str, cache_dir: Path, default_checkpoint: Path, workdir: Path) -> dict[tuple[str, str], float]:
    """Serve `mode`, run the harness against it, check every choice against the direct computation."""
    task_dir = write_task(workdir / "task")
    env = {"QS_PRECISION": mode, "QS_CACHE_DIR": str(cache_dir), "QS_MAX_BATCH_SIZE": "8"}
    with serve_process(env, workdir / f"server-{mode}.log") as (base_url, _):
        samples = run_harness(base_url, default_checkpoint, task_dir, workdir / f"lm-eval-{mode}")
    served = harness_loglikelihoods(samples)
    assert len(served) == sum(len(c) for _, c, _ in QUESTIONS)
    model, tokenizer = quality_model(mode, cache_dir)
    for (context, continuation), loglikelihood in served.items():
        expected = direct_loglikelihood(model, tokenizer, context, continuation)
        assert loglikelihood == pytest.approx(expected, abs=MATCH_TOLERANCE), (mode, context, continuation)
    return served


def test_lm_eval_scores_fp32_through_the_server(cache_dir, default_checkpoint, tmp_path):
    served = evaluate_mode("fp32", cache_dir, default_checkpoint, tmp_path)
    assert all(value < 0 for value in served.values())


def test_lm_eval_scores_differ_between_modes_as_perplexity_does(cache_dir, default_checkpoint, tmp_path):
    """int4's perplexity is above fp32's; so must be its mean per-token loss on the task's choices."""
    per_token_loss, perplexity = {}, {}
    for mode in ("fp32", "int4"):
        served = evaluate_mode(mode, cache_dir, default_checkpoint, tmp_path / mode)
        model, tokenizer = quality_model(mode, cache_dir)
        tokens = sum(len(encode_pair(tokenizer, c, k)[1]) for c, k in served)
        per_token_loss[mode] = -sum(served.values()) / tokens
        perplexity[mode] = text_perplexity(model, tokenizer)
    assert perplexity["int4"] > perplexity["fp32"] * 1.05  # a real gap, as the quality table shows
    assert per_token_loss["int4"] > per_token_loss["fp32"]
