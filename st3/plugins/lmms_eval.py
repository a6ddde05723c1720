"""lmms-eval plugin: every st3 method on lmms-eval's own model classes, registered by entry point (no fork).

    pip install "st3[lmms]"     # see docs/lmms-eval.md for a clean install (torchvision must not be importable)
    lmms-eval --model st3_llava_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=st3,ratio=0.3 --tasks mme
    lmms-eval --model st3_qwen2_5_vl --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,budget=0.33 --tasks mme

lmms-eval (>= 0.7) loads the manifests of the entry-point group `lmms_eval.models` (see pyproject.toml); each
`st3_<id>` model is lmms-eval's class `<id>` (which loads the model and its processor) with `St3Model` and
`BatchedHF` in front of it, built on first use, so adding a family is one row of `FAMILIES`: `llava_hf`
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision), `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `gemma3`, `mistral3_vl`,
`internvl_hf`, and `idefics3` (Idefics3, SmolVLM: st3's own loader, `st3.plugins.lmms_hf`, as lmms-eval has
none). Model arguments, besides the wrapped class's own:

- `method=NAME` (default `st3`; `none` runs unpruned), any registered method (`st3.methods()`);
- every knob of that method by name (`ratio=0.3`, `query=text`, ...), validated by the method itself;
- `budget=0.33`: the share of the visual tokens kept per layer on average, matched as `st3 eval --budget`
  matches it (layer knobs scaled to the model's depth, then `st3.match`), per batch, to the visual tokens the
  processor's output holds (counted by the family's adapter: Qwen-VL's vary with the image, NeXT's with its
  tiles); never to an assumed count;
- `figures=PATH`: where to write the run's st3 figures (a `.json` file, or a directory to write into).

Bad arguments (unknown method, unknown or invalid knob) raise a ValueError before the model is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import st3

#: lmms-eval model id -> its class (which loads the model and processor); st3's batched generate answers the
#: requests. Adding a family whose st3 adapter exists is one row here (docs/lmms-eval.md: which id serves which).
FAMILIES: dict[str, str] = {
    "llava_hf": "lmms_eval.models.simple.llava_hf.LlavaHf",  # LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision
    "qwen2_vl": "lmms_eval.models.simple.qwen2_vl.Qwen2_VL",
    "qwen2_5_vl": "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL",
    "qwen3_vl": "lmms_eval.models.simple.qwen3_vl.Qwen3_VL",
    "gemma3": "lmms_eval.models.simple.gemma3.Gemma3",
    "mistral3_vl": "lmms_eval.models.simple.mistral3_vl.Mistral3_VL",
    "internvl_hf": "lmms_eval.models.chat.internvl_hf.InternVLHf",  # InternVLForConditionalGeneration; batch 1
    "idefics3": "st3.plugins.lmms_hf.ImageTextToText",  # st3's own: Idefics3, SmolVLM (no lmms-eval class loads them)
}
PLUGIN_ARGS = ("method", "budget", "figures")
IMAGE_TOKEN = "<image>"


def class_name(model_id: str) -> str:
    """`llava_hf` -> `St3LlavaHf`, the attribute of this module that lmms-eval imports."""
    return "St3" + "".join(part.capitalize() for part in model_id.split("_"))


def manifests() -> list:
    """The entry-point payload: one `ModelManifest` per wrapped family (`st3_<id>`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=f"st3_{model_id}", simple_class_path=f"{__name__}.{class_name(model_id)}")
        for model_id in FAMILIES
    ]


