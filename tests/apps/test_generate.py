"""`st3 generate`: a checkpoint on disk, an image, prompts, a method; answers and costs side by side."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from st3.cli import app
from st3_scenes.scenes import scene

runner = CliRunner()


def flat(output: str) -> str:
    """A command's output as one line, without the error box's frame (so wrapped messages read whole)."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    scene(2_000_000).image.save(path)
    return str(path)


def test_generate_compares_and_draws(scenes_model_dir, image_path, tmp_path):
    out, plot = tmp_path / "answers.json", tmp_path / "kept.png"
    args = ["generate", scenes_model_dir, "--image", image_path, "-p", "what is at the top left?", "-p",
            "describe the image.", "-m", "fastv:ratio=0.75", "--max-new-tokens", "4", "--repeats", "1",
            "--dtype", "fp32", "--json", str(out), "--plot", str(plot)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["method"]["knobs"]["ratio"] == 0.75
    assert len(report["method"]["answers"]) == len(report["unpruned"]["answers"]) == 2
    assert report["trace"]["visual_per_layer"][-1] == 81  # ceil(0.25 * 324)
    assert plot.stat().st_size > 5_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "/nonexistent/dir"}, "model: no directory '/nonexistent/dir'"),
        ({"image": "/nonexistent.png"}, "image: cannot read"),
        ({"method": "nope"}, "unknown method"),
        ({"knob": "ratio=7"}, "ratio: must be in"),
        ({"knob": "ratio=abc"}, "ratio: must be a finite number, got 'abc' (str)"),
        ({"knob": "start_layer=true"}, "start_layer: must be an integer, got True (bool)"),
        ({"knob": "colour=1"}, "colour: not a knob of st3; its knobs: start_layer, stride, ratio"),
    ],
)
def test_generate_rejects_bad_input_clearly(change, message, scenes_model_dir, image_path):
    values = {"model": scenes_model_dir, "image": image_path, "method": "st3", "knob": "ratio=0.5"} | change
    args = ["generate", values["model"], "--image", values["image"], "-p", "what?", "-m", values["method"],
            "--knob", values["knob"], "--max-new-tokens", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in flat(result.output)


def refuse_weights(monkeypatch):
    """Make reading any checkpoint's weights fail loudly: what is checked must be checked before."""
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error")

    for name in ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", never)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("st3:start_layer=99", "start_layer: 99 is beyond the model's last layer"), ("vtw:layer=50", "layer: 50 is")],
)
def test_generate_checks_the_method_against_the_config_before_the_weights(spec, message, scenes_model_dir, image_path,
                                                                          monkeypatch):  # fmt: skip
    refuse_weights(monkeypatch)
    args = ["generate", scenes_model_dir, "--image", image_path, "-p", "what?", "-m", spec]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in flat(result.output), result.output


