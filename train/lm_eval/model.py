"""The lm-eval model type `llama-jax`: our checkpoints under EleutherAI's LM Evaluation Harness.

    lm = LlamaJaxLM("runs/sft", layout="fsdp", dtype="bfloat16", batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    # or, once this module is imported: --model llama-jax --model_args checkpoint=DIR,layout=fsdp

Text becomes ids here (lm-eval's `TemplateLM` splits a context from its
continuation); `scoring.Scorer` and `generation.Generator` do the work on
the mesh. Conventions, as lm-eval's Hugging Face model has them for Llama:
every context starts with BOS (`add_bos_token`), an empty context is BOS
alone, and a rolling log-likelihood scores every token of a document
(encoded without BOS) given BOS and up to `max_length` tokens before it
(lm_eval.utils.get_rolling_token_windows, windows made disjoint).
Sequences longer than `max_length` lose their start. Generation is greedy
unless a task asks for `do_sample`; it ends at the tokenizer's stop ids,
`max_gen_toks` or the first `until` string, which is cut from the text.

Weights load on the first request, so lm-eval finds a bad task (or a
dataset it cannot reach) before a large model is read.
"""

from __future__ import annotations

import inspect
import logging

import lm_eval.models  # noqa: F401  (lm-eval fills its registry only while it is empty: llama-jax
#                        registered first would hide lm-eval's own models, local-completions among them)
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama_jax.cli import known_names
from llama_jax.config import ConfigError
from llama_jax.decoding.sampling import Sampling
from llama_jax.formats.weights import load_params, resolve, stored_config
from llama_jax.params import model_for
from llama_jax.text.tokenizer import find_tokenizer, load_tokenizer
from sharding.place import Placement, placement_for
from train.lm_eval.generation import Generator
from train.lm_eval.scoring import Scorer

DEFAULT_BATCH = 16
log = logging.getLogger(__name__)