def __getattr__(name: str):
    """Build `St3<Family>` on first access: lmms-eval's class with `St3Model` and `BatchedHF` in front."""
    for model_id, path in FAMILIES.items():
        if name == class_name(model_id):
            module, _, base_name = path.rpartition(".")
            base = getattr(importlib.import_module(module), base_name)
            attributes = {"__module__": __name__, "family": model_id, "__doc__": St3Model.__doc__}
            cls = type(name, (St3Model, BatchedHF, base), attributes)
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- figures
@dataclass
class Figures:
    """Totals over every forward call of a run, summed from each call's `Trace.summary()`."""

    samples: int = 0
    calls: int = 0
    visual_sum: float = 0.0
    visual_per_layer_sum: list[float] = field(default_factory=list)
    prompt_visual: int = 0
    flops: dict[str, int] = field(default_factory=dict)
    kv_bytes: int | None = 0
    """None once a call's cache could not be measured (the ratio is then not shown)."""
    kv_bytes_unpruned: int = 0
    notes: set[str] = field(default_factory=set)
    settings: set[str] = field(default_factory=set)  # the knobs of each method applied (JSON)
    wall_seconds: float = 0.0
    requests: int = 0

    def add(self, summary: dict) -> None:
        batch = summary["batch_size"]
        self.samples += batch
        self.calls += 1
        self.visual_sum += summary["mean_visual_per_layer"] * batch
        layers = [v * batch for v in summary["visual_per_layer"]]
        if not self.visual_per_layer_sum:
            self.visual_per_layer_sum = [0.0] * len(layers)
        self.visual_per_layer_sum = [a + b for a, b in zip(self.visual_per_layer_sum, layers)]
        self.prompt_visual += sum(summary["visual_tokens"])
        for key, value in summary["flops"].items():
            self.flops[key] = self.flops.get(key, 0) + value
        if summary["kv_bytes"] is None or self.kv_bytes is None:  # one call's cache was not measured: none is
            self.kv_bytes = None
        else:
            self.kv_bytes += summary["kv_bytes"]
        self.kv_bytes_unpruned += summary["kv_bytes_unpruned"]
        if summary["note"]:
            self.notes.add(summary["note"])

    def digest(self) -> dict:
        def ratio(a: str, b: str) -> float:
            return self.flops[a] / self.flops[b] if self.flops.get(b) else 1.0

        n = max(self.samples, 1)
        return {
            "requests": self.requests,
            "forward_calls": self.calls,
            "samples": self.samples,
            "visual_tokens_per_sample": self.prompt_visual / n,
            "mean_visual_per_layer": self.visual_sum / n,
            "visual_per_layer": [v / n for v in self.visual_per_layer_sum],
            "prefill_flops_ratio": ratio("prefill", "prefill_unpruned"),
            "total_flops_ratio": ratio("total", "total_unpruned"),
            "kv_ratio": None if self.kv_bytes is None else (
                self.kv_bytes / self.kv_bytes_unpruned if self.kv_bytes_unpruned else 1.0),
            "flops": dict(self.flops),
            "wall_seconds": self.wall_seconds,
            "notes": sorted(self.notes),
        }


# --------------------------------------------------------------------------------------------- model
def split_args(method: str, kwargs: dict, base_params: set[str], family: str) -> tuple[st3.Method | None, dict, dict]:
    """(method built from its knobs, those knobs, the wrapped class's own arguments), or a ValueError that says
    what is wrong."""
    if method.lower() == "none":
        knobs = {k: v for k, v in kwargs.items() if k not in base_params}
        if knobs:
            raise ValueError(f"st3_{family}: method=none takes no knobs, got {sorted(knobs)}")
        return None, {}, kwargs
    try:  # a renamed method (e.g. `uniform`, now `lattice`) still builds, with a DeprecationWarning
        valid = set(st3.get(method).knobs())
    except ValueError:
        names = ", ".join(st3.methods())
        raise ValueError(f"st3_{family}: unknown method {method!r}; available: {names}, none") from None
    knobs = {k: v for k, v in kwargs.items() if k not in base_params}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise ValueError(
            f"st3_{family}: unknown model_args {unknown}: not knobs of {method} ({', '.join(sorted(valid))}) "
            f"nor arguments of {family} ({', '.join(sorted(base_params))}) nor st3's ({', '.join(PLUGIN_ARGS)})"
        )
    try:
        built = st3.get(method, **knobs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"st3_{family}: method={method}: {error}") from None
    return built, knobs, {k: v for k, v in kwargs.items() if k in base_params}