def tiny_qwen_checkpoint(path, video: bool = True) -> str:
    """A tiny Qwen2.5-VL directory with a real processor: a word-level tokenizer, transformers' PIL image processor
    and (like a hub checkpoint) a video processor config, whose processor needs torchvision."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from st3.compare import _without_video
    from st3.testing import tiny_qwen_vl

    specials = ["<pad>", "<unk>", "<s>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(121)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=256,
                                      max_pixels=4096)  # fmt: skip
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "{% endfor %}")  # fmt: skip
    processor = _without_video(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    processor.save_pretrained(path)
    config = path / "processor_config.json"
    config.write_text(config.read_text().replace("Qwen2_5_VLProcessorImagesOnly", "Qwen2_5_VLProcessor"))
    if video:
        (path / "video_preprocessor_config.json").write_text(json.dumps({
            "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 4, "merge_size": 2,
            "temporal_patch_size": 2, "processor_class": "Qwen2_5_VLProcessor"}))  # fmt: skip
    tiny_qwen_vl("qwen2.5-vl", layers=2).save_pretrained(path)
    return str(path)


def test_a_qwen_checkpoint_runs_without_torchvision(tmp_path, image_path):
    """Only Qwen-VL's video processor needs torchvision: without it, the image path is built from the same
    processor class without a video slot (transformers' PIL image processor) and `st3 generate` runs."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the stock processor loads, the fallback is not used")
    from transformers import AutoProcessor

    path = tiny_qwen_checkpoint(tmp_path / "qwen")
    with pytest.raises(ImportError, match="VideoProcessor requires the Torchvision"):
        AutoProcessor.from_pretrained(path)  # what a user without torchvision gets from transformers alone
    out = tmp_path / "answers.json"
    args = ["generate", path, "--image", image_path, "-p", "w1 w2", "-p", "w3", "-m", "spread:keep=4",
            "--max-new-tokens", "2", "--repeats", "0", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["trace"]["visual_per_layer"] == [4.0, 4.0] and report["method"]["name"] == "spread"


def test_a_processor_that_cannot_load_fails_before_the_weights(tmp_path, monkeypatch):
    from transformers import AutoProcessor

    from st3.compare import load

    path = tiny_qwen_checkpoint(tmp_path / "qwen", video=False)
    (tmp_path / "qwen" / "tokenizer.json").unlink()
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(
        ImportError("Qwen2VLImageProcessor requires the Torchvision library")))  # fmt: skip
    refuse_weights(monkeypatch)
    with pytest.raises(ValueError, match="^model: Qwen2_5_VLForConditionalGeneration's processor needs torchvision"):
        load(path)


def test_load_picks_the_checkpoints_own_supported_class_and_refuses_others(tmp_path):
    from transformers import BertConfig, BertModel

    from st3.compare import load
    from st3.testing import tiny_qwen_vl

    qwen = tmp_path / "qwen"
    tiny_qwen_vl("qwen2.5-vl", layers=2).save_pretrained(qwen)
    with pytest.raises(ValueError, match="cannot load .*'s processor"):  # no processor: refused before the weights
        load(str(qwen))
    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(bert)
    with pytest.raises(ValueError, match="st3 does not support BertModel; supported: LlavaForConditionalGeneration"):
        load(str(bert))


def test_compression_is_refused_before_loading_with_the_familys_own_reason(tmp_path):
    """LLaVA-NeXT has a [CLS] token: VisionZip is refused there for its anyres layout, not for a missing [CLS]."""
    import st3
    from st3.compare import load
    from st3.testing import tiny_llava_next

    config = tiny_llava_next(layers=1).config
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^method: VisionZip .*LLaVA-NeXT has a \\[CLS\\] token, but .*newline") as err:
        load(str(tmp_path), method=st3.VisionZip())
    assert "does not have" not in str(err.value)


def _families():
    from st3.adapters import ADAPTERS

    return [pytest.param(adapter, id=adapter.__name__) for adapter in ADAPTERS]


@pytest.mark.parametrize("adapter", _families())
def test_generate_runs_a_tiny_checkpoint_of_each_family_with_its_own_processor(adapter, tmp_path, image_path):
    """Each family's tiny model saved with its real processor class (where that imports without torchvision) runs
    under `st3 generate`; where the processor needs torchvision, the family says so."""
    import importlib.util

    from st3.adapters import adapter_for

    model = adapter.tiny(layers=2)
    try:
        processor = adapter.tiny_processor(model)
    except NotImplementedError as error:
        assert "torchvision" in str(error) and importlib.util.find_spec("torchvision") is None
        return
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    out = tmp_path / "answers.json"
    args = ["generate", str(tmp_path), "--image", image_path, "-p", "w1 w2", "-p", "w3", "-m", "spread:keep=4",
            "--max-new-tokens", "2", "--repeats", "0", "--json", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["trace"]["visual_per_layer"] == [4.0, 4.0] and len(report["unpruned"]["answers"]) == 2
    assert type(adapter_for(model)) is adapter
