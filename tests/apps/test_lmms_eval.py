"""The lmms-eval plugin: entry point, model_args, the offline scenes task, figures, agreement with `st3 eval`;
every family's tiny checkpoint through its `st3_<id>` class, batched, at a budget of its real visual tokens."""

from __future__ import annotations

import importlib
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


def evaluate(tasks, model_args: str, batch_size: int, model: str = "st3_llava_hf") -> dict:
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=model,
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


# ------------------------------------------------------------------------------------------ every family
def word_tokenizer(specials: list[str], **named):
    """A word-level tokenizer: `<pad>` 0, `</s>` 1, `<unk>` 2, then `specials` from id 3 (the tiny models'
    image token) and words up to the tiny models' 128 ids; `named` special tokens (`image_token=...`) by name."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    head = ["<pad>", "</s>", "<unk>", *specials]
    vocab = {word: i for i, word in enumerate(head + [f"w{i}" for i in range(128 - len(head))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens(head)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   extra_special_tokens=named, padding_side="left")  # fmt: skip


def template(image: str) -> str:
    """A chat template that writes the family's image placeholder for each image of the user's turn."""
    return (
        "{% for message in messages %}USER: {% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image}{{% else %}}{{{{ c['text'] }}}}{{% endif %}}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )


def image_only(processor_class):
    """`processor_class` without its video half: video processors need torchvision, which the lmms venv lacks
    (docs/lmms-eval.md), so there a stock Qwen-VL / OneVision / InternVL processor cannot load; images only."""

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnly


def family_checkpoint(family: str):
    """(tiny model, its processor) of `family`, built offline; the processor is the family's own class (its image
    half only where the video half needs torchvision: `image_only`)."""
    import transformers as tf

    from st3 import testing

    if family in testing.QWEN_FAMILIES:
        specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        processor = {"qwen2-vl": tf.Qwen2VLProcessor, "qwen2.5-vl": tf.Qwen2_5_VLProcessor,
                     "qwen3-vl": tf.Qwen3VLProcessor}[family]  # fmt: skip
        image_processor = tf.Qwen2VLImageProcessorPil(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
        )
        return testing.tiny_qwen_vl(family), image_only(processor)(
            image_processor=image_processor, tokenizer=word_tokenizer(specials),
            chat_template=template("<|vision_start|><|image_pad|><|vision_end|>"),
        )  # fmt: skip
    if family == "llava-next":
        image_processor = tf.LlavaNextImageProcessorPil(
            size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12},
            image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]],
        )  # fmt: skip
        return testing.tiny_llava_next(), tf.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=word_tokenizer(["<image>"], image_token="<image>"), patch_size=4,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=template("<image>"),
        )  # fmt: skip
    if family == "llava-onevision":
        image_processor = tf.LlavaOnevisionImageProcessorPil(
            size={"height": 12, "width": 12}, image_grid_pinpoints=[[12, 24], [24, 12], [24, 24]]
        )
        return testing.tiny_llava_onevision(), image_only(tf.LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=word_tokenizer(["<image>", "<video>"], image_token="<image>"),
            num_image_tokens=9, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
            chat_template=template("<image>"),
        )  # fmt: skip
    if family == "gemma3":
        tokenizer = word_tokenizer(["<image_soft_token>", "<start_of_image>", "<end_of_image>"],
                                   image_token="<image_soft_token>", boi_token="<start_of_image>",
                                   eoi_token="<end_of_image>")  # fmt: skip
        return testing.tiny_gemma3(), tf.Gemma3Processor(
            image_processor=tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
            image_seq_length=16, chat_template=template("<start_of_image>"),
        )  # fmt: skip
    if family == "mistral3":
        return testing.tiny_mistral3(), tf.PixtralProcessor(
            image_processor=tf.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=4),
            tokenizer=word_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]), patch_size=4, spatial_merge_size=2,
            image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
            chat_template=template("[IMG]"),
        )  # fmt: skip
    if family == "internvl":
        names = dict(context_image_token="<IMG_CONTEXT>", start_image_token="<img>", end_image_token="</img>",
                     video_token="<video>")  # fmt: skip
        tokenizer = word_tokenizer(list(names.values()), **names)
        image_processor = tf.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True,
                                                      min_patches=1, max_patches=4)  # fmt: skip
        return testing.tiny_internvl(), image_only(tf.InternVLProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16,
            chat_template=template("<IMG_CONTEXT>"),
        )  # fmt: skip
    if family in ("idefics3", "smolvlm"):
        rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        specials = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *rows]
        tokenizer = word_tokenizer(specials, image_token="<image>")
        smol = family == "smolvlm"
        image_processor = (tf.SmolVLMImageProcessorPil if smol else tf.Idefics3ImageProcessorPil)(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
        )
        processor = image_only(tf.SmolVLMProcessor) if smol else tf.Idefics3Processor
        return testing.tiny_idefics3(smolvlm=smol), processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16, chat_template=template("<image>"),
        )  # fmt: skip
    raise AssertionError(family)


FAMILY_CASES = [  # (st3.testing family, lmms-eval model id, batch size)
    ("llava-next", "llava_hf", 2), ("llava-onevision", "llava_hf", 2), ("qwen2-vl", "qwen2_vl", 2),
    ("qwen2.5-vl", "qwen2_5_vl", 2), ("qwen3-vl", "qwen3_vl", 2), ("gemma3", "gemma3", 2),
    ("mistral3", "mistral3_vl", 2), ("internvl", "internvl_hf", 1), ("idefics3", "idefics3", 2),
    ("smolvlm", "idefics3", 2),
]  # fmt: skip


def picture(size: tuple[int, int], seed: int):
    from PIL import Image

    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@pytest.mark.parametrize(("family", "model_id", "batch"), FAMILY_CASES)
def test_every_family_prunes_at_the_budget_of_its_own_visual_tokens(family, model_id, batch, tmp_path, monkeypatch):
    """Each family's tiny checkpoint loads through its `st3_<id>` class offline, answers requests in batches, and
    `budget=0.5` keeps half of the visual tokens its processor's output really holds (images of three sizes:
    16 to 40 tokens on Qwen-VL, anyres tiles on NeXT/OneVision, crops on InternVL), not half of LLaVA's 576."""
    from st3.adapters import adapter_for

    if family == "mistral3":
        pytest.importorskip("torchvision", reason="transformers declares PixtralProcessor itself torchvision-only "
                                                  "(absent from the lmms venv)")
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLM's processor needs num2words")
        pytest.importorskip("torchvision", reason="SmolVLM's processor reads its video half (torchvision) in "
                                                  "apply_chat_template")
    model, processor = family_checkpoint(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    if type(processor).__name__ == "ImageOnly":  # AutoProcessor would load its video half too: hand it this one
        module = importlib.import_module(plugin.FAMILIES[model_id].rpartition(".")[0])
        monkeypatch.setattr(module, "AutoProcessor", SimpleNamespace(from_pretrained=lambda *args, **kw: processor))
    kwargs = {"min_pixels": 16 * 16, "max_pixels": 64 * 64} if family.startswith("qwen") else {}
    cls = getattr(plugin, plugin.class_name(model_id))
    figures = tmp_path / "figures.json"
    lm = cls(pretrained=str(tmp_path), method="st3", budget=0.5, batch_size=batch, figures=str(figures), **kwargs)
    docs = [{"image": picture(size, seed)} for seed, size in enumerate(((32, 32), (48, 32), (40, 64)))]
    lm.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 2, "until": ["\n"]}
    visuals = lambda doc: [doc["image"]]  # noqa: E731
    requests = [SimpleNamespace(args=("what is shown?", gen, visuals, i, "t", "test")) for i in range(3)]
    answers = lm.generate_until(requests)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)

    texts = [lm._prompt("what is shown?", 1)] * 3
    ids = lm._inputs(texts, [[doc["image"]] for doc in docs])["input_ids"]
    visual = adapter_for(lm.model).visual_mask(ids).sum(-1).tolist()  # what the processor really made
    report = json.loads(figures.read_text())
    assert report["model"] == f"st3_{model_id}" and report["budget"] == 0.5 and report["samples"] == 3
    assert report["forward_calls"] == -(-3 // batch) and report["requests"] == 3
    assert report["visual_tokens_per_sample"] == pytest.approx(sum(visual) / 3)
    assert report["mean_visual_per_layer"] == pytest.approx(0.5 * sum(visual) / 3, abs=1.0)
    assert report["prefill_flops_ratio"] < 1 and report["matched_knobs"]


@pytest.mark.parametrize("model_id", sorted(plugin.FAMILIES))
def test_every_family_refuses_bad_model_args_before_loading(model_id):
    assert f"st3_{model_id}" in {m.model_id for m in plugin.manifests()}
    cls = getattr(plugin, plugin.class_name(model_id))
    with pytest.raises(ValueError, match="unknown model_args \\['ratoi'\\]: not knobs of fastv"):
        cls(pretrained="/nonexistent/model", method="fastv", ratoi=0.5)


def test_lmms_evals_evaluator_runs_a_qwen_vl_family_at_its_own_budget(tasks, tmp_path, monkeypatch):
    """The scenes task through lmms-eval's evaluator on a tiny Qwen2.5-VL (visual tokens per image set by the
    processor's pixel bounds): every question answered in batches of 3, half of its real visual tokens kept."""
    model, processor = family_checkpoint("qwen2.5-vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    module = importlib.import_module(plugin.FAMILIES["qwen2_5_vl"].rpartition(".")[0])
    monkeypatch.setattr(module, "AutoProcessor", SimpleNamespace(from_pretrained=lambda *args, **kw: processor))
    figures = tmp_path / "figures.json"
    args = f"pretrained={tmp_path},method=st3,budget=0.5,min_pixels=256,max_pixels=4096,figures={figures}"
    result = evaluate(tasks, args, batch_size=3, model="st3_qwen2_5_vl")
    assert len(result["samples"]["st3_scenes_qa"]) == N
    report = json.loads(figures.read_text())
    assert report["samples"] == N and report["forward_calls"] == 3 and 0 < report["visual_tokens_per_sample"] != 576
    assert report["mean_visual_per_layer"] == pytest.approx(0.5 * report["visual_tokens_per_sample"], abs=1.0)