@register_model("llama-jax")
class LlamaJaxLM(TemplateLM):
    """An lm-eval model over one of our checkpoints, placed on a layout.

    checkpoint: our checkpoint, a training run directory (its latest step;
    a LoRA run comes with its base), or a Hugging Face directory.
    tokenizer: file or directory (default: beside the checkpoint).
    layout: a layout name, over all devices; None: the first device alone.
    dtype: "bfloat16" or "float32" compute and parameter dtype (default:
    the checkpoint's). batch_size: rows per forward pass, rounded up to
    divide over the layout's batch axes ("auto": 16). max_length: the
    longest sequence read (default: the model's context). max_gen_toks:
    new tokens when a task sets none. device, max_batch_size: accepted for
    lm-eval's command line, unused. Raises ValueError (one line) on a bad
    setting or a checkpoint that is not there.
    """

    def __init__(self, checkpoint, tokenizer=None, layout=None, dtype=None, batch_size=DEFAULT_BATCH,
                 max_length=None, max_gen_toks=256, add_bos_token=True, device=None, max_batch_size=None):
        stored = stored_config(str(checkpoint))
        if stored.vision is not None:
            raise ConfigError(f"{checkpoint}: a vision model; llama-jax evaluates text models only")
        if dtype not in (None, "bfloat16", "float32"):
            raise ConfigError(f"dtype: {dtype!r} is not one of bfloat16, float32")
        config = stored.replace(**({"dtype": dtype, "param_dtype": dtype} if dtype else {}))
        tokenizer = load_tokenizer(str(tokenizer) if tokenizer else find_tokenizer(resolve(str(checkpoint))[1], up=2))
        self._setup(config, placement_for(config, layout or None), tokenizer, batch_size, max_length,
                    max_gen_toks, add_bos_token)
        self.checkpoint = str(checkpoint)

    @classmethod
    def from_parts(cls, config, placement: Placement, tokenizer, params=None, *, batch_size=DEFAULT_BATCH,
                   max_length=None, max_gen_toks=256, add_bos_token=True) -> "LlamaJaxLM":
        """A model over parameters already in memory (a training run's live ones): `config`,
        their `placement` (the run's mesh and rules) and a loaded `tokenizer`; nothing is read
        from disk. `params` placed as `placement.param_shardings()` says, or set later
        (`lm.params = ...`, e.g. at every evaluation of a run). Other settings as `__init__`'s."""
        lm = cls.__new__(cls)
        lm._setup(config, placement, tokenizer, batch_size, max_length, max_gen_toks, add_bos_token)
        lm.checkpoint, lm._params = None, params
        return lm

    def _setup(self, config, placement, tokenizer, batch_size, max_length, max_gen_toks, add_bos_token):
        """Check the settings; build the scorer and the generator (nothing compiles yet)."""
        super().__init__()
        if config.vision is not None:
            raise ConfigError("a vision model; llama-jax evaluates text models only")
        self.config = config.replace(remat="none")  # no gradients here: nothing to recompute
        self.tokenizer = tokenizer
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(f"tokenizer: {self.tokenizer.vocab_size} ids, more than the model's vocab_size "
                              f"{self.config.vocab_size} (a tokenizer of another model?)")
        if isinstance(batch_size, str):  # lm-eval's --batch_size is a string: "8", "auto" or "auto:N"
            batch_size = DEFAULT_BATCH if batch_size.startswith("auto") else int(batch_size) if batch_size.isdigit() \
                else batch_size
        self.batch_size = _positive("batch_size", batch_size)
        self._max_length = _positive("max_length", max_length or self.config.max_seq_len)
        if self._max_length > self.config.max_seq_len:
            raise ConfigError(f"max_length: {self._max_length} is over the model's context of "
                              f"{self.config.max_seq_len} tokens")
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self.placement = placement
        model = model_for(self.config)
        self.scorer = Scorer(model, self.placement, self.batch_size, self._max_length)
        self.generator = Generator(model, self.placement, self.batch_size, self._max_length)
        self._params = None

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """As lm-eval's, but a setting in model_args wins over the command line's defaults
        (lm-eval always passes its own batch_size, 1 unless --batch_size says otherwise)."""
        known = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:
            raise ConfigError(f"model_args: {', '.join(unknown)} is not a llama-jax setting "
                              f"{known_names(unknown[0], known, 'docs/evaluation.md')}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

    @property
    def params(self):
        """The weights: given (`from_parts`), or read from the checkpoint and placed on the first call."""
        if self._params is None:
            if self.checkpoint is None:
                raise ValueError("LlamaJaxLM.from_parts: no params given (set lm.params first)")
            self._params = load_params(self.checkpoint, self.config, self.placement.param_shardings())
        return self._params

    @params.setter
    def params(self, params):
        self._params = params

    # ------------------------------------------------------------ text and ids (TemplateLM's interface)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # what a Llama model always starts from

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of `string`, with BOS first when `add_special_tokens` (None: `add_bos_token`);
        a string that starts with BOS's own text gets the BOS id, not that text encoded."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos_text = self.tokenizer.decode([self.tokenizer.bos_id])
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            string, bos = string[len(bos_text):], True
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, ids) -> str:
        # A model's vocabulary may be padded past the tokenizer's; such ids carry no text.
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

    # ------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-prob, greedy) of each (key, context ids, continuation ids); a key other than
        None is lm-eval's (context, continuation), recorded in its cache."""
        rows = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]  # left-truncated, as lm-eval's hf
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        results = self.scorer(self.params, rows, progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of each document, every token given BOS and what precedes it
        (at most max_length tokens of context): one scoring request per window."""
        windows, owners = [], []
        for doc, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for context, predicted in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owners.append(doc)
        totals = [0.0] * len(requests)
        for doc, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[doc] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The text generated for each (context, gen_kwargs) request, cut before the first
        `until` string; requests with the same settings are generated together."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._settings(req.args[1]), []).append(i)
        texts = [""] * len(requests)
        for (until, max_new, sampling), members in groups.items():
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length "
                                  f"{self.max_length}")
            # An empty context (without add_bos_token) starts from BOS, as a loglikelihood's does.
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-(self.max_length - max_new):]
                       for i in members]

            def finished(row, ids, until=until):
                text = self.tok_decode(ids)
                return any(stop in text for stop in until)

            outputs = self.generator(self.params, prompts, max_new, sampling, self.tokenizer.stop_ids, finished)
            for i, ids in zip(members, outputs):
                texts[i] = cut_at_stops(self.tok_decode(ids), until)
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        return texts

    def _settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int, Sampling]:
        """(until strings, max new tokens, Sampling) from a task's generation kwargs."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = tuple(stop for stop in ((until,) if isinstance(until, str) else until) if stop)
        max_new = _positive("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks))
        sampling = Sampling()
        if kwargs.pop("do_sample", False):
            sampling = Sampling(float(kwargs.pop("temperature", 1.0)), kwargs.pop("top_k", None),
                                kwargs.pop("top_p", None))
        ignored = sorted(set(kwargs) - {"temperature", "top_k", "top_p"})
        if ignored:
            log.warning("llama-jax ignores the generation settings %s", ", ".join(ignored))
        return until, max_new, sampling


def cut_at_stops(text: str, until) -> str:
    """`text` up to the earliest occurrence of any string of `until` (all of it if none occurs)."""
    cuts = [text.find(stop) for stop in until if stop and stop in text]
    return text[:min(cuts)] if cuts else text


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
    return value
