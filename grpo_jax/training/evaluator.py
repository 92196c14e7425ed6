"""Held-out evaluation: greedy pass@1 plus pass@k and maj@k from temperature samples.

Prompts are tokenised once; generation runs in fixed-size chunks so the sampler compiles once per
setting. Correctness is decided on the host from decoded text (`correct_fn(text, example) -> bool`),
the same way for every task: math-style answers through `extract_answer` + `is_equivalent`, Countdown
through its verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from grpo_jax import evaluation, sampling, sharding
from grpo_jax.data.pipeline import tokenize_prompt
from grpo_jax.rewards.countdown import countdown_reward
from grpo_jax.rewards.math import extract_answer, is_equivalent


def math_correct(text: str, example: dict) -> bool:
    predicted = extract_answer(text)
    return predicted is not None and is_equivalent(predicted, str(example["answer"]))


def countdown_correct(text: str, example: dict) -> bool:
    return countdown_reward(text, example["numbers"], example["target"], format_score=0.0) == 1.0


CORRECTNESS = {"math": math_correct, "countdown": countdown_correct}


class Evaluator:
    """Evaluate params on a fixed list of held-out examples.

    k > 1 adds `eval/pass@k` and `eval/maj@k` from k samples per problem at `temperature`, `top_p`, `top_k`.
    """

    def __init__(
        self,
        model_config,
        tokenizer,
        examples: Sequence[dict],
        *,
        template: str,
        max_prompt_len: int,
        max_new_tokens: int,
        batch_size: int,
        stop_ids: Sequence[int] = (),
        k: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        correct_fn: Callable[[str, dict], bool] | str = "math",
        mesh=None,
        generate_fn=None,
    ):
        if not examples:
            raise ValueError("evaluation needs at least one held-out example")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop_ids = tuple(stop_ids)
        self.k = k
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.correct_fn = CORRECTNESS[correct_fn] if isinstance(correct_fn, str) else correct_fn
        self.mesh = mesh
        self.generate_fn = generate_fn or sampling.generate  # `setup.sampler_fn(config)`: config.sampler
        rows = [tokenize_prompt(e, tokenizer, template, max_prompt_len)[:2] for e in self.examples]
        tokens = np.stack([r[0] for r in rows])
        mask = np.stack([r[1] for r in rows])
        padded = -(-len(rows) // batch_size) * batch_size
        fill = np.arange(padded) % len(rows)  # repeat problems to fill the last chunk; results are cut
        self.prompt_tokens, self.prompt_mask = tokens[fill], mask[fill]
        self.fill = fill

    def _generate(self, params, rng, *, num_samples, temperature):
        """Completion texts [E][num_samples]."""
        texts: list[list[str]] = []
        for start in range(0, len(self.prompt_tokens), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            extra = {}
            if getattr(self.generate_fn, "takes_examples", False):  # multi-turn: environments per row
                extra["examples"] = [self.examples[i] for i in self.fill[chunk] for _ in range(num_samples)]
            rollout = self.generate_fn(
                self.model_config,
                params,
                self.prompt_tokens[chunk],
                self.prompt_mask[chunk],
                jax.random.fold_in(rng, start),
                num_samples=num_samples,
                max_new_tokens=self.max_new_tokens,
                temperature=temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                eos_id=self.tokenizer.eos_id,
                stop_ids=self.stop_ids,
                pad_id=self.tokenizer.pad_id,
                mesh=self.mesh,
                **extra,
            )
            tokens, mask = sharding.to_host((rollout.tokens, rollout.mask))
            decoded = [
                self.tokenizer.decode(t[m > 0].tolist(), skip_special=False) for t, m in zip(tokens, mask)
            ]
            texts.extend(decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples))
        return texts[: len(self.examples)]

    def __call__(self, params, rng) -> dict[str, float]:
        greedy = [t[0] for t in self._generate(params, rng, num_samples=1, temperature=0.0)]
        correct = [self.correct_fn(text, ex) for text, ex in zip(greedy, self.examples)]
        metrics = {
            "eval/accuracy": float(np.mean(correct)),
            "eval/answer_found": float(np.mean([extract_answer(t) is not None for t in greedy])),
            "eval/num_problems": len(self.examples),
        }
        if self.k > 1:
            samples = self._generate(
                params, jax.random.fold_in(rng, 1), num_samples=self.k, temperature=self.temperature
            )
            per_sample = [
                [self.correct_fn(t, ex) for t in texts] for texts, ex in zip(samples, self.examples)
            ]
            answers = [[extract_answer(t) for t in texts] for texts in samples]
            summary = evaluation.summarize_eval(
                per_sample,
                k=self.k,
                answers=answers,
                gold=lambda i, answer: self.correct_fn(f"<answer>{answer}</answer>", self.examples[i]),
            )
            metrics["eval/pass@k"] = float(summary["eval/pass@k"])
            metrics["eval/maj@k"] = float(summary["eval/maj@k"])
            metrics["eval/sampled_accuracy"] = float(summary["eval/accuracy"])
            metrics["eval/k"] = self.k
        self.last_greedy_texts = greedy
        return metrics