class St3Model:
    """An lmms-eval model with an st3 method applied to every request (model_args: see st3.plugins.lmms_eval)."""

    family: str = "?"

    def __init__(self, method: str = "st3", budget: float | None = None, figures: str | None = None, **kwargs):
        base = next(c for c in type(self).__mro__[1:] if c not in (St3Model, BatchedHF))
        base_params = {p for p in inspect.signature(base.__init__).parameters if p not in ("self", "kwargs")}
        self.st3_method, self.st3_knobs, base_kwargs = split_args(str(method), kwargs, base_params, self.family)
        if budget is not None:
            budget = float(budget)
            if self.st3_method is None or not 0.0 < budget <= 1.0:
                raise ValueError(f"st3_{self.family}: budget must be in (0, 1] and needs a method, got {budget}")
        if "device" in base_params and base_kwargs.get("device") is None:
            base_kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if "device_map" in base_params and "device_map" not in base_kwargs and single_process():
            # llava_hf passes its default device_map="" to from_pretrained, which transformers 5 rejects, and the
            # Qwen/Gemma classes default to "auto"; under data parallel they pick cuda:<rank> themselves
            base_kwargs["device_map"] = str(base_kwargs["device"])
        super().__init__(**base_kwargs)
        self.st3_budget, self.st3_figures_path = budget, figures
        self.st3_pretrained = base_kwargs.get("pretrained")
        self.st3_matched: dict[tuple, st3.Method | None] = {}  # a batch's visual counts -> its method
        if self.st3_method is not None:
            self.st3_method(self.model)  # checks the model family and the method's depth now, not mid-run
        if budget is not None:
            from st3.adapters import adapter_for

            per_image = adapter_for(self.model).tokens_per_image()
            if per_image is not None:  # a budget out of reach fails now, not mid-run (one image, any text)
                matched(self.st3_method.name, self.st3_knobs, budget, self.model, [per_image], [60])
        self.st3_figures = Figures()

    def _st3_for(self, inputs) -> st3.Method | None:
        """The method for one batch: as given, or matched to `budget` from the visual tokens its inputs hold.

        Visual tokens per layer do not depend on the text nor on the order of the samples, so the setting is
        cached per sorted visual counts (a new one costs about 0.5 s of planning for 16 samples on one core).
        """
        from st3.adapters import adapter_for

        if self.st3_budget is None or self.st3_method is None:
            return self.st3_method
        visual, text = adapter_for(self.model).token_counts(inputs)
        key = tuple(sorted(visual))
        if key not in self.st3_matched:
            self.st3_matched[key] = matched(self.st3_method.name, self.st3_knobs, self.st3_budget, self.model,
                                            visual, text)  # fmt: skip
        return self.st3_matched[key]

    @contextmanager
    def _st3_applied(self, requests: int, inputs):
        """Apply the method (matched to this batch's inputs under `budget=`) around one batch of requests; add
        every forward call's trace to the figures."""
        start, last = time.perf_counter(), []
        method = self._st3_for(inputs)
        if method is not None:
            self.st3_figures.settings.add(json.dumps(method.knobs(), sort_keys=True, default=str))

        def collect(module, args, output) -> None:
            trace = method.trace
            if not last or last[0] is not trace:
                if last:
                    self.st3_figures.add(last[0].summary())
                last[:] = [trace]

        try:
            if method is None:
                yield
            else:
                hook = self.model.register_forward_hook(collect)
                try:
                    with method(self.model):
                        yield
                finally:
                    hook.remove()
                    if last:
                        self.st3_figures.add(last[0].summary())
        finally:
            self.st3_figures.wall_seconds += time.perf_counter() - start
            self.st3_figures.requests += requests
            self.write_figures()

    def st3_report(self) -> dict:
        """The run's figures: method and knobs (each setting matched under `budget=`), visual tokens per layer,
        FLOPs and KV ratios, wall time."""
        method = self.st3_method
        settings = [json.loads(s) for s in sorted(self.st3_figures.settings)]
        return {
            "model": f"st3_{self.family}",
            "pretrained": self.st3_pretrained,
            "method": "none" if method is None else method.name,
            "knobs": settings[0] if len(settings) == 1 else ({} if method is None else method.knobs()),
            "budget": self.st3_budget,
            "matched_knobs": settings if self.st3_budget is not None else None,
            "rank": getattr(self, "rank", 0),
            "st3_version": st3.__version__,
            **self._digest(),
        }

    def _digest(self) -> dict:
        digest = self.st3_figures.digest()
        if self.st3_method is None:  # no trace when nothing is applied: only the counts of the run are known
            keep = ("requests", "wall_seconds", "notes")
            digest = {k: (v if k in keep else None) for k, v in digest.items()}
        return digest

    def write_figures(self) -> Path | None:
        """Write the figures as JSON to `figures=` (a directory gets `st3_figures.json`; rank r > 0 a suffix)."""
        if not self.st3_figures_path:
            return None
        path = Path(self.st3_figures_path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "st3_figures.json"
        rank = getattr(self, "rank", 0)
        if rank:
            path = path.with_name(f"{path.stem}.rank{rank}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.st3_report(), indent=2, default=str))
        return path


def single_process() -> bool:
    from accelerate import PartialState

    return PartialState().num_processes == 1


def matched(name: str, knobs: dict, budget: float, model, visual: list[int], text: list[int]) -> st3.Method | None:
    """Method `name` with `knobs` at `budget` (share of visual tokens per layer) for samples of `visual` and `text`
    tokens (counted in the processor's output by the family's adapter), configured exactly as `st3 eval --budget`
    does (None at a budget of 1, or for a batch without images: unpruned)."""
    from st3.adapters import adapter_for
    from st3.budget import at_budget

    if not any(visual):
        return None
    try:
        return at_budget(name, knobs, budget, adapter_for(model).shape, visual, text)
    except ValueError as error:
        raise ValueError(f"budget={budget}: {error}") from None


# ------------------------------------------------------------------------------- batched HF generate
class BatchedHF:
    """`generate_until` and `loglikelihood` for models with a Hugging Face processor, in left-padded batches.

    The wrapped class loads the model and its processor; this answers lmms-eval's (simple) requests the same
    way for every family: the processor's chat template rendered with the images as content (what the model was
    trained on), up to `batch_size` requests with the same generation arguments at once, the method applied
    (and matched to the batch under `budget=`) around each batch. lmms-eval's classes differ in how they render
    prompts (`llava_hf` the image as text, one request at a time; the Qwen ones through qwen_vl_utils) and
    some catch errors; here errors propagate: an answer st3 cannot compute is refused, never scored as empty.
    """

    is_simple = True  # lmms-eval sends (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests

    @property
    def _st3_processor(self):
        """The wrapped class's processor (`llava_hf`: `_image_processor`, Mistral3: `_processor`, else `processor`)."""
        for name in ("_image_processor", "processor", "_processor"):
            if getattr(self, name, None) is not None:
                return getattr(self, name)
        raise ValueError(f"st3_{self.family}: the wrapped class loaded no processor")

    def _prompt(self, context: str, images: int) -> str:
        processor = self._st3_processor
        template = getattr(self, "chat_template", None) or getattr(processor, "chat_template", None)
        if template is None:
            raise ValueError(f"st3_{self.family}: the processor has no chat template; pass chat_template=...")
        text = context.replace(IMAGE_TOKEN, "").strip()
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def _inputs(self, texts: list[str], images: list[list]):
        kwargs = {"images": images} if any(images) else {}
        processor = self._st3_processor
        processor.tokenizer.padding_side = "left"  # st3 refuses right padding
        inputs = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        return inputs.to(self.device, self.model.dtype)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if any(isinstance(v, str) for v in visuals):
            raise NotImplementedError(f"st3_{self.family}: video requests are not supported; use images")
        return [v.convert("RGB") for v in visuals]

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args for i in chunk])):
                    results[i] = text
        return results

    def _generate(self, batch: list[tuple]) -> list[str]:
        gen = dict(batch[0][1])
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        texts, images = [], []
        for context, _, doc_to_visual, doc_id, task, split in batch:
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            texts.append(self._prompt(context, len(visuals)))
            images.append(visuals)  # per sample: Gemma 3's processor checks each prompt's images
        inputs = self._inputs(texts, images)
        with self._st3_applied(len(batch), inputs):
            return self._decoded(inputs, gen, until)

    def _decoded(self, inputs, gen: dict, until: list[str]) -> list[str]:
        temperature = float(gen.get("temperature", 0) or 0)
        sample = bool(gen.get("do_sample", temperature > 0))
        options = {"temperature": temperature, "top_p": gen.get("top_p")} if sample else {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        out = self.model.generate(
            **inputs,
            max_new_tokens=int(gen.get("max_new_tokens", 1024)),
            do_sample=sample,
            num_beams=int(gen.get("num_beams", 1) or 1),
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=self.eot_token_id,
            **options,
        )
        decoded = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = []
        for text in decoded:
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it), one request a time.

        Pruning shortens the sequence the model returns logits for, but never removes text: the continuation
        and the token before it are the last rows, so their logits are read from the end.
        """
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self._prompt(context, len(visuals))
            context_ids = self._inputs([prompt], [visuals])["input_ids"]
            inputs = self._inputs([prompt + continuation], [visuals])
            ids = inputs["input_ids"]
            n = ids.shape[1] - context_ids.shape[1]
            if n <= 0 or not torch.equal(ids[0, : context_ids.shape[1]], context_ids[0]):
                raise ValueError(
                    f"st3_{self.family}: the continuation {continuation!r} does not tokenize as a suffix of its "
                    "context; its log-likelihood would not be that of the continuation alone"
                )
            with self._st3_applied(1, inputs):
                logits = self.model(**inputs).logits[0, -n - 1 : -1].float()
            target = ids[0, -n:].to(logits.device)
            logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
            results.append((float(logprob), bool((logits.argmax(-1) == target).all())))
        return results
