"""Tool use: Countdown with a sandboxed Python interpreter, cold-start SFT then multi-turn GRPO.

    python scripts/train.py --config=configs/tool_python_countdown.py --workdir=workdirs/tool_python_countdown
    python scripts/sweep.py --config=configs/tool_python_countdown.py \\
        --workdir=workdirs/tool_python_countdown_sweep --seeds=0,1,2

Countdown (TinyZero's prompt: reach the target with + - * / using each of 3-4 numbers once) needs a search
the quickstart's tiny model (configs/quickstart.py) cannot do in its head; here it learns to hand the search
to the `python` tool. The tool runs each call's code in the sandbox (envs/sandbox.py; fails closed where no
isolation layer works: `allow_unsandboxed` stays False) after a prelude set here
(`env_options.tools.python.prelude` = `data/countdown_program.PRELUDE`, the source of `solve(nums, target)`,
a depth-first search that prints the expression it finds), so the program the model writes is one line.
The cold-start SFT demonstrations (`CountdownTask`, `demonstration="tool"`) are the call
`<tool_call>{"name": "python", "arguments": {"code": "solve([44, 19, 3, 7], 82)"}}</tool_call>` (the
prompt's numbers and target copied), the observation as the `python_countdown` environment renders the
program's output (`\\n<tool_response>7+3*(44-19)</tool_response>\\n`, loss-masked: the model never learns to
write a tool's result) and the answer `<answer> 7+3*(44-19) </answer>`. GRPO then samples multi-turn rollouts
in that environment (docs/ARCHITECTURE.md, "Tool use"): a turn ending in `</tool_call>` (one token of the
run's tokenizer) runs the code; a turn without a call is the final answer, scored by TinyZero's `countdown`
reward (1 correct, 0.1 a well-formed wrong equation, 0 none). What is left to learn after the cold start is
to copy the numbers into the call and the tool's expression into the answer without a slip.

The environment steps run in `env_workers` worker processes (each call starts a sandboxed interpreter,
~0.1 s: the workers run a batch's calls side by side; the sandbox, not the worker, is the isolation).

`get_sweep()` compares `tool` with `no_tool`: the same model, sequence budget, steps and batch, no
environment, and demonstrations that write the construction's steps (`<think> 44-19=25 , 25*3=75 , 75+7=82
</think> <answer> (44-19)*3+7 </answer>`: the search left to the model), scored by the same `countdown`
reward as a host reward. Both flavours are judged on the same held-out problems. `:runlocal` shrinks
everything to a seconds-long smoke run (tests/test_tool_countdown.py runs it end to end).
"""

import ml_collections

from grpo_jax.config_utils import sibling_config
from grpo_jax.data.countdown_program import PRELUDE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "runlocal"):
        raise ValueError(f"configs/tool_python_countdown.py: unknown variant {arg!r} (known: runlocal)")
    c = sibling_config(__file__, "quickstart.py", arg)  # the tiny model, the engine, the GRPO recipe
    c.task.name = "countdown"
    c.task.kwargs = ml_collections.ConfigDict(
        dict(num_numbers=(3, 4), max_number=100, max_target=100, demonstration="tool")
    )
    # 256 pieces: the prompt's words and the call's JSON keys become whole tokens (digits stay single), so
    # a prompt is at most 54 tokens (of 4,000 train problems), a tool trajectory 76 with its observation and
    # EOS, no_tool's written steps 58.
    c.tokenizer.vocab_size = 256
    # Sized for the longer flavour (the tool's), so both sweep points run the same shapes.
    c.max_prompt_len = 64
    c.max_new_tokens = 96
    c.max_answer_len = 24
    c.sft.update(num_examples=2000, max_len=144)
    c.grpo.update(
        steps=100,
        # In-graph rewards: none; the environment's reward (countdown on the final turn) is the score.
        rewards=(),
        env="python_countdown",
        # describe_tools=False: the prompt is the task's alone (the demonstrations teach the call), so the
        # environment's first observation is the prompt the SFT stage trained on.
        env_options=ml_collections.ConfigDict(
            dict(
                reward="countdown",
                describe_tools=False,
                # `solve` searches 4 numbers in milliseconds: a runaway program is cut at 2 s of CPU (the
                # wall-clock limit leaves room for a loaded host, where starting the sandbox takes seconds)
                tools=dict(python=dict(prelude=PRELUDE, wall_time_s=10.0, cpu_time_s=2, memory_mb=256)),
            )
        ),
        tool_format="plain",  # the demonstrations' format (CountdownTask uses ToolFormat())
        max_observation_chars=48,  # an expression of 4 numbers, `none`, or the head of an error
        max_tool_turns=2,
        env_timeout_s=30.0,  # one environment step, above the tool's own 10 s
        env_workers=-1,  # min(8, cpu count) processes, each waiting on its sandboxed runs
        allow_unsandboxed=False,
        # observation tokens fed back per call: `\n <tool_response> ≤16 characters </tool_response> \n` is
        # at most ~19 for a found expression
        max_observation_tokens=32,
    )
    c.eval.num_problems = 200  # each held-out problem is a sandboxed run too

    if arg == "runlocal":
        c.task.update(train_size=64, test_size=8)
        # Long enough (a few seconds) for the 1-layer model to learn the call's fixed JSON, so the GRPO
        # steps' rows make well-formed calls that the sandbox runs (what the smoke run is for).
        c.sft.update(
            steps=200,
            batch_size=16,
            num_examples=64,
            learning_rate=1e-2,
            warmup_steps=5,
            eval_every=200,
            checkpoint_every=200,
        )
        c.grpo.update(steps=2, env_workers=0)  # 8 calls a step: in-process, no worker start-up
        c.eval.update(num_problems=8, batch_size=8)
    return c


def get_sweep(arg=None):
    del arg
    return [
        {"_name": "tool"},
        {
            "_name": "no_tool",
            "task.kwargs.demonstration": "steps",
            "grpo.env": "",
            "grpo.host_rewards": (("countdown", 1.0),),
        },
    ]
