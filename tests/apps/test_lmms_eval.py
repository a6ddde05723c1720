"""The lmms-eval plugin: entry point, model_args, the offline scenes task, figures, agreement with `st3 eval`."""

from __future__ import annotations

import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (the `lmms` extra; docs/lmms-eval.md says how to install it)"
)

from st3.plugins import lmms_eval as plugin  # noqa: E402
from st3_scenes import MODEL_DIR  # noqa: E402  (the scenes package: installed with the plugin in .ci/run)
from st3_scenes.lmms_tasks import write_tasks  # noqa: E402

MODEL = str(MODEL_DIR)
N = 8


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """lmms-eval's task index of the offline scenes tasks only (indexing its 300 built-in tasks is slow)."""
    from lmms_eval.tasks import TaskManager

    root = write_tasks(tmp_path_factory.mktemp("lmms-tasks"), split="test", qa=N, captions=0)
    return TaskManager("ERROR", include_path=str(root), include_defaults=False)


def evaluate(tasks, model_args: str, batch_size: int) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model="st3_llava_hf",
        model_args=model_args,
        tasks=["st3_scenes_qa"],
        batch_size=batch_size,
        device="cpu",
        limit=N,
        log_samples=True,
        task_manager=tasks,
    )


def test_entry_point_resolves_to_a_subclass_of_lmms_evals_llava_hf():
    from lmms_eval.models import get_model
    from lmms_eval.models.simple.llava_hf import LlavaHf

    points = importlib.metadata.entry_points(group="lmms_eval.models")
    assert "st3.plugins.lmms_eval:manifests" in {p.value for p in points}
    ids = {m.model_id: m for m in plugin.manifests()}
    assert ids["st3_llava_hf"].simple_class_path == "st3.plugins.lmms_eval.St3LlavaHf"
    cls = get_model("st3_llava_hf")
    assert cls is plugin.St3LlavaHf and issubclass(cls, LlavaHf) and issubclass(cls, plugin.St3Model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"method": "fastvv"}, "unknown method 'fastvv'; available: "),
        ({"method": "fastv", "ratoi": 0.5}, "unknown model_args ['ratoi']: not knobs of fastv"),
        ({"method": "st3", "ratio": 1.5}, "method=st3: ratio"),
        ({"method": "none", "ratio": 0.5}, "method=none takes no knobs"),
        ({"method": "st3", "budget": 0}, "budget must be in (0, 1]"),
    ],
)
def test_bad_model_args_fail_clearly_before_the_model_loads(args, message):
    with pytest.raises(ValueError) as error:
        plugin.St3LlavaHf(pretrained="/nonexistent/model", **args)  # a load would fail differently
    assert message in str(error.value)


def test_scenes_task_agrees_with_st3_eval_and_writes_figures(tasks, tmp_path):
    """lmms-eval under the plugin (batches of 3, so one is short) gives st3 eval's accuracy and visual tokens."""
    from st3_scenes.evaluate import evaluate as st3_eval

    figures = tmp_path / "figures.json"
    result = evaluate(tasks, f"pretrained={MODEL},method=st3,budget=0.5,figures={figures}", batch_size=3)
    accuracy = result["results"]["st3_scenes_qa"]["exact_match,none"]
    reference = st3_eval(MODEL, "test", ("st3",), (0.5,), qa=N, captions=0, batch_size=4)
    row = next(r for r in reference["rows"] if r["method"] == "st3")
    assert accuracy == pytest.approx(row["accuracy"])
    report = json.loads(figures.read_text())
    assert report["method"] == "st3" and report["knobs"] == row["knobs"] and report["budget"] == 0.5
    assert report["samples"] == N and report["requests"] == N and report["forward_calls"] > N // 3
    assert report["mean_visual_per_layer"] == pytest.approx(row["visual_per_layer"])
    assert report["prefill_flops_ratio"] == pytest.approx(row["prefill_flops_ratio"])
    assert report["kv_ratio"] < 1 and report["total_flops_ratio"] < 1 and report["wall_seconds"] > 0
    assert len(report["visual_per_layer"]) == 4 and report["visual_per_layer"][0] == 324


def test_plugin_answers_equal_the_unpruned_model_when_nothing_is_pruned(tasks):
    """`lattice` keeping every visual token prunes nothing: the answers are the unpruned run's, batch by batch."""
    pruned = evaluate(tasks, f"pretrained={MODEL},method=lattice,keep=324", batch_size=4)
    full = evaluate(tasks, f"pretrained={MODEL},method=none", batch_size=2)
    answers = [[s["resps"] for s in run["samples"]["st3_scenes_qa"]] for run in (pruned, full)]
    assert answers[0] == answers[1] and len(answers[0]) == N


def test_loglikelihood_reads_the_continuation_from_the_end_under_pruning():
    """Under VTW (visual tokens leave at layer 2) the teacher-forced log-likelihood of the greedy answer equals
    the log-probabilities generate gave it step by step; reading the logits from the start would not."""
    from st3_scenes.processor import prompt
    from st3_scenes.tasks import example

    lm = plugin.St3LlavaHf(pretrained=MODEL, method="vtw", layer=2)
    e = example("test", 3, "caption")
    lm.task_dict = {"t": {"test": [{"image": e.image}]}}
    processor, model = lm._image_processor, lm.model
    inputs = processor(images=[e.image], text=[prompt(e.question)], return_tensors="pt")
    with lm.st3_method(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=None)  # fmt: skip
    assert lm.st3_method.trace.pruned
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    expected = sum(torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, new)).item()
    continuation = " " + processor.decode(new, skip_special_tokens=True)
    request = SimpleNamespace(args=(e.question, continuation, lambda doc: [doc["image"]], 0, "t", "test"))
    [(logprob, greedy)] = lm.loglikelihood([request])
    assert greedy and logprob == pytest.approx(expected, abs=1e-4)
    assert lm.st3_figures.samples == 1 and lm.st3_figures.flops["prefill"] < lm.st3_figures.flops["prefill_unpruned"]
