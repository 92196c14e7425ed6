"""Tool use: 3-4 digit × 2-3 digit multiplication with a calculator, cold-start SFT then multi-turn GRPO.

    python scripts/train.py --config=configs/tool_calculator.py --workdir=workdirs/tool_calculator
    python scripts/sweep.py --config=configs/tool_calculator.py --workdir=workdirs/tool_calculator_sweep \\
        --seeds=0,1,2

The quickstart's tiny model (configs/quickstart.py) cannot multiply `3471*239` in its head; here it learns to
ask: the cold-start SFT demonstrations (`MultiplicationTask`, `demonstration="tool"`) are a call
`<tool_call>{"name": "calculator", "arguments": {"expression": "3471*239"}}</tool_call>`, the observation
as the `calculator` environment renders it (`\\n<tool_response>829569</tool_response>\\n`, loss-masked:
the model never learns to write a tool's result) and the answer `<answer> 829569 </answer>`. GRPO then
samples multi-turn rollouts in that environment (docs/ARCHITECTURE.md, "Tool use"): a turn ending in
`</tool_call>` (one token of the run's tokenizer, which holds the tool tags as user-defined symbols) is
answered by the calculator; a turn without a call is the final answer, scored by `math_accuracy`
(`grpo.env_options.reward`), plus a small reward (0.1) for a well-formed call (`call_reward`). Two turns:
the call, then the answer.

`get_sweep()` compares `tool` with `no_tool`: the same model, sequence budget, steps and batch, no
environment, and demonstrations that do the work in writing (ArithmeticTask's partial products,
`<think> 3471*9=31239 , ... </think> <answer> 829569 </answer>`; `demonstration="answer"` would be the
bare answer), scored by the in-graph `accuracy` reward. Both flavours are judged on the same held-out
problems. `:runlocal` shrinks everything to a seconds-long smoke run.
"""

import ml_collections

from grpo_jax.config_utils import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/tool_calculator.py: unknown variant {arg!r} (known: runlocal)")
    c = sibling_config(__file__, "quickstart.py", arg)  # the tiny model, the engine, the GRPO recipe
    c.task.name = "multiplication"
    c.task.kwargs = ml_collections.ConfigDict(dict(a_digits=(3, 4), b_digits=(2, 3), demonstration="tool"))
    c.tokenizer.vocab_size = 64  # holds every flavour's characters and the 8 tags (R1's and the tool's)
    # Sized for the longer flavour (no_tool's written steps: up to 94 completion tokens; tool: up to 72,
    # its observation included), so both points run the same shapes.
    c.max_prompt_len = 24
    c.max_new_tokens = 96
    c.max_answer_len = 10
    # 1000 cold-start steps, not the quickstart's 400: copying the calculator's 4-7 digit result into the
    # answer is learnt late (the loss drops in one phase); at 400 steps only one of three seeds had learnt
    # it (held-out accuracy 47.8 %, 8.8 % and 0.0 % after SFT: benchmarks/tools.md).
    c.sft.update(num_examples=2000, max_len=120)
    if arg is None:
        c.sft.steps = 1000
    c.grpo.update(
        # In-graph rewards: none; the environment's reward is the score: math_accuracy on the final turn,
        # plus call_reward for the trajectory's first well-formed call (parsed, known tool, no error).
        rewards=(),
        env="calculator",
        # describe_tools=False: the prompt is the task's alone (the demonstrations teach the call), so the
        # environment's first observation is the prompt the SFT stage trained on.
        env_options=ml_collections.ConfigDict(
            dict(reward="math_accuracy", describe_tools=False, call_reward=0.1)
        ),
        tool_format="plain",  # the demonstrations' format (MultiplicationTask uses ToolFormat())
        max_observation_chars=64,  # a product of at most 7 digits, or a one-line error
        max_tool_turns=2,
        env_timeout_s=5.0,
        env_workers=0,  # in-process: the calculator is a bounded parser, nothing to isolate
        allow_unsandboxed=False,
        # observation tokens fed back per call: `▁ \n <tool_response> 7 digits </tool_response> \n` is 12
        max_observation_tokens=16,
    )

    if arg == "runlocal":
        c.task.update(train_size=64, test_size=8)
        c.max_new_tokens = 32
        c.sft.update(num_examples=64)
    return c


def get_sweep(arg=None):
    del arg
    return [
        {"_name": "tool"},
        {
            "_name": "no_tool",
            "task.kwargs.demonstration": "steps",
            "grpo.env": "",
            "grpo.rewards": (("accuracy", 1.0),),
        },
    ]
