"""EleutherAI's lm-evaluation-harness scores precision modes through a real server (issue 18).

`python -m lm_eval --model local-completions` runs as a user would, against `quantserve` in its
own process, on a small multiple-choice task written here (a YAML and a JSONL: no hub, no
download). Its per-choice log-likelihoods must equal those computed directly from the model,
the way `quantserve-eval` loads and quantizes it (`tools/quality.py`), and fp32 against int4
must move the way their perplexities do (its scorer, on the start of its default text).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.engine.llama_runner import LlamaRunner
from quant.api import quantize_
from quant.checkpoints import DEFAULT_MODEL, load_float_model
from quant.config import QuantOptions
from quant.registry import make_config
from tests.support.env import clean_env
from tests.support.live_server import serve_process
from tools.quality import load_text, score, tokenize

# two real servers, two harness runs, each model built again to check them: minutes on 2 cores
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
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Two plus two equals", ["four", "five", "three", "six"], 0),
    ("A baby cat is called a", ["kitten", "puppy", "calf", "foal"], 0),
    ("The color of a clear daytime sky is", ["blue", "green", "red", "purple"], 0),
    ("Ice is frozen", ["water", "milk", "oil", "sand"], 0),
    ("The first month of the year is", ["January", "March", "July", "October"], 0),
]
MATCH_TOLERANCE = 1e-3  # nats, per choice
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
    model, tokenizer, _ = load_float_model(DEFAULT_MODEL, cache_dir, "cpu")
    quantize_(model, make_config(mode, QuantOptions(device="cpu")))
    return model.eval(), tokenizer


Scorer = Callable[[list[int]], torch.Tensor]  # token ids -> log-probs [len(ids), vocab]


def transformers_forward(model) -> Scorer:
    """What `quantserve-eval` scores with: transformers' forward of the whole sequence."""

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def lean_forward(model) -> Scorer:
    """The server's own prefill (the lean Llama forward) over the same model."""
    runner = LlamaRunner(model, torch.device("cpu"), 1, 2048)

    def logprobs(ids: list[int]) -> torch.Tensor:
        try:
            return torch.log_softmax(runner.prefill(0, ids, all_positions=True), dim=-1)
        finally:
            runner.release(0)

    return logprobs


def direct_loglikelihood(scorer: Scorer, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = context_ids + continuation_ids
    logprobs = scorer(ids)
    return sum(float(logprobs[p, ids[p + 1]]) for p in range(len(context_ids) - 1, len(ids) - 1))


def text_perplexity(model, tokenizer) -> float:
    """Perplexity over the start of the quality tool's default text, with its scorer."""
    scores = score(model, tokenize(tokenizer, load_text(None), 512), context=512, stride=512)
    return math.exp(scores.nll_sum / scores.count)


def served_scores(mode: str, cache_dir: Path, tokenizer_dir: Path, workdir: Path) -> dict[tuple[str, str], float]:
    """Serve `mode` in its own process and run the harness against it; its per-choice log-likelihoods."""
    task_dir = write_task(workdir / "task")
    env = {"QS_PRECISION": mode, "QS_CACHE_DIR": str(cache_dir), "QS_MAX_BATCH_SIZE": "8"}
    with serve_process(env, workdir / f"server-{mode}.log") as (base_url, _):
        samples = run_harness(base_url, tokenizer_dir, task_dir, workdir / f"lm-eval-{mode}")
    served = harness_loglikelihoods(samples)
    assert len(served) == sum(len(c) for _, c, _ in QUESTIONS)
    assert all(value < 0 for value in served.values())
    return served


def assert_matches(served: dict[tuple[str, str], float], scorer: Scorer, tokenizer) -> None:
    for (context, continuation), loglikelihood in served.items():
        expected = direct_loglikelihood(scorer, tokenizer, context, continuation)
        assert loglikelihood == pytest.approx(expected, abs=MATCH_TOLERANCE), (context, continuation)


def gold_loss_per_token(served: dict[tuple[str, str], float], tokenizer) -> float:
    """Mean loss per token of the right answers: the task's own perplexity, in nats."""
    loss, tokens = 0.0, 0
    for question, choices, answer in QUESTIONS:
        continuation = " " + choices[answer]  # lm_eval's target delimiter
        loss -= served[(question, continuation)]
        tokens += len(encode_pair(tokenizer, question, continuation)[1])
    return loss / tokens


def test_lm_eval_scores_modes_through_the_server(cache_dir, default_checkpoint, tmp_path):
    """The harness runs to the end against fp32 and int4; every choice's log-likelihood is the model's;
    int4 loses on the right answers about what its perplexity loses on text."""
    gold_loss, log_perplexity = {}, {}
    for mode in ("fp32", "int4"):
        served = served_scores(mode, cache_dir, default_checkpoint, tmp_path / mode)
        model, tokenizer = quality_model(mode, cache_dir)
        # the server's forward over quantserve-eval's model: the numbers are the model's, exactly
        assert_matches(served, lean_forward(model), tokenizer)
        if mode == "fp32":
            # and quantserve-eval's own forward gives them too. Not in int4: its layers round activations
            # to int8 below 128 rows, and the two forwards' 1e-7 float differences grow to tenths of a nat
            assert_matches(served, transformers_forward(model), tokenizer)
        gold_loss[mode] = gold_loss_per_token(served, tokenizer)
        log_perplexity[mode] = math.log(text_perplexity(model, tokenizer))
    perplexity_gap = log_perplexity["int4"] - log_perplexity["fp32"]
    task_gap = gold_loss["int4"] - gold_loss["fp32"]
    assert perplexity_gap > 0.05  # int4 is measurably worse on text, as the quality table shows
    # ... and on the task, by a comparable number of nats per token (measured: 0.39 against 0.33)
    assert perplexity_gap / 3 < task_gap < perplexity_gap * 3, (task_gap, perplexity_gap)
